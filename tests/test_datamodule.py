"""NSDDataModule on small hand-built stores with unequal voxel counts (7, 9, 11) and a known design."""

import json
from types import SimpleNamespace

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from brainit_pl.data.datamodule import NSDDataModule, per_device_batch_size
from brainit_pl.data.store import FORMAT_VERSION, repeat_index, subject_filename
from brainit_pl.data.store_writer import SubjectStoreWriter, write_images, write_manifest
from brainit_pl.errors import BrainITError

VOXELS = {1: 7, 2: 9, 3: 11}
TPS, SESSIONS, SHARED, OWN = 12, 3, 4, 8  # 12 images x 3 repeats = 36 trials = 3 sessions of 12


def _design(subject, rng):
    """NSD-like: 4 shared images (ids 0-3) and 8 own images (100·s + j), 3 repeats each, shuffled."""
    images = np.concatenate([np.arange(SHARED), 100 * subject + np.arange(OWN)])
    nsd_id = rng.permutation(np.repeat(images, 3))
    n = len(nsd_id)
    return {
        "nsd_id": nsd_id,
        "session": np.arange(n) // TPS + 1,
        "trial": np.arange(n) % TPS,
        "global_trial": np.arange(n),
        "shared": nsd_id < SHARED,
        "repeat": repeat_index(nsd_id),
    }


def _image(ids, size):
    """A recognisable image per 73k id: every pixel = id % 256 (channel c adds c)."""
    base = (np.asarray(ids)[:, None, None, None] + np.arange(3)[None, :, None, None]) % 256
    return np.broadcast_to(base, (len(ids), 3, size, size)).astype(np.uint8)


def _build(root, voxels=VOXELS, images=True):
    rng = np.random.default_rng(0)
    raw, designs = {}, {}
    for s, v in voxels.items():
        trials = _design(s, rng)
        n = len(trials["nsd_id"])
        betas = rng.normal(size=(n, v)).astype(np.float16).astype(np.float32)
        with SubjectStoreWriter(
            root / subject_filename(s),
            subject=s,
            n_trials=n,
            n_voxels=v,
            space="func1pt8mm",
            trials_per_session=TPS,
        ) as w:
            w.write_betas(0, betas)
            w.write_trials(trials)
            w.write_voxels(np.zeros((v, 3)), np.zeros((v, 3)))
        raw[s], designs[s] = betas, trials
    if images:
        ids = np.unique(np.concatenate([d["nsd_id"] for d in designs.values()]))
        write_images(root / "images.h5", ids, lambda b: {s: _image(b, s) for s in (224, 112)})
    write_manifest(
        root,
        {s: {"file": subject_filename(s), "n_voxels": v} for s, v in voxels.items()},
        images={"file": "images.h5"} if images else None,
        source={"kind": "test"},
    )
    return raw, designs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    raw, designs = _build(root)
    return root, raw, designs


def _batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _draws(batches):
    """(subject, nsd_id) → the voxel ids drawn for that sample."""
    return {
        (int(s), int(n)): b["voxel_ids"][i]
        for b in batches
        for i, (s, n) in enumerate(zip(b["subject"], b["nsd_id"]))
    }


def _ids(dm, split, subject):
    t = dm.samples[split]
    return set(t.nsd_id[t.subject == subject].tolist())


def test_link_numbers_right_after_init(store):
    root, _, _ = store
    dm = NSDDataModule(str(root))
    assert dm.subjects == [1, 2, 3]
    assert dm.n_voxels == {1: 7, 2: 9, 3: 11}
    assert dm.voxel_offsets == {1: 0, 2: 7, 3: 16} and dm.total_voxels == 27
    dm = NSDDataModule(str(root), subjects=[3, 1])
    assert dm.subjects == [1, 3] and dm.voxel_offsets == {1: 0, 3: 7} and dm.total_voxels == 18
    assert dm.samples == {}  # nothing built before setup


def test_splits_have_no_leak(store):
    root, _, _ = store
    dm = NSDDataModule(str(root), val_fraction=0.25)
    dm.setup()
    for s in VOXELS:
        train, val, test = _ids(dm, "train", s), _ids(dm, "val", s), _ids(dm, "test", s)
        assert test == set(range(SHARED))  # every test image is shared, and all shared ones are there
        assert not test & (train | val) and not train & val
        assert train | val == {100 * s + j for j in range(OWN)}
        assert len(val) == 2  # 25% of 8 images
        t = dm.samples["test"]
        assert (t.n_repeats[t.subject == s] == 3).all()


def test_averaged_betas_are_the_mean_of_the_trials(store):
    root, raw, designs = store
    dm = NSDDataModule(str(root), val_fraction=0.25, eval_batch_size=5, image_sizes=[112])
    dm.setup()
    seen = 0
    for split in ("val", "test"):
        for batch in dm.make_dataloader(split):
            s = int(batch["subject"][0])
            assert (batch["subject"] == s).all() and batch["betas"].shape == (
                len(batch["subject"]),
                VOXELS[s],
            )
            assert torch.equal(batch["voxel_ids"][0], dm.voxel_offsets[s] + torch.arange(VOXELS[s]))
            for i, nsd in enumerate(batch["nsd_id"].tolist()):
                trials = np.flatnonzero(designs[s]["nsd_id"] == nsd)
                np.testing.assert_allclose(batch["betas"][i], raw[s][trials].mean(0), atol=1e-5)
                assert batch["n_repeats"][i] == 3
                np.testing.assert_allclose(batch["image_112"][i, 1], (nsd + 1) % 256 / 255.0)
                seen += 1
    assert seen == 3 * (SHARED + 2)
    # the sampled training betas are the same means, read at the drawn voxels
    dm = NSDDataModule(str(root), voxels_per_sample=5, batch_size=4)
    for batch in dm.make_dataloader("train"):
        for i in range(len(batch["nsd_id"])):
            s, nsd = int(batch["subject"][i]), int(batch["nsd_id"][i])
            mean = raw[s][designs[s]["nsd_id"] == nsd].mean(0)
            local = batch["voxel_ids"][i].numpy() - dm.voxel_offsets[s]
            np.testing.assert_allclose(batch["betas"][i], mean[local], atol=1e-5)


def test_kept_repeats_give_one_sample_per_trial(store):
    root, raw, designs = store
    dm = NSDDataModule(str(root), average_repeats=False, test_average_repeats=False, val_fraction=0.25)
    dm.setup()
    assert (dm.samples["train"].n_repeats == 1).all()
    assert len(dm.samples["train"]) == 3 * 6 * 3 and len(dm.samples["val"]) == 3 * 2 * 3
    assert len(dm.samples["test"]) == 3 * SHARED * 3
    batch = next(iter(dm.make_dataloader("test")))
    s, row = int(batch["subject"][0]), dm.samples["test"].rows[0]
    np.testing.assert_allclose(batch["betas"][0], raw[s][row], atol=1e-6)


def test_hour_subsets(store):
    root, _, designs = store
    dm = NSDDataModule(str(root), hours=1, val_fraction=0.1)
    dm.setup()
    for s, d in designs.items():
        rows = np.concatenate([dm.subject_split(s).train, dm.subject_split(s).val])
        assert set(d["session"][rows]) == {1}
        assert len(rows) == (~d["shared"][:TPS]).sum()  # every non-shared trial of session 1
        assert len(dm.subject_split(s).test) == SHARED * 3  # the test split ignores hours
    quarter = NSDDataModule(str(root), hours=0.25, val_fraction=0.0).subject_split(2)
    assert quarter.selected.tolist() == [0, 1, 2]  # the first quarter of session 1, in order
    with pytest.raises(BrainITError, match="needs 4 sessions, but subject 1 has 3"):
        NSDDataModule(str(root), hours=4).setup("fit")


def test_voxel_sampling_with_and_without_replacement(store):
    root, _, _ = store
    dm = NSDDataModule(str(root), voxels_per_sample=20, batch_size=6)
    mixed = dup = 0
    for batch in dm.make_dataloader("train"):
        assert batch["betas"].shape == batch["voxel_ids"].shape == (len(batch["subject"]), 20)
        assert batch["betas"].dtype == torch.float32 and batch["voxel_ids"].dtype == torch.int64
        for i, s in enumerate(batch["subject"].tolist()):
            ids = batch["voxel_ids"][i]
            assert ((ids >= dm.voxel_offsets[s]) & (ids < dm.voxel_offsets[s] + VOXELS[s])).all()
            dup += len(ids.unique()) < 20  # k > V: with replacement there must be repeats
        mixed += len(batch["subject"].unique()) > 1
    assert mixed > 0 and dup == len(dm.samples["train"])
    dm = NSDDataModule(str(root), voxels_per_sample=7, voxel_replacement=False, batch_size=6)
    for batch in dm.make_dataloader("train"):
        assert all(len(row.unique()) == 7 for row in batch["voxel_ids"])
    with pytest.raises(BrainITError, match="without replacement exceeds"):
        NSDDataModule(str(root), voxels_per_sample=8, voxel_replacement=False)


def test_all_voxels_gives_per_subject_buckets(store):
    root, _, _ = store
    dm = NSDDataModule(str(root), batch_size=4)
    batches = _batches(dm.make_dataloader("train"))
    for b in batches:
        s = int(b["subject"][0])
        assert (b["subject"] == s).all() and b["betas"].shape == (len(b["subject"]), VOXELS[s])
    assert sum(len(b["subject"]) for b in batches) == len(dm.samples["train"])
    order = [int(b["subject"][0]) for b in batches]
    assert order != sorted(order)  # buckets are shuffled in train ...
    evals = [int(b["subject"][0]) for b in dm.make_dataloader("test")]
    assert evals == sorted(evals)  # ... and ordered in test


def test_seeded_epochs_and_workers(store):
    root, _, _ = store

    def run(seed=0, epoch=0, workers=0):
        loader = NSDDataModule(
            str(root), voxels_per_sample=5, batch_size=4, seed=seed, num_workers=workers
        ).make_dataloader("train")
        loader.sampler.set_epoch(epoch)
        return _batches(loader)

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)

    first = run()
    assert same(first, run())
    assert not same(first, run(seed=1))
    # Every sample comes back in the next epoch, with other voxels drawn.
    draws = [_draws(first), _draws(run(epoch=1))]
    assert draws[0].keys() == draws[1].keys()
    assert all(not torch.equal(draws[0][key], draws[1][key]) for key in draws[0])
    assert same(first, run(workers=2))


def test_ddp_ranks_get_disjoint_covering_equal_shards(store):
    root, _, _ = store
    for k, world in ((None, 2), (5, 2), (None, 4)):
        dm = NSDDataModule(str(root), voxels_per_sample=k, batch_size=4, eval_batch_size=8)
        for split in ("train", "test"):  # test: 3 subjects x 4 images = 3 buckets of 4 for 2 or 4 ranks
            shards = [_batches(dm.make_dataloader(split, rank=r, world_size=world)) for r in range(world)]
            keys = [
                [(int(s), int(n)) for b in sh for s, n in zip(b["subject"], b["nsd_id"])] for sh in shards
            ]
            everything = [key for shard in keys for key in shard]
            assert len(set(everything)) == len(everything) == len(dm.samples[split])  # disjoint, covering
            assert len({len(sh) for sh in shards}) == 1  # the same number of steps on every rank
            assert len(shards[0]) == len(dm.make_dataloader(split, rank=0, world_size=world)) > 0
            if k is None:
                assert all(len(b["subject"].unique()) == 1 for sh in shards for b in sh)
    with pytest.raises(BrainITError, match="the val split has 3 sample"):
        NSDDataModule(str(root), val_fraction=0.1).make_dataloader("val", rank=0, world_size=4)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, i):
        self.seen.append((self.current_epoch, {k: v.clone() for k, v in batch.items()}))
        return (self.w * batch["betas"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_global_batch_size_holds_on_any_number_of_devices(store, world_size):
    """global_batch_size: the per-device batch is global // (world size · accumulation), set at setup."""
    root, _, _ = store
    assert per_device_batch_size(128, world_size) == 128 // world_size
    assert per_device_batch_size(64, world_size, accumulate=4) == 16 // world_size
    trainer = SimpleNamespace(world_size=world_size, accumulate_grad_batches=2, global_rank=0)
    dm = NSDDataModule(str(root), voxels_per_sample=3, global_batch_size=8, val_fraction=0.25)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.batch_size == 8 // (2 * world_size) and dm.eval_batch_size == dm.batch_size
    sizes = [len(b.indices) for b in dm.make_dataloader("train", rank=0, world_size=world_size).sampler]
    assert max(sizes) == dm.batch_size
    with pytest.raises(BrainITError, match="not a positive multiple"):
        per_device_batch_size(64, 3)


def test_lightning_keeps_the_plan_and_sets_the_epoch(store):
    root, _, _ = store
    dm, model = NSDDataModule(str(root), voxels_per_sample=5, batch_size=8), _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    draws = [_draws([b for e, b in model.seen if e == epoch]) for epoch in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == len(dm.samples["train"])
    assert all(not torch.equal(draws[0][key], draws[1][key]) for key in draws[0])


def test_user_errors_are_one_line(store, tmp_path):
    root, _, _ = store
    cases = [
        (
            lambda: NSDDataModule(str(root), subjects=[1, 4]),
            r"subject\(s\) \[4\] not in the store .*\[1, 2, 3\]",
        ),
        (
            lambda: NSDDataModule(str(root), hours=0.05).setup("fit"),
            "hours=0.05 leaves 0 training images for subject 1",
        ),
        (lambda: NSDDataModule(str(tmp_path)), "no manifest.json"),
        (lambda: NSDDataModule(str(root), image_sizes=[64]), "image_sizes"),
    ]
    bad = tmp_path / "old"
    bad.mkdir()
    _build(bad, voxels={1: 7}, images=False)
    with h5py.File(bad / "subj01.h5", "a") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    cases.append((lambda: NSDDataModule(str(bad)), "incompatible"))
    cases.append((lambda: NSDDataModule(str(bad), image_sizes=[112]), "no image store"))
    manifest = json.loads((bad / "manifest.json").read_text())
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    cases.append((lambda: NSDDataModule(str(tmp_path / "older")), "incompatible"))
    for make, pattern in cases:
        with pytest.raises(BrainITError, match=pattern) as err:
            make()
        assert "\n" not in str(err.value)


def test_store_without_shared_trials_has_no_test_split(tmp_path):
    rng = np.random.default_rng(0)
    trials = _design(1, rng)
    trials["shared"] = np.zeros_like(trials["shared"])
    n = len(trials["nsd_id"])
    with SubjectStoreWriter(
        tmp_path / "subj01.h5", subject=1, n_trials=n, n_voxels=3, space="func1pt8mm", trials_per_session=TPS
    ) as w:
        w.write_betas(0, np.zeros((n, 3)))
        w.write_trials(trials)
        w.write_voxels(np.zeros((3, 3)), np.zeros((3, 3)))
    write_manifest(tmp_path, {1: {"file": "subj01.h5"}}, images=None, source={})
    dm = NSDDataModule(str(tmp_path))
    dm.setup("fit")  # train/val exist
    with pytest.raises(BrainITError, match="subject 1 has no test trials"):
        dm.setup("test")


def test_prepared_tiny_simulation(request):
    """Integration: the store `prepare` writes from the simulator's tiny preset."""
    pytest.importorskip("brainit_pl.data.sim.simulate")
    root = request.getfixturevalue("tiny_store")
    dm = NSDDataModule(str(root), voxels_per_sample=50, batch_size=8, image_sizes=[112, 224])
    dm.setup()
    for s in dm.subjects:
        assert not _ids(dm, "test", s) & (_ids(dm, "train", s) | _ids(dm, "val", s))
        shared = dm.store.subject(s).trials["shared"]
        assert len(dm.subject_split(s).test) == shared.sum() > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["betas"].shape == (len(batch["subject"]), 50)
    assert (
        batch["image_224"].shape[1:] == (3, 224, 224)
        and 0 <= batch["image_112"].min() <= batch["image_112"].max() <= 1
    )
    for b in dm.test_dataloader():
        assert b["betas"].shape[1] == dm.n_voxels[int(b["subject"][0])]
