"""The simulated NSD: a brain whose truth is known, written in the raw NSD file layout (docs/simulator.md).

* :mod:`.presets`: sizes (tiny, demo, full); :mod:`.design`: NSD's experiment design.
* :mod:`.sources`, :mod:`.canvas`, :mod:`.stimuli`: stimuli composed from photographs shipped with
  scikit-image, scikit-learn and matplotlib; :mod:`.features`: what each image shows, as feature maps.
* :mod:`.anatomy`, :mod:`.brain`: voxels, visual areas, pRFs and functional types; :mod:`.truth`: the
  ground truth on disk and noise-free responses of any image.
* :mod:`.simulate`: the ``simulate`` job.

Layer (:mod:`brainit_pl.layers`): may import ``errors``, ``files``, ``viz`` and :mod:`brainit_pl.data.layout`
only, so that the real-data code never depends on how the simulation is made.
"""
