"""The package's layers: which part of brainit-pl may import which (checked by ``tests/test_layers.py``).

Read bottom-up, the packages follow the path of one recording from the raw NSD files to a scored image;
each may import only the layers listed for it, so a dependency never points upwards. The same table draws
the architecture figure of the README (``docs/architecture.py``).

Units are the top-level modules and packages of ``brainit_pl`` plus the subpackages named in :data:`LAYERS`
(``data.layout``, ``data.sim``, ``workflows.transfer``); a unit may always import itself and ``brainit_pl``
(the version). :data:`ONLY_THROUGH` narrows an allowed arrow to one module of the target.
"""

from __future__ import annotations

DATA = ("data.layout", "data.sim", "data")  # the data layer, its two lower units included
# what the workflows (the demo; the transfer package adds the demo's own) may import
WORKFLOW_DEPS = (
    *("errors", "files", "devices", "packaged_configs", "viz"),
    *DATA,
    *("metrics", "models", "lit", "recon", "features"),
)

# unit → (what it holds, the units it may import); bottom layer first
LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "errors": ("the one error type of a clean refusal", ()),
    "files": ("atomic writes, output locks, the one checkpoint reader", ("errors",)),
    "devices": ("device and autocast choice", ("errors",)),
    "packaged_configs": ("the configs that ship in the package (brainit-pl config)", ("errors",)),
    "job_config": ("the jobs' help, one-line errors and options from YAML", ("errors",)),
    "viz": ("image grids, brain maps", ("errors", "files")),
    "backbones": ("frozen pretrained networks + tiny twins", ("errors", "files", "devices")),
    "data.layout": ("NSD's file layout and constants", ()),
    "data.sim": (
        "the simulated NSD (a brain whose truth is known)",
        ("errors", "files", "viz", "data.layout"),
    ),
    "data": (
        "raw NSD reader, store, feature caches, synthetic fMRI, DataModule",
        ("errors", "files", "devices", "viz", "data.layout", "data.sim"),
    ),
    "metrics": (
        "image metrics, their networks, reports",
        ("errors", "files", "devices", "viz", "backbones"),
    ),
    "models": (
        "encoder, V2C, BIT, baselines, unCLIP (nn.Modules)",
        ("errors", "files", "devices", "viz", "backbones", *DATA),
    ),
    "lit": (
        "LightningModules, schedules, the LightningCLI",
        ("errors", "files", "devices", "viz", "backbones", *DATA, "metrics", "models"),
    ),
    "recon": (
        "DIP, unCLIP sampling, SDXL refinement, reconstruct",
        ("errors", "files", "devices", "viz", "backbones", *DATA, "metrics", "models", "lit"),
    ),
    "features": (
        "extract-features, synthesize-fmri jobs",
        ("errors", "files", "devices", "backbones", *DATA, "models", "lit"),
    ),
    "workflows": ("the demo: every job in order on the simulated NSD", WORKFLOW_DEPS),
    "workflows.transfer": (
        "a new subject from little data (transfer, its demo and report)",
        (*WORKFLOW_DEPS, "workflows"),
    ),
    "cli": ("brainit-pl: every command", ("errors", "files", "packaged_configs", "job_config", "lit")),
    "layers": ("this table", ()),
}

# (unit, target) → the one module of target that unit may import
ONLY_THROUGH: dict[tuple[str, str], str] = {("recon", "lit"): "lit.loading"}


def unit_of(module: str) -> str:
    """The unit of a dotted module name inside ``brainit_pl`` (``"data.sim.brain"`` → ``"data.sim"``)."""
    parts = module.split(".")
    two = ".".join(parts[:2])
    return two if two in LAYERS else parts[0]
