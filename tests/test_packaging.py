"""The package stands alone: its wheel carries the configs and runs outside the checkout; its metadata
declares every package the code imports."""

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_top_level_names() -> set[str]:
    names = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"brainit_pl"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    declared = {_normalise(re.split(r"[\[<>=!~; ]", dep)[0]) for dep in PROJECT["dependencies"]}
    distributions = packages_distributions()
    missing = {
        name: distributions.get(name)
        for name in _imported_top_level_names()
        if not {_normalise(d) for d in distributions.get(name, [name])} & declared
    }
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"


def test_metadata_is_complete():
    assert PROJECT["requires-python"] == ">=3.11" and sys.version_info >= (3, 11)
    assert all(re.search(r">=\d", dep) for dep in PROJECT["dependencies"]), (
        "every dependency has a lower bound"
    )
    assert {"pytest", "ruff"} <= {re.split(r"[<>=]", d)[0] for d in PROJECT["optional-dependencies"]["dev"]}
    assert {"Homepage", "Documentation", "Issues"} <= set(PROJECT["urls"])
    assert PROJECT["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()


def test_configs_folder_is_the_packaged_one():
    from brainit_pl.packaged_configs import config_names, configs_root

    assert configs_root().resolve() == (ROOT / "configs").resolve()
    assert {"subj01", "sim/bit_tiny"} <= set(config_names())


# ------------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout, installed (``--no-deps``) into its own folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    tree.mkdir()
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", tree], check=True)
    (wheel,) = (tmp / "dist").glob("brainit_pl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``brainit-pl ARGS`` from the installed wheel, in ``cwd``: ``-S`` skips the site-packages' .pth files
    (an editable install's path to a checkout); the stack comes from this interpreter's site-packages."""
    stack = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sorted(stack)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-S", "-m", "brainit_pl.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_wheel_carries_the_configs_and_runs_outside_the_checkout(installed, bit_store, tmp_path):
    where = _run_installed(installed, tmp_path, "config", "show", "configs/sim/bit_tiny.yaml")
    assert where.returncode == 0, where.stderr
    assert where.stdout == (ROOT / "configs" / "sim" / "bit_tiny.yaml").read_text()
    listed = _run_installed(installed, tmp_path, "config", "list")
    assert listed.returncode == 0 and "sim/bit_tiny" in listed.stdout.split()

    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import brainit_pl; print(brainit_pl.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(installed), "the checkout's src must not be imported"

    fit = _run_installed(
        installed,
        tmp_path,
        *("fit", "--config", "sim/bit_tiny", "--data.store", str(bit_store)),
        *("--model.init_args.clusters", str(bit_store / "clusters.npz"), "--trainer.max_epochs", "1"),
        *("--trainer.default_root_dir", "run"),
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert list((tmp_path / "run").rglob("last.ckpt"))
