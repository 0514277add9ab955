"""Workflows: several jobs run in order, each in a subprocess, with one report at the end.

* :mod:`.demo`: ``brainit-pl demo`` (``make demo``), the whole method on the simulated NSD.
* :mod:`.transfer`: ``brainit-pl transfer`` and ``transfer-demo`` (``make transfer-1h``).

Layer (:mod:`brainit_pl.layers`): the top of the package; may import every layer below (not ``cli``).
"""
