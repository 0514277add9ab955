"""Reconstruction from predicted features: the DIP, unCLIP and SDXL stages, the chain, ``reconstruct``.

* :mod:`.dip`: the low-level stage (Deep Image Prior inverting VGG tokens).
* :mod:`.chain`: one batch through every stage; :mod:`.reconstruct`: the ``reconstruct`` job;
  :mod:`.callback`: reconstructions during Lightning validation/test; :mod:`.refine`: SDXL refinement.

The unCLIP model itself (loading, sgm conversion, sampler) is a model: :mod:`brainit_pl.models.unclip`.
Layer (:mod:`brainit_pl.layers`): may import backbones, data, metrics, models, and of ``lit`` only
:mod:`brainit_pl.lit.loading` (trained modules from checkpoints).
"""
