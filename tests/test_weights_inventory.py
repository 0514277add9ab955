"""Pretrained files found where users keep them (weights folder, Hugging Face cache, torch hub) and
``brainit-pl weights``, on tiny fake files in temporary cache layouts (nothing is downloaded)."""

from pathlib import Path

import huggingface_hub  # noqa: F401  imported before any test sets HF_HUB_CACHE: it reads it at import
import pytest

from brainit_pl.backbones.inventory import inventory
from brainit_pl.backbones.weights import WEIGHT_FILES, WEIGHTS_ENV, find_weights, resolve_weights
from brainit_pl.cli import main
from brainit_pl.errors import BrainITError


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty weights folder, HF cache and torch home; returns them."""
    roots = {name: tmp_path / name for name in ("weights", "hf", "torch")}
    for root in roots.values():
        root.mkdir()
    monkeypatch.setenv(WEIGHTS_ENV, str(roots["weights"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(roots["hf"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(roots["torch"]))
    return roots


def put_in_hf_cache(cache: Path, key: str, content: bytes = b"x" * 10) -> Path:
    """The file of ``key`` as ``huggingface-cli download`` leaves it: blob, snapshot link, refs/main."""
    repo, filename, repo_type = WEIGHT_FILES[key].hub
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    blob = folder / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(content)
    snapshot = folder / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    return snapshot


def test_hub_and_fetch_commands_follow_the_url():
    assert WEIGHT_FILES["mindeye2-unclip6"].hub == (
        "pscotti/mindeyev2", "unclip6_epoch0_step110000.ckpt", "dataset"
    )  # fmt: skip
    assert "--repo-type dataset pscotti/mindeyev2" in WEIGHT_FILES["mindeye2-unclip6"].fetch_command()
    assert WEIGHT_FILES["vgg16-bn"].hub is None
    assert WEIGHT_FILES["vgg16-bn"].fetch_command().startswith("wget -P ")
    assert all(spec.used_by for spec in WEIGHT_FILES.values())


def test_found_in_each_place_weights_folder_first(caches):
    assert find_weights("dinov2-vitl14-reg") is None
    cached = put_in_hf_cache(caches["hf"], "dinov2-vitl14-reg")
    assert find_weights("dinov2-vitl14-reg") == (cached, "hugging face cache")
    assert resolve_weights("dinov2-vitl14-reg") == cached
    own = caches["weights"] / WEIGHT_FILES["dinov2-vitl14-reg"].path
    own.parent.mkdir(parents=True)
    own.write_bytes(b"y")
    assert find_weights("dinov2-vitl14-reg") == (own, "weights folder")

    hub = caches["torch"] / "hub" / "checkpoints" / "vgg16_bn-6c64b313.pth"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"z" * 3)
    assert find_weights("vgg16-bn") == (hub, "torch hub")
    assert f"wget -P {hub.parent} " in WEIGHT_FILES["vgg16-bn"].fetch_command()


def test_missing_file_message_names_the_fetch_command(caches):
    with pytest.raises(BrainITError, match="huggingface-cli download --repo-type dataset pscotti/mindeyev2"):
        resolve_weights("mindeye2-unclip6")


def test_weights_command_lists_present_and_missing(caches, capsys):
    put_in_hf_cache(caches["hf"], "sdxl-base", b"x" * 2048)
    rows = {row["key"]: row for row in inventory()}
    assert set(rows) == set(WEIGHT_FILES)
    assert rows["sdxl-base"]["where"] == "hugging face cache" and rows["sdxl-base"]["bytes"] == 2048
    assert rows["alexnet"]["path"] is None and "alexnet-owt-7be5be79.pth" in rows["alexnet"]["fetch"]

    assert main(["weights"]) == 1  # something is missing
    out = capsys.readouterr().out
    assert "sdxl-base: found in hugging face cache, 2.0 KiB" in out
    assert "alexnet: MISSING" in out and f"1 of {len(WEIGHT_FILES)} files found" in out
    assert main(["weights", "--missing"]) == 1
    missing = capsys.readouterr().out
    assert "sdxl-base:" not in missing and "alexnet: MISSING" in missing
