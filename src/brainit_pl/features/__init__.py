"""The jobs that compute features of a store's images: ``extract-features`` and ``synthesize-fmri``.

* :mod:`.extract`: CLIP patch tokens of every image into the feature cache (batched, resumable).
* :mod:`.synthesize`: the trained Universal Encoder's predicted fMRI of an external image set.

The file formats they write (:mod:`brainit_pl.data.cache`, :mod:`brainit_pl.data.synthetic_store`) live in
the data layer, which reads them. Layer (:mod:`brainit_pl.layers`): may import the data, backbones, models
and ``lit`` (the trained encoder). Nothing is imported here, so importing a format stays light.
"""
