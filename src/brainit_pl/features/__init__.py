"""Precomputed image features of a store's images (``brainit-pl extract-features``).

* :mod:`.cache`: the feature-cache file format (``STORE/features_<backbone>.h5``), the image-store
  fingerprint that ties a cache to its images, and :class:`~brainit_pl.features.cache.FeatureCache`, the
  row-streaming reader the NSDDataModule uses.
* :mod:`.extract`: the ``extract-features`` job (batched, resumable).

Nothing is imported here, so ``import brainit_pl.features.cache`` stays free of torch and open_clip.
"""
