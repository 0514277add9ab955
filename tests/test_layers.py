"""The layering of ``brainit_pl.layers`` holds over the source tree: no import points upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from brainit_pl.layers import LAYERS, ONLY_THROUGH, unit_of

SRC = Path(__file__).resolve().parents[1] / "src" / "brainit_pl"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def internal_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module inside brainit_pl) of every import in a file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            require_absolute = node.level == 0
            assert require_absolute, f"{path}:{node.lineno}: relative import"
            names = (
                [node.module] if node.module != "brainit_pl" else [f"brainit_pl.{a.name}" for a in node.names]
            )
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n[len("brainit_pl.") :]) for n in names if n.startswith("brainit_pl.")]
    return found


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        source = module_name(path)
        if not source:  # brainit_pl/__init__.py: the version only
            continue
        unit = unit_of(source)
        allowed = LAYERS[unit][1]
        for line, target in internal_imports(path):
            if target == "__version__":
                continue
            other = unit_of(target)
            if other == unit:
                continue
            through = ONLY_THROUGH.get((unit, other))
            if other not in allowed or (through and not (target + ".").startswith(through + ".")):
                bad.append(f"{path.relative_to(SRC)}:{line}: {unit} may not import {target}")
    return bad


def test_every_unit_of_the_tree_is_in_the_table():
    units = {unit_of(module_name(p)) for p in SRC.rglob("*.py") if module_name(p)}
    assert units <= set(LAYERS), f"modules outside the layer table: {sorted(units - set(LAYERS))}"


def test_no_import_points_upwards():
    assert violations(sorted(SRC.rglob("*.py"))) == []


def test_the_table_has_no_cycle():
    order = list(LAYERS)
    for unit, (_, allowed) in LAYERS.items():
        for other in allowed:
            assert other in LAYERS, f"{unit} allows the unknown unit {other}"
            assert order.index(other) < order.index(unit), f"{unit} → {other} points upwards in the table"


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        ("data/store.py", "from brainit_pl.features.extract import extract_features", "data may not import"),
        ("recon/chain.py", "from brainit_pl.lit.bit import BITModule", "recon may not import lit.bit"),
        ("backbones/vgg.py", "import brainit_pl.metrics.nets", "backbones may not import"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, line, message):
    """Each rule is live: the same file with one wrong import fails the check."""
    fake = tmp_path / "brainit_pl"
    path = fake / source
    path.parent.mkdir(parents=True)
    path.write_text((SRC / source).read_text() + "\n\ndef _x():\n    " + line + "\n")
    monkeypatch.setitem(globals(), "SRC", fake)
    bad = violations([path])
    assert any(message in b for b in bad), bad


def test_lit_loading_is_the_only_door_from_recon_to_lit():
    imports = {
        target
        for path in (SRC / "recon").rglob("*.py")
        for _, target in internal_imports(path)
        if target.startswith("lit")
    }
    assert imports == {"lit.loading"}


def test_the_architecture_figure_draws_every_layer(tmp_path):
    import importlib.util

    path = SRC.parents[1] / "docs" / "architecture.py"
    spec = importlib.util.spec_from_file_location("architecture", path)
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    drawn = architecture.draw(tmp_path / "a.png")
    assert drawn == [u for u in LAYERS if u != "layers"]
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
