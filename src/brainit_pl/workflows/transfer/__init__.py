"""A new subject from little data (docs/method.md §7): ``brainit-pl transfer`` and ``transfer-demo``.

* :mod:`.run`: the ``transfer`` job (embeddings, V2C by nearest neighbour, BITs, stage 2, reconstruction);
  :mod:`.plan`: its plumbing (steps, data tables, fitting one module).
* :mod:`.demo`: ``transfer-demo`` (``make transfer-1h``): transfer vs scratch vs all data on a held-out
  simulated subject; :mod:`.report`: its tables and pictures.

Layer (:mod:`brainit_pl.layers`): may import every layer below and :mod:`brainit_pl.workflows.demo`.
"""
