"""brainit-pl: Brain-IT image reconstruction from fMRI as a PyTorch Lightning application."""

__version__ = "0.1.0"
