"""Shared test setup: offline hubs, and one tiny simulated NSD (+ its prepared store) per session."""

import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_nsd(tmp_path_factory):
    """A raw NSD root written by the simulator's `tiny` preset (seed 0). Treat as read-only."""
    from brainit_pl.data.sim.simulate import simulate

    return simulate(tmp_path_factory.mktemp("tiny") / "nsd", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_store(tiny_nsd, tmp_path_factory):
    """The store `brainit-pl prepare` makes of :func:`tiny_nsd`. Treat as read-only."""
    from brainit_pl.data.prepare import prepare

    return prepare(tiny_nsd, tmp_path_factory.mktemp("tiny_store") / "store")


_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) [\w.]+: ")


@pytest.fixture
def stderr_lines(capsys):
    """Read what the CLI wrote on stderr since the last read, without brainit-pl's log lines.

    A user error must be exactly one line (and no traceback); progress logs may precede it.
    """

    def read() -> list[str]:
        err = capsys.readouterr().err
        return [line for line in err.strip().splitlines() if line and not _LOG_LINE.match(line)]

    return read


@pytest.fixture(scope="session")
def bit_store(tiny_store, tmp_path_factory):
    """A copy of :func:`tiny_store` with a tiny-twin CLIP cache and a random ``clusters.npz`` (K=4) beside it.

    Returns the store folder; the clusters file is ``STORE/clusters.npz``. Treat as read-only.
    """
    import shutil

    import numpy as np

    from brainit_pl.data.store import Store
    from brainit_pl.features.extract import extract_features
    from brainit_pl.models.v2c import ClusterMap, save_clusters

    store = tmp_path_factory.mktemp("bit") / "store"
    shutil.copytree(tiny_store, store)
    extract_features(store, tiny=True, batch_size=16)
    opened = Store(store)
    n_voxels = {s: opened.subject(s).n_voxels for s in opened.subjects}
    labels = np.random.default_rng(0).integers(0, 4, size=sum(n_voxels.values()))
    save_clusters(store / "clusters.npz", ClusterMap(labels, n_voxels, 4, "random", 0))
    return store


@pytest.fixture(scope="session")
def picture():
    """``picture(name, size)``: a scikit-image sample photograph, centre-cropped square and resized
    (anti-aliased) → (1, 3, size, size) float in [0, 1]."""
    import numpy as np
    import skimage.data
    import torch
    import torch.nn.functional as F

    def load(name: str, size: int) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(getattr(skimage.data, name)())).permute(2, 0, 1)[None].float() / 255
        h, w = x.shape[-2:]
        m = min(h, w)
        x = x[..., (h - m) // 2 : (h - m) // 2 + m, (w - m) // 2 : (w - m) // 2 + m]
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)

    return load


@pytest.fixture(scope="session")
def checkpoints(bit_store, tmp_path_factory):
    """Low-level, stage-1 semantic and stage-2 checkpoints (1 short epoch each) on the tiny store."""
    from brainit_pl.cli import main
    from test_bit_lit import LOWLEVEL, _args

    root = tmp_path_factory.mktemp("recon_ckpts")
    short = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    assert main(_args(bit_store, root / "sem", *short)) == 0
    assert main(_args(bit_store, root / "low", *short, *LOWLEVEL)) == 0
    sem = next((root / "sem").rglob("last.ckpt"))
    stage2 = [
        "fit",
        *(
            "--config",
            str(Path(__file__).parents[1] / "configs" / "sim" / "stage2_tiny.yaml"),
            "--data.store",
            str(bit_store),
        ),
        *("--model.init_args.bit_checkpoint", str(sem), "--trainer.default_root_dir", str(root / "s2")),
        *(
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ),
        *("--data.batch_size", "4"),
    ]
    assert main(stage2) == 0
    return Checkpoints(next((root / "low").rglob("last.ckpt")), sem, next((root / "s2").rglob("last.ckpt")))


class Checkpoints(NamedTuple):
    lowlevel: Path
    semantic: Path  # stage 1
    stage2: Path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny ops: on the shared 2-core machine two threads that wait for
    each other at every op were ~70× slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _PageParser(HTMLParser):
    """The ``<img>`` sources and table count of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"


@pytest.fixture(scope="session")
def read_report():
    """``read(path)``: parse a report.html, check that every picture it shows decodes (base64) or exists
    (a relative path); returns ``(text, n_images, n_tables)``."""
    import base64
    import io

    from PIL import Image

    def read(path: Path) -> tuple[str, int, int]:
        text = Path(path).read_text()
        parser = _PageParser()
        parser.feed(text)
        for src in parser.images:
            if src.startswith("data:image/png;base64,"):
                Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
            else:
                assert (Path(path).parent / src).is_file(), f"{path} shows a missing picture {src}"
        return text, len(parser.images), parser.tables

    return read
