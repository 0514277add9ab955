"""LightningModules and the LightningCLI of brainit-pl."""
