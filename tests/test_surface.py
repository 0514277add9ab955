"""fsaverage surface betas: vertex masks, MGH session files, the vertex table.

Tiny hemispheres of 13 vertices and sessions of 9 trials (fsaverage has 163842 and NSD 750), 4 lh + 3 rh
selected vertices: unequal sizes so that an axis mix-up fails. The MGH files follow NSD's convention,
(vertices, 1, 1, trials) float32.
"""

import nibabel as nib
import numpy as np
import pytest
from nibabel.freesurfer import write_geometry
from nibabel.freesurfer.mghformat import MGHImage

from brainit_pl.data.layout import NSDLayout
from brainit_pl.data.surface import load_vertex_mask, read_surface_session, vertex_table
from brainit_pl.errors import BrainITError

N_HEMI, N_TRIALS = 13, 9
LH, RH = [1, 4, 5, 12], [0, 2, 7]


def _mask():
    mask = np.zeros(2 * N_HEMI, dtype=bool)
    mask[LH] = True
    mask[[N_HEMI + v for v in RH]] = True
    return mask


def _save_mgh(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(MGHImage(data, np.eye(4)), path)


def _session(root, seed=0, dtype=np.float32, **shapes):
    """Write lh/rh betas of subject 1 session 1; returns {hemi: (vertices, trials) array}."""
    layout = NSDLayout(root)
    rng = np.random.default_rng(seed)
    out = {}
    for hemi in ("lh", "rh"):
        n, t = shapes.get(hemi, (N_HEMI, N_TRIALS))
        data = (rng.normal(size=(n, 1, 1, t)) * 3).astype(np.float32)
        if dtype == np.int16:
            data = np.round(data * 300).astype(np.int16)
        _save_mgh(layout.betas_mgh(1, 1, hemi), data)
        out[hemi] = data[:, 0, 0, :]
    return layout, out


# ---------------------------------------------------------------------------------------------- mask
def test_mask_forms_agree(tmp_path):
    mask = _mask()
    np.save(tmp_path / "both.npy", mask)
    np.save(tmp_path / "both_int.npy", mask.astype(np.int64))
    np.savez(tmp_path / "halves.npz", lh=mask[:N_HEMI], rh=mask[N_HEMI:].astype(np.uint8))
    roi = tmp_path / "subj01/roi_masks"  # the Algonauts-2023 challenge layout, float 0/1 arrays
    roi.mkdir(parents=True)
    np.save(roi / "lh.all-vertices_fsaverage_space.npy", mask[:N_HEMI].astype(np.float32))
    np.save(roi / "rh.all-vertices_fsaverage_space.npy", mask[N_HEMI:].astype(np.float32))
    for path in ["both.npy", "both_int.npy", "halves.npz", "subj01/roi_masks", "subj01"]:
        got = load_vertex_mask(tmp_path / path)
        assert got.dtype == bool
        np.testing.assert_array_equal(got, mask)


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("labels.npy", np.arange(26) % 4, "must hold 0/1"),
        ("odd.npy", np.ones(25, dtype=bool), "25 values; expected both hemispheres"),
        ("empty.npy", np.zeros(26, dtype=bool), "selects no vertex"),
        ("two_d.npy", np.ones((2, 13), dtype=bool), r"1-D array over vertices, found shape \(2, 13\)"),
        ("lh_only.npz", {"lh": np.ones(13)}, "must hold arrays 'lh' and 'rh'"),
        ("unequal.npz", {"lh": np.ones(13), "rh": np.ones(12)}, "lh has 13 vertices but rh 12"),
    ],
)
def test_bad_masks(tmp_path, name, values, message):
    path = tmp_path / name
    if isinstance(values, dict):
        np.savez(path, **values)
    else:
        np.save(path, values)
    with pytest.raises(BrainITError, match=message):
        load_vertex_mask(path)


def test_missing_mask_files_are_named(tmp_path):
    with pytest.raises(BrainITError, match=r"vertex mask .*nope.npy not found"):
        load_vertex_mask(tmp_path / "nope.npy")
    (tmp_path / "roi_masks").mkdir()
    np.save(tmp_path / "roi_masks/lh.all-vertices_fsaverage_space.npy", np.ones(13))
    with pytest.raises(BrainITError, match=r"rh.all-vertices_fsaverage_space.npy not found"):
        load_vertex_mask(tmp_path)


# --------------------------------------------------------------------------------------------- betas
def test_session_selects_lh_then_rh(tmp_path):
    layout, data = _session(tmp_path)
    betas = read_surface_session(layout, 1, 1, _mask())
    assert betas.shape == (N_TRIALS, 7) and betas.dtype == np.float32
    np.testing.assert_array_equal(betas[:, :4], data["lh"][LH].T)  # float files: percent signal change as is
    np.testing.assert_array_equal(betas[:, 4:], data["rh"][RH].T)


def test_int16_files_are_divided_by_300(tmp_path):
    layout, data = _session(tmp_path, dtype=np.int16)
    betas = read_surface_session(layout, 1, 1, _mask())
    np.testing.assert_allclose(betas[:, :4], data["lh"][LH].T / 300.0, rtol=1e-6)


def test_nan_outside_the_mask_is_ignored(tmp_path):
    layout, data = _session(tmp_path)
    lh = np.full((N_HEMI, 1, 1, N_TRIALS), np.nan, dtype=np.float32)
    lh[LH] = data["lh"][LH][:, None, None, :]
    _save_mgh(layout.betas_mgh(1, 1, "lh"), lh)
    np.testing.assert_array_equal(read_surface_session(layout, 1, 1, _mask())[:, :4], data["lh"][LH].T)


def test_bad_sessions(tmp_path):
    mask = _mask()
    layout, _ = _session(tmp_path / "a", lh=(12, N_TRIALS))
    with pytest.raises(
        BrainITError, match=r"lh.betas_session01.mgh has 12 vertices but the vertex mask has 13"
    ):
        read_surface_session(layout, 1, 1, mask)
    layout, _ = _session(tmp_path / "b", rh=(N_HEMI, 8))
    with pytest.raises(BrainITError, match=r"rh.betas_session01.mgh has 8 trials but the lh file has 9"):
        read_surface_session(layout, 1, 1, mask)
    layout, _ = _session(tmp_path / "c")
    layout.betas_mgh(1, 1, "rh").unlink()
    with pytest.raises(
        BrainITError, match=r"fsaverage betas .*subj01/fsaverage/betas_fithrf_GLMdenoise_RR/rh"
    ):
        read_surface_session(layout, 1, 1, mask)
    layout, data = _session(tmp_path / "d")
    rh = data["rh"].copy()
    rh[7, 3] = np.inf
    _save_mgh(layout.betas_mgh(1, 1, "rh"), rh[:, None, None, :])
    with pytest.raises(BrainITError, match=r"rh.betas_session01.mgh: NaN or inf .* vertex 7, trial 3"):
        read_surface_session(layout, 1, 1, mask)
    _save_mgh(layout.betas_mgh(1, 1, "rh"), np.zeros((N_HEMI, 2, 1, N_TRIALS), np.float32))
    with pytest.raises(BrainITError, match=r"expected \(vertices, 1, 1, trials\)"):
        read_surface_session(layout, 1, 1, mask)
    layout.betas_mgh(1, 1, "rh").write_bytes(b"garbage")
    with pytest.raises(BrainITError, match="is not a readable MGH file"):
        read_surface_session(layout, 1, 1, mask)


# ------------------------------------------------------------------------------------------ geometry
def test_vertex_table_without_surfaces_has_no_geometry():
    ijk, xyz = vertex_table(_mask())
    np.testing.assert_array_equal(ijk, [[v, 0, -1] for v in LH] + [[v, 1, -1] for v in RH])
    assert ijk.dtype == np.int32 and xyz.dtype == np.float32
    assert xyz.shape == (7, 3) and not xyz.any()


def test_vertex_table_reads_freesurfer_surfaces(tmp_path):
    rng = np.random.default_rng(1)
    coords = {h: rng.normal(size=(N_HEMI, 3)) * 50 for h in ("lh", "rh")}
    faces = np.array([[0, 1, 2]])
    for hemi, xyz in coords.items():
        write_geometry(tmp_path / f"{hemi}.pial", xyz, faces)
    _, xyz = vertex_table(_mask(), surf_dir=tmp_path)
    np.testing.assert_allclose(xyz, np.concatenate([coords["lh"][LH], coords["rh"][RH]]), rtol=1e-6)
    with pytest.raises(BrainITError, match=r"no lh white surface .*expected lh.white"):
        vertex_table(_mask(), surf_dir=tmp_path, surface="white")
    write_geometry(tmp_path / "rh.pial", coords["rh"][:12], faces)
    with pytest.raises(BrainITError, match="rh pial surface .* has 12 vertices but the vertex mask has 13"):
        vertex_table(_mask(), surf_dir=tmp_path)


def test_vertex_table_reads_nilearn_gifti_offline():
    """nilearn ships fsaverage5 (10242 vertices per hemisphere) as GIFTI: the same reader, offline."""
    from pathlib import Path

    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["pial"]
    folder = Path(datasets.__file__).parent / "data/fsaverage5"
    mask = np.zeros(2 * 10242, dtype=bool)
    mask[[0, 5000, 10241, 10242 + 17]] = True
    _, xyz = vertex_table(mask, surf_dir=folder)
    expected = np.concatenate(
        [mesh.parts["left"].coordinates[[0, 5000, 10241]], mesh.parts["right"].coordinates[[17]]]
    )
    np.testing.assert_allclose(xyz, expected, rtol=1e-6)
