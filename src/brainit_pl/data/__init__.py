"""Data: everything that reads or writes a data file, from raw NSD to the batches the models see.

* :mod:`.layout`, :mod:`.expdesign`, :mod:`.nsd`, :mod:`.surface`, :mod:`.mindeye2`: the raw NSD release (and
  MindEye2's preprocessed one) as it lies on disk; :mod:`.prepare`: the ``prepare`` job that reads it.
* :mod:`.store`: brainit-pl's streaming store; :mod:`.splits`: the train/val/test splits of its trials.
* :mod:`.cache`: the feature-cache format (``STORE/features_<backbone>.h5``) and its image fingerprint;
  :mod:`.synthetic_store`: the synthetic-fMRI store of external images (written by ``synthesize-fmri``).
* :mod:`.external`, :mod:`.datasets`, :mod:`.datamodule`: the NSDDataModule and its datasets.
* :mod:`.sim`: the simulated NSD (a subpackage below the rest: it writes the raw layout, reading none of it).

Layer (:mod:`brainit_pl.layers`): may import ``errors``, ``files``, ``devices``, ``viz``; never the models,
the metrics or the jobs above. The jobs that *compute* features live in :mod:`brainit_pl.features`.
"""
