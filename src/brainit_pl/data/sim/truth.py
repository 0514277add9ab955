"""The ground truth written beside a simulated NSD, in OUT/simulation/.

Files:

* ``truth.json``: ``format`` ("brainit-pl-simulation"), ``version``, ``preset``, ``seed``, ``sizes``
  (subjects, sessions per subject, trials per session, runs, images, shared images, image and feature
  sizes, voxel size, ROI voxels per subject), the names of ``areas``, ``types``, ``features`` and
  ``categories``, ``type_features`` (each type's named feature weights), ``area_types`` (each area's type
  mix) and ``noise_ceiling`` (the formula).
* ``model.npz``: ``type_weights`` (n_types, n_features) and ``deviation_directions`` (3, n_features), the
  response model's shared weights (feature order = ``truth.json`` ``features``).
* ``subjNN.npz`` (V = ROI voxels, in ``np.argwhere(nsdgeneral > 0)`` order; I = the subject's images):
  ``ijk`` (V, 3) int32; ``xyz`` (V, 3) float32 scanner mm; ``template_xyz`` (V, 3) MNI mm;
  ``affine`` (4, 4); ``area`` (V,) int16 and ``type`` (V,) int16 (indices into the names);
  ``prf_xy`` (V, 2) and ``prf_size`` (V,) float32 (image half-width units, y up); ``ncsnr`` (V,) (equal to
  ncsnr.nii.gz there); ``amplitude``, ``baseline``, ``noise_sd`` (V,) in percent signal change;
  ``deviation`` (V, 3); ``raw_mean``, ``raw_std`` (V,) (the standardisation of the pooled features);
  ``nsd_ids`` (I,) int32, 0-based, = subjectim row - 1; ``responses`` (I, V) float32 noise-free responses
  in beta units (percent signal change, before x 300 and before the session gain/offset), row i for image
  ``nsd_ids[i]``; ``session_gain``, ``session_offset`` (sessions, V) float32: trial beta =
  gain x (response + noise) + offset.
* ``stimuli.json``: one entry per 73k id: ``layers`` (kind, source, box, categories, back to front) and
  ``coverage`` (visible fraction of the image per category).

:func:`true_responses` rebuilds a subject's model from these files and gives its noise-free responses to
any generated image (the external images included), e.g. to score synthetic fMRI against the truth.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from brainit_pl import __version__
from brainit_pl.data.sim.anatomy import SubjectAnatomy
from brainit_pl.data.sim.brain import AREA_TYPES, AREAS, TYPE_FEATURES, TYPES, SubjectBrain
from brainit_pl.data.sim.features import FEATURES, feature_maps
from brainit_pl.data.sim.presets import SimPreset
from brainit_pl.data.sim.sources import CATEGORIES
from brainit_pl.data.sim.stimuli import EXTERNAL_STREAM, generate_stimuli
from brainit_pl.errors import require

TRUTH_FORMAT, TRUTH_VERSION = "brainit-pl-simulation", 1


class SubjectTruth:
    """One subject's model and the arrays filled while simulating it.

    ``raw`` (I, V) collects the pooled responses image chunk by image chunk; it is a memory-mapped file
    in a scratch folder, so the full preset (10000 x 15k per subject) never has to sit in RAM.
    """

    def __init__(
        self,
        subject: int,
        anatomy: SubjectAnatomy,
        brain: SubjectBrain,
        nsd_ids: np.ndarray,
        folder: Path,
        n_sessions: int,
    ) -> None:
        self.subject, self.anatomy, self.brain = subject, anatomy, brain
        self.nsd_ids = np.asarray(nsd_ids, np.int64)
        self._scratch = folder / ".scratch"
        self._scratch.mkdir(parents=True, exist_ok=True)
        shape = (len(self.nsd_ids), anatomy.n_voxels)
        self.raw = np.lib.format.open_memmap(
            self._scratch / f"subj{subject:02d}.npy", "w+", np.float32, shape
        )
        self.responses = self.raw  # standardised in place by standardise()
        self.raw_mean = self.raw_std = np.zeros(0, np.float32)
        self.session_gain = np.zeros((n_sessions, anatomy.n_voxels), np.float32)
        self.session_offset = np.zeros_like(self.session_gain)
        self._pos = np.full(int(self.nsd_ids.max()) + 1, -1, np.int64)
        self._pos[self.nsd_ids] = np.arange(len(self.nsd_ids))

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For 0-based image ids, (rows in this subject's image list, positions in ``ids``) of those it saw."""
        ids = np.asarray(ids)
        pos = np.full(len(ids), -1, np.int64)
        ok = ids < len(self._pos)
        pos[ok] = self._pos[ids[ok]]
        local = np.flatnonzero(pos >= 0)
        return pos[local], local

    def standardise(self) -> None:
        """raw -> baseline + amplitude x z-score over the subject's images (in place, column blocks)."""
        v = self.anatomy.n_voxels
        self.raw_mean, self.raw_std = np.zeros(v, np.float32), np.zeros(v, np.float32)
        for a in range(0, v, 2048):
            block = np.asarray(self.raw[:, a : a + 2048], np.float64)
            mean, std = block.mean(0), np.maximum(block.std(0), 1e-8)
            self.raw_mean[a : a + 2048], self.raw_std[a : a + 2048] = mean, std
            z = (block - mean) / std
            b = self.brain
            self.raw[:, a : a + 2048] = b.baseline[a : a + 2048] + b.amplitude[a : a + 2048] * z

    def arrays(self) -> dict[str, np.ndarray]:
        a, b = self.anatomy, self.brain
        xyz = a.ijk @ a.affine[:3, :3].T + a.affine[:3, 3]
        return {
            "ijk": a.ijk.astype(np.int32), "xyz": xyz.astype(np.float32),
            "template_xyz": a.template_xyz.astype(np.float32), "affine": a.affine,
            "area": b.area, "type": b.type, "prf_xy": b.prf_xy, "prf_size": b.prf_size, "ncsnr": b.ncsnr,
            "amplitude": b.amplitude, "baseline": b.baseline, "noise_sd": b.noise_sd, "deviation": b.deviation,
            "raw_mean": self.raw_mean, "raw_std": self.raw_std, "nsd_ids": self.nsd_ids.astype(np.int32),
            "responses": self.responses, "session_gain": self.session_gain, "session_offset": self.session_offset,
        }  # fmt: skip

    def close(self) -> None:
        """Drop the scratch memory map (after the arrays were saved)."""
        self.raw.flush()
        del self.raw, self.responses
        shutil.rmtree(self._scratch, ignore_errors=True)


def write_truth(
    folder: Path,
    p: SimPreset,
    seed: int,
    subjects: list[SubjectTruth],
    content: list[dict],
    weights: np.ndarray,
    deviations: np.ndarray,
) -> None:
    """Write truth.json, model.npz, subjNN.npz and stimuli.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {k: v for k, v in asdict(p).items() if k != "name"}
    sizes.update(
        n_subjects=p.n_subjects,
        n_images=p.n_images,
        n_images_per_subject=p.n_images_per_subject,
        n_voxels={t.subject: t.anatomy.n_voxels for t in subjects},
    )
    meta = {
        "format": TRUTH_FORMAT, "version": TRUTH_VERSION, "brainit_pl_version": __version__,
        "preset": p.name, "seed": seed, "sizes": sizes,
        "areas": list(AREAS), "types": list(TYPES), "features": list(FEATURES), "categories": list(CATEGORIES),
        "type_features": TYPE_FEATURES, "area_types": AREA_TYPES,
        "noise_ceiling": "100 * ncsnr^2 / (ncsnr^2 + 1/n_repeats_averaged) percent",
    }  # fmt: skip
    (folder / "truth.json").write_text(json.dumps(meta, indent=1, sort_keys=False))
    np.savez(folder / "model.npz", type_weights=weights, deviation_directions=deviations)
    for t in subjects:
        np.savez(folder / f"subj{t.subject:02d}.npz", **t.arrays())
        t.close()
    (folder / "stimuli.json").write_text(json.dumps(content, separators=(",", ":")))


# ------------------------------------------------------------------------------------------- reading
def load_brain(sim_root: Path | str, subject: int) -> tuple[SubjectBrain, dict[str, np.ndarray]]:
    """Rebuild one subject's :class:`SubjectBrain` from ``SIM_ROOT/simulation/subjNN.npz``.

    Returns:
        The brain and all the subject's truth arrays (see the module docstring).
    """
    path = Path(sim_root) / "simulation" / f"subj{subject:02d}.npz"
    require(path.is_file(), f"{path} not found: is {sim_root} a tree written by `brainit-pl simulate`?")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    fields = ("area", "type", "prf_xy", "prf_size", "ncsnr", "amplitude", "baseline", "deviation")
    return SubjectBrain(**{k: arrays[k] for k in fields}), arrays


def true_responses(
    sim_root: Path | str, subject: int, ids: np.ndarray, *, stream: int = EXTERNAL_STREAM, batch: int = 256
) -> np.ndarray:
    """Noise-free responses of one simulated subject to generated images (e.g. the external ones).

    The images are regenerated from the simulation's seed (image ``i`` of ``stream``: for
    ``EXTERNAL_STREAM`` the images :func:`~brainit_pl.data.sim.stimuli.make_external_images` returns
    with that seed; for ``TREE_STREAM`` the tree's 73k ids) and passed through the subject's model.

    Args:
        sim_root: the simulated NSD root.
        subject: 1-based subject.
        ids: (N,) image indices within ``stream``.

    Returns:
        (N, V) float32 in beta units (percent signal change), comparable to ``subjNN.npz`` ``responses``.
    """
    meta = json.loads((Path(sim_root) / "simulation" / "truth.json").read_text())
    brain, arrays = load_brain(sim_root, subject)
    with np.load(Path(sim_root) / "simulation" / "model.npz") as f:
        weights, deviations = f["type_weights"], f["deviation_directions"]
    sizes, ids = meta["sizes"], np.asarray(ids)
    out = np.empty((len(ids), len(brain.area)), np.float32)
    for a in range(0, len(ids), batch):
        stim = generate_stimuli(
            ids[a : a + batch], seed=meta["seed"], size=sizes["image_size"],
            feature_size=sizes["feature_size"], stream=stream,
        )  # fmt: skip
        raw = brain.raw_responses(feature_maps(stim.small, stim.category_maps), weights, deviations)
        out[a : a + batch] = brain.baseline + brain.amplitude * (raw - arrays["raw_mean"]) / arrays["raw_std"]
    return out
