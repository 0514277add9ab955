"""Reconstruction from predicted features: the DIP, unCLIP and SDXL stages (BRAINIT.md §6)."""
