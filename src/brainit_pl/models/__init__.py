"""Trainable networks: the Universal Brain Encoder (its per-voxel readout first), V2C, and BIT.

Import from the submodules (``brainit_pl.models.encoder_head``), so that using one model does not import
the libraries of the others.
"""
