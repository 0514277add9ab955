"""The ridge baseline (Brain-Diffuser's approach) as a LightningModule: ``brainit-pl fit`` fits it in one epoch.

Training collects every training sample (all voxels of its subject, per-subject batches: the DataModule's
``voxels_per_sample: null``) with its target, gathered from all DDP ranks, and after the epoch's last
batch solves one closed-form ridge per subject (:func:`~brainit_pl.models.ridge.fit_ridge`, λ by
leave-one-out), so ``max_epochs: 1`` suffices. The maps are buffers: checkpoints hold them.

Targets and scores are those of the BITs, under the same names:

* ``semantic``: the cached CLIP tokens (``clip_tokens``, 256 × D); ``val/clip_cos`` and ``val/clip_2way``
  (and ``test/...``).
* ``lowlevel``: the VGG16-BN tokens of ``image_112``, computed by the frozen VGG (kept out of checkpoints),
  **at the positions of** :func:`~brainit_pl.metrics.features.eval_positions` **only** (240 of 7,190): a
  V × (7,190 · 512) map is far too large, and ridge is separable per output, so the ridge predicts exactly
  the tokens the other models' ``vgg_2way`` is scored on. ``val/vgg_2way``, ``test/vgg_2way``.

``{val,test}/loss`` is the MSE of the predicted targets (all 256 CLIP tokens; the 240 VGG positions).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainit_pl.errors import BrainITError, require
from brainit_pl.lit.test_scores import TestScoresMixin
from brainit_pl.metrics.features import eval_positions, feature_quality
from brainit_pl.models.ridge import DEFAULT_ALPHAS, RidgeDecoder, RidgeSolution

log = logging.getLogger(__name__)

BRANCHES = ("semantic", "lowlevel")
GATHER_VALUES = 2**26  # values per all_gather call (256 MB of float32 per rank)


class RidgeModule(TestScoresMixin, L.LightningModule):
    """Per-subject closed-form ridge from all voxels to the semantic or low-level targets.

    Args:
        n_voxels: subject → voxel count V_s (linked from the DataModule).
        branch: ``"semantic"`` (CLIP tokens) or ``"lowlevel"`` (VGG tokens at the scored positions).
        alphas: candidate penalties, as multiples of the Gram matrix's mean eigenvalue (default
            :data:`~brainit_pl.models.ridge.DEFAULT_ALPHAS`, 10⁻² … 10⁴); one λ per subject is chosen
            by leave-one-out on the training data.
        vgg_weights: VGG16-BN weight file (low-level; ``None``: the weights folder, or random for the twin).
        tiny_vgg: use the tiny random VGG twin (tests, the simulated demo).
        vgg_slim: channel divisor of the tiny VGG twin (the demo uses 8: tokens 512/8 wide, ~64× cheaper).
    """

    def __init__(
        self,
        n_voxels: dict[int, int],
        branch: str = "semantic",
        alphas: list[float] | None = None,
        vgg_weights: str | None = None,
        tiny_vgg: bool = False,
        vgg_slim: int = 1,
    ) -> None:
        super().__init__()
        require(branch in BRANCHES, f"RidgeModule.branch must be one of {BRANCHES}, got {branch!r}")
        require(
            alphas is None or (len(alphas) > 0 and min(alphas) > 0), f"alphas must be positive, got {alphas}"
        )
        self.save_hyperparameters()
        self.automatic_optimization = False  # nothing to optimise: the fit is closed-form
        self.branch = branch
        self.alphas = tuple(alphas) if alphas is not None else DEFAULT_ALPHAS
        self.n_voxels = {int(s): int(v) for s, v in sorted(n_voxels.items())}
        offsets = torch.cumsum(torch.tensor([0, *self.n_voxels.values()]), 0).tolist()
        self.voxel_offsets = dict(zip(self.n_voxels, offsets))  # as the DataModule's global voxel ids
        self.ridge = RidgeDecoder(n_voxels)
        # DDP refuses to wrap a module without a trainable parameter; this one is never used or updated.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        if branch == "lowlevel":
            from brainit_pl.backbones.vgg import VGGTokens, build_vgg

            self.vgg_tokens = VGGTokens(
                build_vgg(vgg_weights, tiny=tiny_vgg, slim=vgg_slim)
            )  # no state_dict entries
            positions = eval_positions(self.vgg_tokens.layout.counts)
            self.register_buffer("positions", positions, persistent=False)  # (P,)
        self.metrics = nn.ModuleDict(
            {stage: feature_quality(branch, f"{stage}/") for stage in ("val", "test")}
        )
        self._train_data: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.init_test_scores()

    def forward(self, betas: Tensor, subject: int) -> Tensor:
        """(B, V_s) betas of all voxels of ``subject`` (store order) → (B, T, D) predicted tokens."""
        with torch.autocast(self.device.type, enabled=False):  # a linear map: keep it float32
            return self.ridge(betas, subject)

    # ----------------------------------------------------------------------------------------- batches
    def batch_subject(self, batch: dict[str, Tensor]) -> int:
        """The batch's one subject, after checking it holds all its voxels in store order."""
        subject = int(batch["subject"][0])
        ids = batch["voxel_ids"][0]
        n = self.n_voxels.get(subject, -1)
        require(
            bool((batch["subject"] == subject).all())
            and len(ids) == n
            and bool((ids == self.voxel_offsets[subject] + torch.arange(n, device=ids.device)).all()),
            "RidgeModule needs per-subject batches with all voxels in store order: set "
            "data.voxels_per_sample: null",
        )
        return subject

    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, D) targets: the cached CLIP tokens, or the VGG tokens at the scored positions."""
        if self.branch == "semantic":
            require("clip_tokens" in batch, "the semantic ridge needs CLIP tokens: set data.features: [clip]")
            return batch["clip_tokens"].float()
        require("image_112" in batch, "the low-level ridge needs 112² images: set data.image_sizes: [112]")
        with torch.no_grad():
            return self.vgg_tokens(batch["image_112"])[:, self.positions].float()  # (B, P, 512)

    # ---------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        self._train_data = {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        subject = self.batch_subject(batch)
        # Kept on the host (float16 targets: the CLIP cache is float16 already) until the epoch's fit.
        pair = (batch["betas"].float().cpu(), self.targets(batch).to("cpu", torch.float16))
        self._train_data.setdefault(subject, []).append(pair)
        # Validation runs before on_train_epoch_end, so the fit happens right after the last batch.
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._fit()

    def on_train_epoch_end(self) -> None:
        if self._train_data:  # the epoch's length was not known in advance
            self._fit()

    @torch.no_grad()
    def _fit(self) -> None:
        """Gather the epoch's samples from every rank and fit each subject's ridge (identically on all ranks)."""
        shapes = {tuple(y.shape[1:]) for pairs in self._train_data.values() for _, y in pairs}
        require(len(shapes) <= 1, f"training targets of several shapes {sorted(shapes)}")
        target_shape = shapes.pop() if shapes else None
        # A rank may have seen no batch of some subject: every rank takes the target shape of rank 0.
        if self.trainer.world_size > 1:
            target_shape = self.trainer.strategy.broadcast(target_shape)
        for subject in self.n_voxels:  # the same order on every rank: the gathers are collective calls
            pairs = self._train_data.get(subject, [])
            x = torch.cat([p[0] for p in pairs]) if pairs else torch.zeros(0, self.n_voxels[subject])
            y = torch.cat([p[1] for p in pairs]) if pairs else torch.zeros(0, *target_shape).half()
            x, y = self._gather_rows(x), self._gather_rows(y)
            if len(x) == 0:
                log.warning("subject %d has no training samples: its ridge is not fitted", subject)
                continue
            with torch.autocast(self.device.type, enabled=False):
                sol = self.ridge.fit(subject, x.to(self.device), y.to(self.device), self.alphas)
            if self.global_rank == 0:
                self._report(subject, x, y, sol)
        self._train_data = {}
        # With no optimizer, global_step would stay 0 and ModelCheckpoint never saves (it waits for the step
        # to move): the fit counts as the epoch's one optimisation step, as Lightning's own manual loop does.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _report(self, subject: int, x: Tensor, y: Tensor, sol: RidgeSolution) -> None:
        best = int(sol.loo_mse.argmin())
        form = "primal" if sol.coef is not None else "dual"
        stats = (
            subject,
            len(x),
            x.shape[1],
            y[0].numel(),
            sol.alpha,
            self.alphas[best],
            float(sol.loo_mse[best]),
        )
        log.info(
            "ridge subject %d: n=%d, V=%d, F=%d, alpha=%.3g (%g x mean eigenvalue), LOO MSE %.4g (%s form)",
            *stats,
            form,
        )
        if len(self.alphas) > 1 and self.alphas[best] in (min(self.alphas), max(self.alphas)):
            log.warning("ridge subject %d: alpha at the edge of the grid %s; widen it", subject, self.alphas)

    def _gather_rows(self, rows: Tensor) -> Tensor:
        """(n_rank, ...) rows of every rank concatenated in rank order → (n_total, ...) on the host."""
        world = self.trainer.world_size
        if world == 1:
            return rows
        counts = self.all_gather(torch.tensor(len(rows), device=self.device)).view(world).tolist()
        width = max(1, math.prod(rows.shape[1:]))
        step = max(1, GATHER_VALUES // (width * world))
        parts: list[list[Tensor]] = [[] for _ in range(world)]
        for start in range(0, max(counts), step):  # the same chunks on every rank
            block = torch.zeros(step, *rows.shape[1:], device=self.device)
            mine = rows[start : start + step]
            block[: len(mine)] = mine.to(self.device, torch.float32)
            gathered = self.all_gather(block).view(world, step, *rows.shape[1:]).cpu()  # (W, step, ...)
            for r in range(world):
                parts[r].append(gathered[r, : max(0, min(step, counts[r] - start))])
        return torch.cat([p for rank in parts for p in rank]).to(rows.dtype)

    def configure_optimizers(self) -> None:
        return None

    # -------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        subject = self.batch_subject(batch)
        if not self.ridge.fitted(subject):
            if self.trainer.sanity_checking:  # the sanity check runs before the first fit
                return
            raise BrainITError(
                f"the ridge of subject {subject} is not fitted: train it with `brainit-pl fit`, or pass "
                "--ckpt_path of a fitted checkpoint"
            )
        pred, target = self(batch["betas"], subject), self.targets(batch)
        bs = len(pred)
        self.log(f"{stage}/loss", F.mse_loss(pred, target), batch_size=bs, sync_dist=True, prog_bar=True)
        metric = self.metrics[stage]
        metric.update(pred, target)
        if stage == "test":
            self.record_test_keys(batch)
        self.log_dict(metric, batch_size=bs, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.write_test_scores(self.metrics["test"])  # Lightning computes and resets it after this hook

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``tokens`` (B, T, D): all CLIP tokens, or the VGG tokens at ``self.positions``; ``nsd_id``, ``subject``."""
        subject = self.batch_subject(batch)
        return {
            "nsd_id": batch["nsd_id"],
            "subject": batch["subject"],
            "tokens": self(batch["betas"], subject),
        }
