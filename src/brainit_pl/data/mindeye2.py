"""Read MindEye2's preprocessed NSD release into brainit-pl's store (a ``brainit-pl prepare`` input).

The release is the Hugging Face dataset ``pscotti/mindeyev2`` (MindEye2, Scotti et al., ICML 2024);
its files sit directly in one folder, MindEye2's ``--data_path``. What this module reads from it::

    ROOT/betas_all_subj0X_fp32_renorm.hdf5   dataset "betas": (750 · sessions, V) float32, nsdgeneral
                                             voxels, z-scored by MindEye2; row = global trial
    ROOT/coco_images_224_float16.hdf5        dataset "images": (73000, 3, 224, 224) float16 in [0, 1];
                                             row = 0-based 73k id
    ROOT/wds/subj0X/train/N.tar              webdataset shards (one per session, N = 0, 1, ...)
    ROOT/wds/subj0X/new_test/0.tar           the shared-1000 test trials of all sessions ("test/" is an
                                             older, smaller split and is not read)

Each shard sample ``sampleNNNNNNNNN`` has a member ``sampleNNNNNNNNN.behav.npy``: a (1, 17) float array
(MindEye2's writer; ``past_behav``/``future_behav``/``olds_behav`` members are ignored). Columns used,
as MindEye2's ``Train.ipynb`` uses them (``behav[:, 0, 0]`` indexes the images, ``behav[:, 0, 5]`` the betas rows,
``behav[..., -1]`` flags shared images): 0 = 0-based 73k id, 1 = subject, 2 = 1-based session,
5 = global trial (row of the betas file), 16 = shared1000 (0/1).

Store written: only trials some shard references, in global-trial order; betas copied as float16 as
they are (no re-normalisation: MindEye2 already z-scored them); ``session = g // 750 + 1``,
``trial = g % 750``; images at 224² (``round(x · 255)``) and 112² (anti-aliased). The release has no voxel
geometry, so the subject files have ``space = "mindeye2"``, ``ijk = (voxel index, -1, -1)`` and
``xyz = 0``: *no geometry* (an anatomical baseline cannot run on such a store).
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from brainit_pl.data.layout import NSD_TRIALS_PER_SESSION
from brainit_pl.data.store import IMAGE_SIZES, repeat_index, subject_filename
from brainit_pl.data.store_writer import SubjectStoreWriter, write_images, write_manifest
from brainit_pl.errors import BrainITError, require

log = logging.getLogger(__name__)

RELEASE = "huggingface.co/datasets/pscotti/mindeyev2"
BETAS_FILE = "betas_all_subj{subject:02d}_fp32_renorm.hdf5"
IMAGES_FILE = "coco_images_224_float16.hdf5"
WDS_DIR = "wds/subj{subject:02d}"
TEST_SHARD = "new_test/0.tar"
BEHAV_COLUMNS = 17
COL_NSD_ID, COL_SUBJECT, COL_SESSION, COL_GLOBAL_TRIAL, COL_SHARED = 0, 1, 2, 5, 16
FLOAT16_MAX = 65504.0


def _missing(path: Path) -> BrainITError:
    return BrainITError(f"MindEye2 file {path} not found (download it from {RELEASE})")


# -------------------------------------------------------------------------------------------- shards
def release_subjects(root: str | Path) -> list[int]:
    """Subjects that have a betas file in the release folder ``root``."""
    found = []
    for path in Path(root).glob("betas_all_subj*_fp32_renorm.hdf5"):
        digits = path.name[len("betas_all_subj") : -len("_fp32_renorm.hdf5")]
        if digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def wds_shards(root: str | Path, subject: int) -> list[Path]:
    """The webdataset shards of ``subject``: ``train/N.tar`` in numeric order, then ``new_test/0.tar``."""
    folder = Path(root) / WDS_DIR.format(subject=subject)
    require(folder.is_dir(), f"MindEye2 folder {folder} not found (download wds/ from {RELEASE})")
    train = [p for p in (folder / "train").glob("*.tar") if p.stem.isdigit()]
    require(bool(train), f"no MindEye2 training shards {folder}/train/N.tar (download them from {RELEASE})")
    test = folder / TEST_SHARD
    if not test.is_file():
        raise _missing(test)
    return sorted(train, key=lambda p: int(p.stem)) + [test]


def read_behav(shard: str | Path) -> np.ndarray:
    """The ``behav.npy`` row of every sample of one shard → (n, 17) float64, in shard order.

    Read with the standard library (``tarfile`` + ``numpy.load``): a webdataset shard is a plain tar
    whose members are ``<key>.<field>``, and the ``webdataset`` package is not a dependency.
    """
    shard = Path(shard)
    rows = []
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                # webdataset: the key runs up to the first dot of the base name, the field after it
                field = member.name.rsplit("/", 1)[-1].partition(".")[2]
                if not member.isfile() or field != "behav.npy":
                    continue
                behav = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                require(
                    behav.size == BEHAV_COLUMNS and behav.shape[-1] == BEHAV_COLUMNS,
                    f"{shard}: {member.name} has shape {behav.shape}, expected (1, {BEHAV_COLUMNS}) "
                    "(MindEye2's behav row)",
                )
                rows.append(behav.reshape(BEHAV_COLUMNS).astype(np.float64))
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise BrainITError(f"{shard} is not a readable webdataset shard ({err})") from err
    require(bool(rows), f"{shard} holds no '*.behav.npy' samples; is it a MindEye2 shard?")
    return np.stack(rows)


def _check(bad: np.ndarray, message: Callable[[int], str]) -> None:
    """Raise ``message(first bad index)`` if any ``bad``; the message is built only on failure."""
    if bad.any():
        raise BrainITError(message(int(np.flatnonzero(bad)[0])))


def _shard_table(shard: Path, subject: int, n_rows: int, n_images: int) -> np.ndarray:
    """One shard's validated (n, 3) int64 table: global trial, 73k id, shared (0/1)."""
    used = read_behav(shard)[:, [COL_GLOBAL_TRIAL, COL_NSD_ID, COL_SUBJECT, COL_SESSION, COL_SHARED]]
    _check(
        ~(np.isfinite(used) & (used == np.round(used))).all(axis=1),
        lambda i: f"{shard}: behav sample {i} has non-integer values in columns 5, 0, 1, 2 or 16",
    )
    g, nsd, subj, session, shared = used.astype(np.int64).T
    betas = BETAS_FILE.format(subject=subject)
    _check(
        (g < 0) | (g >= n_rows),
        lambda i: f"{shard}: behav points at betas row {g[i]}, outside the {n_rows} rows of {betas}",
    )
    _check(
        (nsd < 0) | (nsd >= n_images),
        lambda i: f"{shard}: behav gives image {nsd[i]}, outside the {n_images} rows of {IMAGES_FILE}",
    )
    _check(subj != subject, lambda i: f"{shard}: behav rows of subject {subj[i]}, expected {subject}")
    expected = g // NSD_TRIALS_PER_SESSION + 1
    _check(
        session != expected,
        lambda i: (
            f"{shard}: behav session {session[i]} disagrees with global trial {g[i]} (session {expected[i]})"
        ),
    )
    _check(~np.isin(shared, (0, 1)), lambda i: f"{shard}: behav shared1000 flag {shared[i]} is not 0 or 1")
    return np.stack([g, nsd, shared], axis=1)


def read_trials(root: str | Path, subject: int, n_rows: int, n_images: int) -> dict[str, np.ndarray]:
    """The trial table of ``subject`` from its shards, sorted by global trial.

    Args:
        root: the release folder.
        subject: 1-based subject.
        n_rows: rows of the subject's betas file (a trial must point inside it).
        n_images: rows of the images file (a 73k id must point inside it).

    Returns:
        ``{field: (T,) array}`` with the fields of ``store.TRIAL_FIELDS``.

    Raises:
        BrainITError: naming the shard, for a row outside the betas or images, another subject's row, a
            session that disagrees with the global trial, a non-0/1 shared flag, or a trial given twice.
    """
    shards = wds_shards(root, subject)
    tables = [_shard_table(shard, subject, n_rows, n_images) for shard in shards]
    sources = np.repeat(np.arange(len(shards)), [len(t) for t in tables])
    table = np.concatenate(tables)  # (T, 3): global trial, 73k id, shared
    order = np.argsort(table[:, 0], kind="stable")
    table, sources = table[order], sources[order]
    g = table[:, 0]
    _check(
        np.r_[g[1:] == g[:-1], False],
        lambda i: (
            f"global trial {g[i]} of subject {subject} appears twice ({shards[sources[i]]} and "
            f"{shards[sources[i + 1]]})"
        ),
    )
    return {
        "nsd_id": table[:, 1],
        "session": g // NSD_TRIALS_PER_SESSION + 1,
        "trial": g % NSD_TRIALS_PER_SESSION,
        "global_trial": g,
        "shared": table[:, 2].astype(bool),
        "repeat": repeat_index(table[:, 1]),
    }


# -------------------------------------------------------------------------------------------- images
def images_from_float(x: np.ndarray) -> dict[int, np.ndarray]:
    """MindEye2's float images → the store's sizes.

    Args:
        x: (n, 3, 224, 224) float in [0, 1].

    Returns:
        ``{224: (n, 3, 224, 224) uint8 = round(x · 255), 112: (n, 3, 112, 112) uint8}``. The 112² copy is
        resized from the float values with PIL's bicubic filter, whose support widens with the
        downscale factor (anti-aliased), as the raw-NSD reader resizes its stimuli.
    """
    from PIL import Image

    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    out = {224: np.rint(x * 255.0).astype(np.uint8)}
    for size in (s for s in IMAGE_SIZES if s != 224):
        small = np.empty((len(x), 3, size, size), dtype=np.float32)
        for n, img in enumerate(x):
            # mode "F": one float32 channel at a time, so nothing is rounded to 8 bits before the resize
            for c, channel in enumerate(img):
                pil = Image.fromarray(channel, mode="F").resize((size, size), Image.Resampling.BICUBIC)
                small[n, c] = np.asarray(pil)
        out[size] = np.rint(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _image_source(path: Path, progress: tqdm) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """The callable ``write_images`` asks for: sorted 73k ids → ``{size: uint8 images}``."""

    def images(ids: np.ndarray) -> dict[int, np.ndarray]:
        with h5py.File(path, "r") as h5:
            x = h5["images"][np.asarray(ids, dtype=np.int64)]  # (n, 3, 224, 224) float16; ids increasing
        require(bool(np.isfinite(x).all()), f"{path}: images of ids {ids[0]}..{ids[-1]} contain NaN or inf")
        progress.update(len(ids))
        return images_from_float(x)

    return images


def _dataset_shape(path: Path, name: str) -> tuple[int, ...]:
    """Shape of dataset ``name`` in the HDF5 file ``path`` (a missing or unreadable file is named)."""
    if not path.is_file():
        raise _missing(path)
    try:
        with h5py.File(path, "r") as h5:
            require(name in h5, f"{path} lacks the dataset {name!r}")
            return tuple(int(n) for n in h5[name].shape)
    except OSError as err:
        raise BrainITError(f"{path} is not a readable HDF5 file ({err})") from err


# --------------------------------------------------------------------------------------------- betas
def _write_subject(path: Path, betas_path: Path, subject: int, trials: dict[str, np.ndarray]) -> None:
    """Copy the referenced betas rows session by session (one session in RAM) into a subject file."""
    g, sessions = trials["global_trial"], trials["session"]
    starts = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1]])
    ends = np.r_[starts[1:], len(g)]
    with h5py.File(betas_path, "r") as h5:
        dset = h5["betas"]
        n_voxels = dset.shape[1]
        with SubjectStoreWriter(
            path,
            subject=subject,
            n_trials=len(g),
            n_voxels=n_voxels,
            space="mindeye2",
            trials_per_session=NSD_TRIALS_PER_SESSION,
            source=f"mindeye2 {betas_path}",
        ) as writer:
            for a, b in tqdm(
                list(zip(starts, ends)), desc=f"subj{subject:02d} betas", unit="session", disable=None
            ):
                rows = g[a:b]
                block = dset[rows[0] : rows[-1] + 1][rows - rows[0]]  # (n, V): one slice, then pick rows
                bad = ~(np.isfinite(block) & (np.abs(block) < FLOAT16_MAX)).all(axis=1)
                if bad.any():
                    raise BrainITError(
                        f"{betas_path}: row {int(rows[bad][0])} has NaN, inf or values beyond float16 range "
                        f"({int(bad.sum())} bad rows in session {int(sessions[a])})"
                    )
                writer.write_betas(int(a), block)
            writer.write_trials(trials)
            # MindEye2's release has no voxel geometry: index in column 0, "no geometry" elsewhere.
            ijk = np.stack([np.arange(n_voxels), np.full(n_voxels, -1), np.full(n_voxels, -1)], axis=1)
            writer.write_voxels(ijk, np.zeros((n_voxels, 3), dtype=np.float32))


# --------------------------------------------------------------------------------------------- job
def prepare_mindeye2(root: Path, out: Path, subjects: list[int] | None) -> None:
    """Write a complete store at ``out`` from MindEye2's release folder ``root``.

    Files, shards and trial tables are validated before the first byte is written (the betas values
    are checked as they stream); the manifest is written last, so a failure leaves no manifest (and
    the caller discards its temporary folder).

    Args:
        root: the release folder (see the module docstring for the files it must hold).
        out: an existing, empty folder; receives ``subjNN.h5``, ``images.h5``, ``manifest.json``.
        subjects: 1-based subjects to convert; ``None`` = every subject with a betas file.

    Raises:
        BrainITError: a missing or malformed file (named), a subject not in the release, a behav row
            outside the betas, NaN or inf betas.
    """
    root, out = Path(root), Path(out)
    require(root.is_dir(), f"MindEye2 release folder {root} not found")
    present = release_subjects(root)
    if subjects is None:
        require(bool(present), f"no MindEye2 betas ({BETAS_FILE.format(subject=1)}, ...) in {root}")
        subjects = present
    subjects = sorted(set(int(s) for s in subjects))
    require(bool(subjects), "no subjects to prepare")
    for s in subjects:
        require(
            s in present,
            f"subject {s} is not in the MindEye2 release at {root}: {BETAS_FILE.format(subject=s)} not found "
            f"(subjects present: {present})",
        )
    images_path = root / IMAGES_FILE
    images_shape = _dataset_shape(images_path, "images")
    require(
        len(images_shape) == 4 and images_shape[1:] == (3, 224, 224),
        f"{images_path}: dataset 'images' has shape {images_shape}, expected (73000, 3, 224, 224)",
    )

    plans = {}
    for s in subjects:  # validate everything before writing anything
        betas_path = root / BETAS_FILE.format(subject=s)
        shape = _dataset_shape(betas_path, "betas")
        require(
            len(shape) == 2, f"{betas_path}: dataset 'betas' has shape {shape}, expected (trials, voxels)"
        )
        n_rows, n_voxels = shape
        trials = read_trials(root, s, n_rows, n_images=images_shape[0])
        plans[s] = (betas_path, trials, n_voxels)
        n_trials, n_shared = len(trials["nsd_id"]), int(trials["shared"].sum())
        log.info(
            "subject %d: %d of %d betas rows are trials (%d shared), %d voxels",
            s,
            n_trials,
            n_rows,
            n_shared,
            n_voxels,
        )

    entries = {}
    for s, (betas_path, trials, n_voxels) in plans.items():
        _write_subject(out / subject_filename(s), betas_path, s, trials)
        entries[s] = {
            "file": subject_filename(s),
            "n_trials": len(trials["nsd_id"]),
            "n_voxels": n_voxels,
            "n_sessions": len(np.unique(trials["session"])),
            "space": "mindeye2",
        }
    ids = np.unique(np.concatenate([trials["nsd_id"] for _, trials, _ in plans.values()]))
    with tqdm(total=len(ids), desc="images", unit="image", disable=None) as progress:
        write_images(
            out / "images.h5", ids, _image_source(images_path, progress), source=f"mindeye2 {images_path}"
        )
    write_manifest(
        out,
        entries,
        images={"file": "images.h5", "n_images": len(ids)},
        source={
            "kind": "mindeye2",
            "root": str(root),
            "subjects": subjects,
            "betas": "as released: z-scored by MindEye2, stored as float16",
            "voxels": "no geometry (ijk = voxel index, -1, -1; xyz = 0)",
        },
    )
    log.info("wrote a MindEye2 store at %s: subjects %s, %d images", out, subjects, len(ids))
