"""Read a raw NSD root (real or simulated) or MindEye2's preprocessed release into a streaming store.

The store written at --out (format v1; see brainit_pl/data/store.py):
  manifest.json   subjects, images, source (raw NSD or MindEye2, root, sessions, brainit-pl version);
                  written last, so a folder with a manifest is complete
  subjNN.h5       betas (trials x voxels, float16, z-scored per session per voxel, one chunk per trial),
                  the trial table (73k id, session, trial, global trial, shared/test flag, repeat 0/1/2),
                  voxel indices, coordinates (mm), the volume affine and the noise-ceiling SNR if present
  images.h5       every image a chosen subject saw, 224x224 and 112x112 uint8 (anti-aliased resizing), and
                  256x256 from stimuli of at least that size (the 425² NSD ones: stage 2's input)

Raw NSD: betas_fithrf_GLMdenoise_RR / 300 (percent signal change) at the nsdgeneral ROI voxels
(func1pt8mm), or at the fsaverage vertices of --surface-mask (--space fsaverage). Test trials are those of
the shared1000 images. Sessions are read one at a time, so memory stays at one session of one subject.
The store is built in a hidden temporary folder next to --out and renamed into place only when complete;
a failure leaves nothing behind.

examples:
  brainit-pl prepare --nsd-root /data/nsd --out store/nsd --subjects 1 2 5 7
  brainit-pl prepare --nsd-root /data/nsd --out store/subj01_1h --subjects 1 --sessions 1
  brainit-pl prepare --mindeye2-root /data/mindeye2 --out store/me2 --subjects 1
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainit_pl import __version__
from brainit_pl.data.nsd import NSDReader, check_betas, zscore_session
from brainit_pl.data.store import ImageStore, subject_filename
from brainit_pl.data.store_writer import SubjectStoreWriter, write_images, write_manifest
from brainit_pl.errors import require
from brainit_pl.files import atomic_path, output_lock

log = logging.getLogger(__name__)
SPACES = ("func1pt8mm", "fsaverage")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``brainit-pl prepare``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--nsd-root",
        type=Path,
        metavar="DIR",
        help="raw NSD root (holds nsddata/, nsddata_betas/, nsddata_stimuli/), real or from `brainit-pl simulate`",
    )
    source.add_argument(
        "--mindeye2-root",
        type=Path,
        metavar="DIR",
        help="MindEye2's preprocessed release (betas_all_subj0X_fp32_renorm.hdf5, coco_images_224_float16.hdf5, wds/)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="STORE", help="the store folder to write")
    parser.add_argument(
        "--subjects",
        type=int,
        nargs="+",
        metavar="N",
        help="subjects to include, e.g. 1 2 5 7 (default: all found)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        help="use each subject's first N sessions on disk (default: all; one session = 750 trials ~ 1 hour). "
        "Repeats and test trials are counted within these sessions",
    )
    parser.add_argument(
        "--space",
        choices=SPACES,
        default="func1pt8mm",
        help="func1pt8mm: volumetric nsdgeneral ROI voxels (default); fsaverage: surface vertices of --surface-mask",
    )
    parser.add_argument(
        "--surface-mask",
        type=Path,
        metavar="FILE",
        help="vertex mask over fsaverage lh+rh (e.g. the Algonauts-2023 mask); required with --space fsaverage",
    )
    parser.add_argument(
        "--fsaverage-surf",
        type=Path,
        metavar="DIR",
        help="with --space fsaverage: fsaverage surf/ folder (lh.pial, rh.pial) for vertex coordinates "
        "(default: none stored, so no anatomical clustering baseline)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")


def run(args: argparse.Namespace) -> int:
    """Run ``brainit-pl prepare`` with parsed ``args``."""
    prepare(
        args.nsd_root,
        args.out,
        args.subjects,
        sessions=args.sessions,
        space=args.space,
        surface_mask=args.surface_mask,
        fsaverage_surf=args.fsaverage_surf,
        mindeye2_root=args.mindeye2_root,
        overwrite=args.overwrite,
    )
    return 0


@dataclass
class _SubjectPlan:
    """Everything checked before a byte is written: sessions, trial table, ROI."""

    subject: int
    sessions: list[int]
    trials: dict[str, np.ndarray]
    mask: np.ndarray  # (X, Y, Z) bool, or (n_lh + n_rh,) bool vertex mask for fsaverage
    affine: np.ndarray | None


def prepare(
    nsd_root: Path | None,
    out: Path,
    subjects: list[int] | None = None,
    *,
    sessions: int | None = None,
    space: str = "func1pt8mm",
    surface_mask: Path | None = None,
    fsaverage_surf: Path | None = None,
    mindeye2_root: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a streaming store at ``out`` from a raw NSD root or MindEye2's release (exactly one of them).

    Args:
        nsd_root: raw NSD root (real or simulated).
        out: the store folder; built next to it under a temporary name and renamed when complete.
        subjects: 1-based subjects (default: all found).
        sessions: use each subject's first ``sessions`` sessions on disk (default: all).
        space: ``"func1pt8mm"`` (nsdgeneral voxels) or ``"fsaverage"`` (vertices of ``surface_mask``).
        surface_mask: vertex mask file, required with ``space="fsaverage"``.
        fsaverage_surf: fsaverage surface folder (FreeSurfer ``surf/`` with ``lh.pial``, or GIFTI) for the
            vertices' coordinates; without it a surface store has no geometry (xyz = 0), so the anatomical
            clustering baseline cannot run on it.
        mindeye2_root: MindEye2's preprocessed release instead of ``nsd_root``.
        overwrite: replace an existing store at ``out``.

    Returns:
        ``out``.

    Raises:
        BrainITError: any bad input (missing file, unknown subject, wrong trial count, mask/volume shape
            mismatch, NaN/inf betas, a subject without training trials, an existing ``out``).
    """
    require(
        (nsd_root is None) != (mindeye2_root is None), "give exactly one of --nsd-root and --mindeye2-root"
    )
    out = Path(out)
    with output_lock(out):
        _check_out(out, overwrite)
        if mindeye2_root is not None:
            return _prepare_mindeye2(Path(mindeye2_root), out, subjects, sessions, space, surface_mask)
        require(space in SPACES, f"--space must be one of {SPACES}, got {space!r}")
        require(sessions is None or sessions >= 1, f"--sessions must be at least 1, got {sessions}")
        require(
            (space == "fsaverage") == (surface_mask is not None),
            "--surface-mask goes with --space fsaverage (and --space fsaverage needs it)",
        )
        require(
            fsaverage_surf is None or space == "fsaverage", "--fsaverage-surf goes with --space fsaverage"
        )
        reader = NSDReader(nsd_root)
        plans = _plan(reader, subjects, sessions, space, surface_mask)
        with atomic_path(out, is_dir=True) as tmp:
            entries = {}
            # disable=None: bars on a terminal only, so logs and captured stderr hold just the messages
            with tqdm(
                total=sum(len(p.sessions) for p in plans), desc="prepare", unit="session", disable=None
            ) as bar:
                for plan in plans:
                    entries[plan.subject] = _write_subject(
                        reader, plan, space, tmp / subject_filename(plan.subject), bar, fsaverage_surf
                    )
            ids = np.unique(np.concatenate([p.trials["nsd_id"] for p in plans]))
            with tqdm(total=len(ids), desc="images", unit="image", disable=None) as bar:

                def images(batch: np.ndarray) -> dict[int, np.ndarray]:
                    block = reader.images(batch)
                    bar.update(len(batch))
                    return block

                write_images(tmp / "images.h5", ids, images, source="raw")
            written = ImageStore(tmp / "images.h5")  # 224², 112² and, from the 425² stimuli, 256²
            write_manifest(
                tmp,
                entries,
                images={"file": "images.h5", "n_images": len(ids), "sizes": list(written.sizes)},
                source={
                    "kind": "raw",
                    "root": str(Path(nsd_root).resolve()),
                    "space": space,
                    "sessions": sessions if sessions is not None else "all",
                    "brainit_pl_version": __version__,
                },
            )
        log.info("wrote the store %s: subjects %s, %d images", out, [p.subject for p in plans], len(ids))
        return out


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    require(overwrite, f"{out} already exists; pass --overwrite to replace it")
    # Refuse to delete anything that is not a store we wrote (a mistyped --out must not wipe a folder).
    require(
        out.is_dir() and ((out / "manifest.json").is_file() or not any(out.iterdir())),
        f"{out} exists and is not a brainit-pl store (no manifest.json); refusing to replace it",
    )


def _prepare_mindeye2(root: Path, out: Path, subjects, sessions, space, surface_mask) -> Path:
    require(
        sessions is None and space == "func1pt8mm" and surface_mask is None,
        "--sessions, --space and --surface-mask apply to a raw NSD root, not to --mindeye2-root",
    )
    require(root.is_dir(), f"MindEye2 root {root} not found")
    from brainit_pl.data.mindeye2 import prepare_mindeye2

    with atomic_path(out, is_dir=True) as tmp:
        prepare_mindeye2(root, tmp, subjects)
    log.info("wrote the store %s from MindEye2's release %s", out, root)
    return out


def _plan(reader: NSDReader, subjects, sessions, space, surface_mask) -> list[_SubjectPlan]:
    """Validate the request against the tree (cheap: no betas are read) and fix what each subject gets."""
    layout = reader.layout
    design = reader.expdesign  # raises if the expdesign file is missing or inconsistent
    require(layout.stimuli.is_file(), f"NSD stimuli {layout.stimuli} not found")
    n_stimuli = reader.n_stimuli()
    found = reader.subjects()
    require(found, f"no subject found under {layout.root / 'nsddata_betas/ppdata'} (expected subjNN folders)")
    subjects = list(found if subjects is None else subjects)
    require(subjects, "no subjects to prepare (--subjects is empty)")
    unknown = [s for s in subjects if s not in found]
    require(not unknown, f"subject(s) {unknown} not found in {layout.root} (found subjects {found})")
    require(len(set(subjects)) == len(subjects), f"--subjects lists a subject twice: {subjects}")
    vertex_mask = None
    if space == "fsaverage":
        from brainit_pl.data.surface import load_vertex_mask

        vertex_mask = load_vertex_mask(Path(surface_mask))
    plans = []
    for subject in subjects:
        on_disk = reader.sessions(subject, space)
        require(
            on_disk,
            f"subject {subject} has no {space} betas session under {layout.betas_dir(subject, space)}",
        )
        require(
            sessions is None or sessions <= len(on_disk),
            f"--sessions {sessions} asked, but subject {subject} has {len(on_disk)} session(s) on disk "
            f"({layout.betas_dir(subject, space)})",
        )
        chosen = on_disk[: sessions or len(on_disk)]
        trials = reader.trial_table(subject, chosen)
        n_test = int(trials["shared"].sum())
        # An empty test split is legitimate for a limited-data subset (e.g. the first hour of a new subject);
        # an empty training split leaves nothing to train on for this subject: refuse it.
        require(
            n_test < len(trials["shared"]),
            f"subject {subject}: sessions {chosen} hold only shared (test) images; the training split would be empty",
        )
        if n_test == 0:
            log.warning(
                "subject %d: no shared-image (test) trial in sessions %s; its test split is empty",
                subject,
                chosen,
            )
        top = int(trials["nsd_id"].max())
        require(
            top < n_stimuli, f"subject {subject} saw image {top}, but {layout.stimuli} has {n_stimuli} images"
        )
        if vertex_mask is None:
            mask, affine = reader.roi_mask(subject)
        else:
            mask, affine = vertex_mask, None
        plans.append(_SubjectPlan(subject, chosen, trials, mask, affine))
    log.info("%d trials per session; %d shared images", design.trials_per_session, design.n_shared)
    return plans


def _write_subject(
    reader: NSDReader, plan: _SubjectPlan, space: str, path: Path, bar: tqdm, surf_dir: Path | None = None
) -> dict:
    """Stream one subject's sessions into ``path``; returns its manifest entry."""
    tps = reader.expdesign.trials_per_session
    if space == "func1pt8mm":
        ijk, xyz = reader.voxel_table(plan.mask, plan.affine)

        def read(session: int) -> np.ndarray:
            return reader.session_betas(plan.subject, session, plan.mask)
    else:
        from brainit_pl.data.surface import read_surface_session, vertex_table

        ijk, xyz = vertex_table(plan.mask, surf_dir)

        def read(session: int) -> np.ndarray:
            betas = read_surface_session(reader.layout, plan.subject, session, plan.mask)
            check_betas(betas, reader.layout.betas_mgh(plan.subject, session, "lh"), tps)
            return betas

    n_trials = len(plan.trials["nsd_id"])
    with SubjectStoreWriter(
        path,
        subject=plan.subject,
        n_trials=n_trials,
        n_voxels=len(ijk),
        space=space,
        trials_per_session=tps,
        source="raw",
    ) as writer:
        for n, session in enumerate(plan.sessions):
            bar.set_postfix(subject=plan.subject, session=session)
            betas = read(session)  # (T, V) float32, one session only in RAM
            writer.write_betas(n * tps, zscore_session(betas, f"subject {plan.subject} session {session}"))
            bar.update()
        writer.write_trials(plan.trials)
        volume_shape = plan.mask.shape if space == "func1pt8mm" else None
        writer.write_voxels(ijk, xyz, plan.affine, volume_shape)
        ncsnr = reader.ncsnr(plan.subject, plan.mask) if space == "func1pt8mm" else None
        if ncsnr is not None:
            writer.write_ncsnr(ncsnr)
    return {
        "file": path.name,
        "n_voxels": len(ijk),
        "n_trials": n_trials,
        "n_sessions": len(plan.sessions),
        "sessions": plan.sessions,
        "space": space,
    }
