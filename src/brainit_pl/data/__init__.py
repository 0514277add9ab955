"""Data: the raw NSD layout, the simulated NSD, the streaming store and the NSDDataModule."""
