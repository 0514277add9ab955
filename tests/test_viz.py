import numpy as np
import pytest
from PIL import Image

from brainit_pl.errors import BrainITError
from brainit_pl.viz import plot_voxel_map, save_image_grid, voxel_volume


def test_image_grid_rows_and_columns(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 255, size=(3, 40, 40, 3), dtype=np.uint8)  # channels last, uint8
    rec = rng.random((3, 3, 24, 24), dtype=np.float32)  # channels first, float
    save_image_grid(tmp_path / "grid.png", [gt, rec], size=32, padding=2)
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.shape == (2 + 2 * 34, 2 + 3 * 34, 3)
    with pytest.raises(BrainITError, match="differ in length"):
        save_image_grid(tmp_path / "bad.png", [gt, rec[:2]])
    assert not (tmp_path / "bad.png").exists()


def test_image_grid_labels_sit_in_margins_left_and_above(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.random((3, 3, 24, 24), dtype=np.float32) for _ in range(2)]
    save_image_grid(tmp_path / "plain.png", rows, size=64)
    labels = {"row_labels": ["ground truth", "low-level (DIP)"], "col_labels": ["s1 #3", "s1 #7", "s2 #3"]}
    save_image_grid(tmp_path / "grid.png", rows, size=64, **labels)
    plain, img = (np.asarray(Image.open(tmp_path / f)) for f in ("plain.png", "grid.png"))
    top, left = img.shape[0] - plain.shape[0], img.shape[1] - plain.shape[1]
    assert top > 0 and left > 0 and np.array_equal(img[top:, left:], plain)  # the images, unchanged
    assert (img[:top] < 128).any() and (img[:, :left] < 128).any()  # dark text in both margins


def test_voxel_volume_scatters_values():
    ijk = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    img = voxel_volume(np.array([1.0, 2.0, 3.0]), ijk, (7, 8, 9), np.eye(4))
    data = img.get_fdata()
    assert data.shape == (7, 8, 9) and data[3, 4, 5] == 2.0 and data.sum() == 6.0
    with pytest.raises(BrainITError, match="outside the volume"):
        voxel_volume(np.ones(1), np.array([[7, 0, 0]]), (7, 8, 9), np.eye(4))


def test_plot_voxel_map_writes_png(tmp_path):
    from nilearn.datasets import load_mni152_gm_mask

    mask = load_mni152_gm_mask(resolution=4)
    ijk = np.argwhere(mask.get_fdata() > 0)[::50]
    plot_voxel_map(
        tmp_path / "labels.png",
        np.arange(len(ijk)) % 5,
        ijk,
        mask.shape,
        mask.affine,
        categorical=True,
        title="labels",
    )
    assert Image.open(tmp_path / "labels.png").size[0] > 100


def test_surface_store_maps_on_fsaverage5_and_no_geometry_draws_nothing(tmp_path):
    from types import SimpleNamespace

    from brainit_pl.viz import plot_subject_map

    ids = np.arange(0, 20000, 7)  # fsaverage vertex ids, beyond fsaverage5's 10,242 too
    ijk = np.stack([np.r_[ids, ids], np.r_[0 * ids, 0 * ids + 1], -np.ones(2 * len(ids), int)], 1)
    surface = SimpleNamespace(ijk=ijk, space="fsaverage", affine=None, volume_shape=None)
    assert plot_subject_map(tmp_path / "surf.png", np.linspace(-1, 1, len(ijk)), surface, title="r")
    assert Image.open(tmp_path / "surf.png").size[0] > 300
    labels = np.arange(len(ijk)) % 5  # clusters
    assert plot_subject_map(tmp_path / "labels.png", labels, surface, categorical=True)
    mindeye2 = SimpleNamespace(ijk=ijk, space="mindeye2", affine=None, volume_shape=None)
    assert not plot_subject_map(tmp_path / "none.png", np.zeros(len(ijk)), mindeye2)
    assert not (tmp_path / "none.png").exists()


def test_log_png_sends_a_saved_picture_to_tensorboard(tmp_path):
    from brainit_pl.viz import log_png

    class Writer:
        def add_image(self, tag, array, step, dataformats):
            self.got = (tag, array.shape, step, dataformats)

    save_image_grid(tmp_path / "g.png", [np.zeros((2, 3, 8, 8), np.uint8)], size=8, padding=0)
    writer = Writer()
    assert log_png(writer, "val/x", tmp_path / "g.png", 3) and writer.got == ("val/x", (8, 16, 3), 3, "HWC")
    assert not log_png(writer, "val/x", tmp_path / "missing.png") and not log_png(
        None, "t", tmp_path / "g.png"
    )
