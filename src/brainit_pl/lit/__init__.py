"""LightningModules (encoder, BITs, stage 2, baselines), their schedules and the LightningCLI.

:mod:`.loading` is the one module the layer above (:mod:`brainit_pl.recon`) may import: trained modules from
their checkpoints. Layer (:mod:`brainit_pl.layers`): may import backbones, data, metrics and models.
"""
