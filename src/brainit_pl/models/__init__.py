"""Trainable and generative networks: the Universal Brain Encoder, V2C, BIT, the baselines, unCLIP.

* :mod:`.encoder_head`, :mod:`.encoder`: the Universal Brain Encoder; :mod:`.v2c`, :mod:`.cluster_job`:
  Voxel-to-Cluster and the ``cluster`` job; :mod:`.tokenizer`, :mod:`.bit`: the Brain Interaction
  Transformer; :mod:`.losses`; :mod:`.baselines`, :mod:`.ridge`: the MindEye2-style and ridge decoders.
* :mod:`.unclip`, :mod:`.sgm_keys`: the unCLIP diffusion model (used by stage-2 training and by
  reconstruction) and its sgm checkpoint conversion.

Import from the submodules (``brainit_pl.models.encoder_head``), so that using one model does not import
the libraries of the others. Layer (:mod:`brainit_pl.layers`): may import backbones and data; never
Lightning modules, metrics or jobs.
"""
