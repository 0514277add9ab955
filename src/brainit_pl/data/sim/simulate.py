"""Write a simulated NSD: the raw NSD file layout, from a brain model whose truth is known.

The tree under OUT has NSD's paths (see ``brainit_pl.data.layout.NSDLayout``): per subject
``betas_sessionNN.nii.gz`` (int16, percent signal change x 300) with its ``.hdf5`` twin, ``ncsnr.nii.gz``,
``nsdgeneral.nii.gz`` and ``responses.tsv``; shared ``nsd_expdesign.mat``, ``nsd_stim_info_merged.csv``
and ``nsd_stimuli.hdf5``. The ground truth (voxel types, areas, pRFs, true ncsnr, noise-free responses,
what every image shows) goes to OUT/simulation/. Everything is written into a temporary folder beside
OUT and renamed into place at the end, so an interrupted run leaves nothing. The same seed gives the
same arrays.

Model, in short (details in the modules of this package): voxels of a warped MNI152 posterior grey-matter region
(anatomy); visual areas with retinotopic pRFs and functional types shared by all subjects
(brain) pooling luminance, colour, Gabor energy, edges and the coverage of known content
(features) of composed photographs and shapes (stimuli); NSD's experiment design (design);
trial beta = session_gain x (response + noise) + session_offset, noise sd = amplitude / ncsnr.

examples:
  brainit-pl simulate --out sim/nsd --preset tiny
  brainit-pl simulate --out sim/full --preset full --subjects 1 --overwrite
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from brainit_pl.data.layout import NSD_BETA_SCALE, NSDLayout
from brainit_pl.data.sim.anatomy import build_anatomy
from brainit_pl.data.sim.brain import N_FIELDS, build_brain, type_weights
from brainit_pl.data.sim.design import (
    build_design,
    trial_table,
    write_expdesign,
    write_responses,
    write_stim_info,
)
from brainit_pl.data.sim.features import feature_maps
from brainit_pl.data.sim.presets import PRESETS, SimPreset, get_preset
from brainit_pl.data.sim.stimuli import generate_stimuli
from brainit_pl.data.sim.truth import SubjectTruth, write_truth
from brainit_pl.errors import BrainITError, require
from brainit_pl.files import atomic_path

log = logging.getLogger(__name__)

# Independent random streams: (seed, tag, ...) keys, so each part is reproducible on its own.
_DESIGN, _TYPES, _ANATOMY, _BRAIN, _SESSION, _NOISE, _INFO = range(7)
IMAGE_CHUNK = 256  # images generated (and their features pooled) per step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``brainit-pl simulate`` options."""
    parser.add_argument(
        "--out", type=Path, required=True, help="NSD root to create (must be empty or absent)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size (default: tiny)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed, same arrays (default: 0)"
    )
    parser.add_argument("--subjects", type=int, default=None, help="keep the first N subjects of the preset")
    parser.add_argument(
        "--sessions", type=int, default=None, help="cap (or set) every subject's sessions at N"
    )
    parser.add_argument("--image-size", type=int, default=None, help="override the stimulus side in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    parser.add_argument(
        "--no-preview",
        action="store_true",
        help="skip the pictures (OUT/simulation/preview_*.png: stimuli, each subject's areas and ncsnr)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments."""
    simulate(
        args.out,
        args.preset,
        args.seed,
        subjects=args.subjects,
        sessions=args.sessions,
        image_size=args.image_size,
        overwrite=args.overwrite,
    )
    if not args.no_preview:
        write_previews(args.out)
    return 0


def write_previews(root: Path | str, n_images: int = 16) -> None:
    """Pictures of a simulated tree: the first stimuli, and per subject its areas and true ncsnr on the brain."""
    import nibabel as nib

    from brainit_pl.viz import plot_voxel_map, save_image_grid

    layout, sim = NSDLayout(Path(root)), Path(root) / "simulation"
    with h5py.File(layout.stimuli, "r") as f:
        images = f["imgBrick"][:n_images]
    half = max(len(images) // 2, 1)
    rows = [images[:half], images[half : 2 * half]] if len(images) >= 2 else [images]
    save_image_grid(sim / "preview_stimuli.png", rows, size=128)
    areas = json.loads((sim / "truth.json").read_text())["areas"]
    for subject in layout.subjects_on_disk():
        roi = nib.load(layout.nsdgeneral(subject))
        truth = np.load(sim / f"subj{subject:02d}.npz")
        plot_voxel_map(
            sim / f"preview_subj{subject:02d}_areas.png",
            truth["area"],
            truth["ijk"],
            roi.shape,
            roi.affine,
            categorical=True,
            title=f"subj{subject:02d} areas: " + " ".join(areas),
        )
        plot_voxel_map(
            sim / f"preview_subj{subject:02d}_ncsnr.png",
            truth["ncsnr"],
            truth["ijk"],
            roi.shape,
            roi.affine,
            title=f"subj{subject:02d} true ncsnr",
        )
    log.info("pictures: %s/preview_*.png", sim)


def simulate(
    out: Path | str,
    preset: str = "tiny",
    seed: int = 0,
    *,
    subjects: int | None = None,
    sessions: int | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a simulated NSD tree at ``out`` and return its root.

    Args:
        out: the NSD root to create.
        preset: ``tiny``, ``demo`` or ``full`` (see :mod:`~brainit_pl.data.sim.presets`).
        seed: random seed (non-negative).
        subjects, sessions, image_size: overrides of the preset (see ``SimPreset.with_overrides``).
        overwrite: replace an existing non-empty ``out``.

    Raises:
        BrainITError: ``out`` exists and is not empty (without ``overwrite``), or is a file; bad sizes.
    """
    out = Path(out)
    require(seed >= 0, f"--seed must be >= 0, got {seed}")
    config = get_preset(preset).with_overrides(subjects=subjects, sessions=sessions, image_size=image_size)
    require(not out.exists() or out.is_dir(), f"--out {out} exists and is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BrainITError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    started = time.perf_counter()
    with atomic_path(out, is_dir=True) as tmp:
        _write_tree(tmp, config, seed)
    log.info(
        "simulated NSD (%s, seed %d) written to %s in %.1f s",
        config.name,
        seed,
        out,
        time.perf_counter() - started,
    )
    return out


def _write_tree(root: Path, p: SimPreset, seed: int) -> None:
    layout = NSDLayout(root)
    design = build_design(p, np.random.default_rng([seed, _DESIGN]))
    for path in (layout.expdesign, layout.stimuli):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_expdesign(layout.expdesign, design)
    write_stim_info(layout.stim_info, design, p, np.random.default_rng([seed, _INFO]))
    weights, deviations = type_weights(np.random.default_rng([seed, _TYPES]))

    subjects = []
    for s in range(1, p.n_subjects + 1):
        anatomy = build_anatomy(np.random.default_rng([seed, _ANATOMY, s]), p.voxel_mm, n_fields=N_FIELDS)
        require(anatomy.n_voxels > 0, f"subject {s}: no ROI voxels at voxel_mm={p.voxel_mm}")
        brain = build_brain(anatomy, np.random.default_rng([seed, _BRAIN, s]))
        subjects.append(
            SubjectTruth(
                s, anatomy, brain, design.subjectim[s - 1] - 1, root / "simulation", p.sessions[s - 1]
            )
        )
    log.info("subjects: %s ROI voxels", ", ".join(str(t.anatomy.n_voxels) for t in subjects))

    content = _write_stimuli(layout, p, seed, subjects, weights, deviations)
    for truth in subjects:
        truth.standardise()
        _write_subject(layout, p, seed, design, truth)
    write_truth(root / "simulation", p, seed, subjects, content, weights, deviations)


def _write_stimuli(
    layout: NSDLayout,
    p: SimPreset,
    seed: int,
    subjects: list[SubjectTruth],
    weights: np.ndarray,
    deviations: np.ndarray,
) -> list[dict]:
    """Generate every image into ``imgBrick`` and pool its features into each subject's raw responses."""
    size, content = p.image_size, []
    with h5py.File(layout.stimuli, "w") as f:
        brick = f.create_dataset(
            "imgBrick", shape=(p.n_images, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3)
        )
        chunks = range(0, p.n_images, IMAGE_CHUNK)
        for start in tqdm(chunks, desc="stimuli", unit="chunk", disable=None):
            ids = np.arange(start, min(start + IMAGE_CHUNK, p.n_images))
            batch = generate_stimuli(ids, seed=seed, size=size, feature_size=p.feature_size)
            brick[ids[0] : ids[-1] + 1] = batch.images
            maps = feature_maps(batch.small, batch.category_maps)  # (n, F, P, P)
            for truth in subjects:
                rows, local = truth.rows_of(ids)
                if len(rows):
                    truth.raw[rows] = truth.brain.raw_responses(maps[local], weights, deviations)
            content.extend(batch.content)
    return content


def _nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_subject(layout: NSDLayout, p: SimPreset, seed: int, design, truth: SubjectTruth) -> None:
    """nsdgeneral, ncsnr, responses.tsv and every session's betas (one session in memory at a time)."""
    s, anat, brain = truth.subject, truth.anatomy, truth.brain
    _nifti(anat.nsdgeneral, anat.affine, layout.nsdgeneral(s))
    ncsnr = np.zeros(anat.shape, np.float32)
    ncsnr[tuple(anat.ijk.T)] = brain.ncsnr
    _nifti(ncsnr, anat.affine, layout.ncsnr(s))
    table = trial_table(design, p, s)
    layout.responses(s).parent.mkdir(parents=True, exist_ok=True)
    write_responses(layout.responses(s), table, s)

    tps, v = p.trials_per_session, anat.n_voxels
    noise_sd = brain.noise_sd
    for session in tqdm(
        range(1, p.sessions[s - 1] + 1), desc=f"subj{s:02d} betas", unit="session", disable=None
    ):
        rng = np.random.default_rng([seed, _SESSION, s, session])
        # per-session scanner drift: a global gain/offset plus voxel-wise scatter (why z-scoring matters)
        gain = np.exp(rng.normal(0, 0.15) + rng.normal(0, 0.15, v)).astype(np.float32)
        offset = (rng.normal(0, 0.5) + rng.normal(0, 0.5, v)).astype(np.float32)
        truth.session_gain[session - 1], truth.session_offset[session - 1] = gain, offset
        cols = table["column"][(session - 1) * tps : session * tps] - 1  # rows of the subject's images
        noise = np.random.default_rng([seed, _NOISE, s, session]).standard_normal((tps, v), np.float32)
        beta = gain * (truth.responses[cols] + noise * noise_sd) + offset  # (T, V) percent signal change
        scaled = np.clip(np.rint(beta * NSD_BETA_SCALE), -32768, 32767).astype(np.int16)
        vol = np.zeros((*anat.shape, tps), np.int16)  # (X, Y, Z, T)
        vol[tuple(anat.ijk.T)] = scaled.T
        _nifti(vol, anat.affine, layout.betas_nifti(s, session))
        with h5py.File(layout.betas_hdf5(s, session), "w") as f:
            x, y, z = anat.shape
            f.create_dataset(
                "betas",
                data=vol.transpose(3, 2, 1, 0),
                chunks=(1, z, y, x),
                compression="gzip",
                compression_opts=1,
            )  # (T, Z, Y, X) as NSD's twin
