"""Deep Image Prior inversion of the low-level tokens (docs/method.md §6.1).

A DIP network (Ulyanov et al. 2018, their "skip" encoder-decoder) maps a fixed noise input to an image,
and its weights are optimised until the VGG16-BN features of that image match target feature maps: the
low-level BIT's predicted tokens folded back into maps. The untrained network's structure is the prior
(it fits natural image structure long before it fits noise); every image gets a network of its own.

Batching. ``n`` images are inverted by one :class:`SkipNet` with ``nets=n``: ``n`` independent networks
side by side as the groups of grouped convolutions. ``torch.func.stack_module_state`` + ``vmap`` was the
alternative, but vmap runs a convolution with per-sample weights *as* a grouped convolution anyway (same
kernels), while train-mode BatchNorm, which the DIP uses throughout, has to be patched to run under vmap
(its in-place running-statistics update cannot be vmapped) and the stacked weights would need a
hand-written functional Adam loop. Here the batched network is an ordinary module with one Adam, and each
piece is exactly per image:

* convolutions have ``groups=n``: group i sees only network i's channels, with network i's weights;
* BatchNorm: the original runs a network on a batch of one image, so its train-mode statistics are taken
  over H×W per channel; ``BatchNorm2d(n·C)`` on the stacked (1, n·C, H, W) input takes the same statistics
  per (network, channel) — not a GroupNorm or an InstanceNorm, the original BatchNorm, one per network;
* the skip concatenation is done per group; upsampling, LeakyReLU and sigmoid act per channel;
* the loss is the *sum* of the per-image losses, so each network's gradient is that of its own loss, and
  Adam is element-wise, so one Adam over the stacked weights is ``n`` independent Adams.

So a batched inversion equals ``n`` single ones with the same seeds (``tests/test_dip.py`` checks it).
Batching is meant for GPUs, where one 224² network at a time leaves most of the device idle. On a CPU
the gain depends on the threads: with one, oneDNN's grouped-convolution backward pass is slower than the
per-image dense one and ``batch=1`` is faster; with several, the larger batched ops parallelise better
(``benchmarks/recon_dip.py`` measures both modes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from brainit_pl.backbones.vgg import VGGFeatures, VGGTokens
from brainit_pl.errors import require


@dataclass(frozen=True)
class SkipConfig:
    """Shape of the DIP "skip" network (docs/method.md §6: input depth 32, 3 scales, 128 channels, 2 skip).

    Attributes:
        in_channels: depth of the noise input.
        channels: channels of every down and up block.
        skip_channels: channels of each skip connection (0: none).
        scales: number of down/up-sampling levels; image sides must be multiples of 2**scales.
    """

    in_channels: int = 32
    channels: int = 128
    skip_channels: int = 2
    scales: int = 3

    def __post_init__(self) -> None:
        for name in ("in_channels", "channels", "scales"):
            require(getattr(self, name) >= 1, f"SkipConfig.{name} must be >= 1, got {getattr(self, name)}")
        require(self.skip_channels >= 0, f"SkipConfig.skip_channels must be >= 0, got {self.skip_channels}")


def _block(c_in: int, c_out: int, kernel: int, stride: int, nets: int) -> nn.Sequential:
    """Conv (reflection padding) → BatchNorm → LeakyReLU(0.2), for ``nets`` independent groups."""
    return nn.Sequential(
        nn.Conv2d(
            nets * c_in, nets * c_out, kernel, stride, kernel // 2, padding_mode="reflect", groups=nets
        ),
        nn.BatchNorm2d(nets * c_out),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _cat_groups(a: Tensor, b: Tensor, nets: int) -> Tensor:
    """Concatenate channels within each group: (B, n·C₁, H, W), (B, n·C₂, H, W) → (B, n·(C₁+C₂), H, W)."""
    batch, _, h, w = a.shape
    parts = (a.reshape(batch, nets, -1, h, w), b.reshape(batch, nets, -1, h, w))  # (B, n, C_j, H, W)
    return torch.cat(parts, dim=2).reshape(batch, -1, h, w)


class _Level(nn.Module):
    """One scale: x → up(norm(concat(skip(x), upsample(inner(down(x)))))), at x's resolution."""

    def __init__(self, c_in: int, config: SkipConfig, depth: int, nets: int) -> None:
        super().__init__()
        c, s = config.channels, config.skip_channels
        self.nets = nets
        self.skip = _block(c_in, s, 1, 1, nets) if s else None
        self.down = nn.Sequential(_block(c_in, c, 3, 2, nets), _block(c, c, 3, 1, nets))
        self.inner = _Level(c, config, depth - 1, nets) if depth > 1 else None
        self.merge_norm = nn.BatchNorm2d(nets * (s + c))  # the original normalises the concatenation too
        self.up = nn.Sequential(_block(s + c, c, 3, 1, nets), _block(c, c, 1, 1, nets))

    def forward(self, x: Tensor) -> Tensor:
        deep = self.down(x)  # (B, n·C, H/2, W/2)
        if self.inner is not None:
            deep = self.inner(deep)
        deep = F.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=False)  # (B, n·C, H, W)
        if self.skip is not None:
            deep = _cat_groups(self.skip(x), deep, self.nets)  # (B, n·(S+C), H, W), skip channels first
        return self.up(self.merge_norm(deep))


class SkipNet(nn.Module):
    """The DIP "skip" encoder-decoder, or ``nets`` independent copies of it run side by side.

    Per scale: a 1×1 skip branch; a stride-2 3×3 conv and a 3×3 conv down; the next scale; bilinear
    ×2 upsampling; BatchNorm of the concatenation; a 3×3 and a 1×1 conv up. Every conv has reflection
    padding and is followed by BatchNorm and LeakyReLU(0.2); a 1×1 conv and a sigmoid give the image.

    Args:
        config: the network's shape.
        out_channels: image channels.
        nets: independent networks held by this module (:meth:`stack` builds one from single networks).
    """

    def __init__(self, config: SkipConfig = SkipConfig(), out_channels: int = 3, nets: int = 1) -> None:
        super().__init__()
        require(nets >= 1, f"SkipNet needs nets >= 1, got {nets}")
        self.config, self.out_channels, self.nets = config, out_channels, nets
        self.body = _Level(config.in_channels, config, config.scales, nets)
        self.head = nn.Conv2d(nets * config.channels, nets * out_channels, 1, groups=nets)

    def forward(self, z: Tensor) -> Tensor:
        """Images from noise.

        Args:
            z: (N, C_in, H, W), H and W multiples of 2**scales. With ``nets > 1``, N == nets and image i goes
                through network i; a single network takes any N as one batch (BatchNorm over the batch).

        Returns:
            (N, out_channels, H, W) in (0, 1).
        """
        n, c, h, w = z.shape
        cfg, side = self.config, 2**self.config.scales
        require(c == cfg.in_channels, f"SkipNet expects {cfg.in_channels} input channels, got {c}")
        require(self.nets == 1 or n == self.nets, f"SkipNet holds {self.nets} networks but got {n} inputs")
        require(
            h % side == 0 and w % side == 0, f"SkipNet needs sides that are multiples of {side}, got {h}×{w}"
        )
        x = z.reshape(1, n * c, h, w) if self.nets > 1 else z  # (1, n·C_in, H, W): group i = network i
        return torch.sigmoid(self.head(self.body(x))).reshape(n, self.out_channels, h, w)

    @classmethod
    def stack(cls, nets: Sequence[SkipNet]) -> SkipNet:
        """One module running single networks side by side: group i holds a copy of ``nets[i]``'s state."""
        require(len(nets) >= 1, "SkipNet.stack needs at least one network")
        first = nets[0]
        require(
            all(net.nets == 1 and net.config == first.config for net in nets),
            "SkipNet.stack takes single networks (nets=1) of one config",
        )
        with torch.device("meta"):  # no memory, no random init: every tensor is replaced below
            batched = cls(first.config, first.out_channels, nets=len(nets))
        states = [net.state_dict() for net in nets]
        # Weights (n·C_out, C_in, k, k), biases and BatchNorm vectors are group-major along dim 0.
        stacked = {k: v if v.ndim == 0 else torch.cat([s[k] for s in states]) for k, v in states[0].items()}
        batched.load_state_dict(stacked, assign=True)
        return batched


def skipnet_state_from_dip(state: dict[str, Tensor], scales: int = 3) -> dict[str, Tensor]:
    """A single :class:`SkipNet`'s state dict from one of the original DIP code's ``skip`` network.

    The original builds its network with ``Module.add``, which names children ``"1"``, ``"2"``, …; each
    conv is a ``Sequential(padding, Conv2d)``; a scale is ``Concat(skip, deeper)`` (children ``0``, ``1``),
    BatchNorm, 3×3 conv, BatchNorm, act, 1×1 conv, BatchNorm, act, and the next scale sits in ``deeper``
    at index 7, after its two down convs. The final 1×1 conv is ``9``.

    Args:
        state: the original network's ``state_dict()``.
        scales: its number of scales.

    Returns:
        The same tensors under this module's names (for ``SkipNet(...).load_state_dict``).
    """
    names = {"9.1.": "head."}
    theirs, ours = "", "body."
    for _ in range(scales):
        for a, b in (
            ("1.0.1.1.", "skip.0."),
            ("1.0.2.", "skip.1."),
            ("1.1.1.1.", "down.0.0."),
            ("1.1.2.", "down.0.1."),
            ("1.1.4.1.", "down.1.0."),
            ("1.1.5.", "down.1.1."),
            ("2.", "merge_norm."),
            ("3.1.", "up.0.0."),
            ("4.", "up.0.1."),
            ("6.1.", "up.1.0."),
            ("7.", "up.1.1."),
        ):
            names[theirs + a] = ours + b
        theirs, ours = theirs + "1.1.7.", ours + "inner."
    out = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p) and key.count(".") == p.count(".")), None)
        require(prefix is not None, f"unexpected key {key!r} in a DIP skip network state dict")
        out[names[prefix] + key[len(prefix) :]] = value
    return out


def invert_vgg_tokens(
    targets: Tensor | Sequence[Tensor],
    vgg_tokens: VGGTokens,
    *,
    steps: int = 1800,
    lr: float = 1e-3,
    noise_scale: float = 0.1,
    jitter: float = 1 / 30,
    ema: float = 0.99,
    batch: int = 16,
    seed: int = 0,
    image_size: int = 224,
    net: SkipConfig = SkipConfig(),
    progress: bool = True,
) -> Tensor:
    """Images whose VGG16-BN features match the targets, by Deep Image Prior (docs/method.md §6.1).

    Image i gets its own :class:`SkipNet`, initialised under seed ``seed + i`` together with its fixed
    input (uniform noise × ``noise_scale``) and its jitter stream, so a result does not depend on
    ``batch``. Each step (:func:`fit_dip`): input + N(0, jitter²) → image → VGG16-BN (after a bicubic
    anti-aliased resize to 112², :func:`dip_resize`) → loss = mean over the 5 maps of the MSE to the target
    maps → Adam. The result is the exponential moving average (``ema``) of the outputs over the steps.
    Runs on the targets' device, in float32 for float16/bfloat16/float32 targets (Adam on half-precision
    weights is unstable) and in float64 for float64 targets (which makes runs comparable exactly).
    The VGG runs in its own dtype.

    Args:
        targets: (N, T, D) VGG tokens (e.g. the low-level BIT's predictions; T = 7,190, D = 512), folded
            back into maps by ``vgg_tokens.to_maps``; or the five maps [(N, C_i, H_i, W_i)] themselves.
        vgg_tokens: the frozen VGG16-BN and its token layout (on the targets' device).
        steps: Adam steps per image.
        lr: Adam learning rate.
        noise_scale: scale of the uniform noise input.
        jitter: std of the Gaussian noise added to the input at each step.
        ema: weight of the running average in the output average.
        batch: images optimised together as one batched network (memory grows linearly).
        seed: seed of image 0 (image i uses ``seed + i``).
        image_size: side of the DIP output (a multiple of 2**net.scales).
        net: the DIP network's shape.
        progress: show a progress bar (on a terminal).

    Returns:
        (N, 3, image_size, image_size) in [0, 1], float32 (float64 for float64 targets), on the targets'
        device.

    Raises:
        BrainITError: targets of the wrong shape, a VGG on another device, or bad settings.
    """
    maps = _target_maps(targets, vgg_tokens)
    n, device = maps[0].shape[0], maps[0].device
    require(steps >= 1 and batch >= 1, f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    require(0.0 <= ema < 1.0, f"ema must be in [0, 1), got {ema}")
    side = 2**net.scales
    require(image_size % side == 0, f"image_size must be a multiple of {side} (2**scales), got {image_size}")
    vgg_device = next(vgg_tokens.vgg.net.parameters()).device
    require(
        vgg_device == device,
        f"the VGG is on {vgg_device} but the targets are on {device}; move it with vgg_tokens.to(device)",
    )
    chunks = [range(i, min(i + batch, n)) for i in range(0, n, batch)]
    results = []
    with tqdm(
        total=steps * len(chunks), desc=f"DIP ({n} images)", unit="step", disable=None if progress else True
    ) as bar:
        for chunk in chunks:
            results.append(
                _invert_chunk(
                    [m[chunk.start : chunk.stop] for m in maps],
                    vgg_tokens.vgg,
                    seeds=[seed + i for i in chunk],
                    steps=steps,
                    lr=lr,
                    noise_scale=noise_scale,
                    jitter=jitter,
                    ema=ema,
                    image_size=image_size,
                    config=net,
                    bar=bar,
                )
            )
    return torch.cat(results)


def _invert_chunk(
    maps: list[Tensor],
    vgg: VGGFeatures,
    *,
    seeds: list[int],
    steps: int,
    lr: float,
    noise_scale: float,
    jitter: float,
    ema: float,
    image_size: int,
    config: SkipConfig,
    bar: tqdm,
) -> Tensor:
    """One batched DIP run over len(seeds) images: targets [(n, C_i, H_i, W_i)] → (n, 3, S, S)."""
    device, dtype = maps[0].device, maps[0].dtype
    nets, inputs, streams = [], [], []
    for s in seeds:
        # Everything random about image i comes from its seed alone, drawn on the CPU so that a network
        # starts the same on every device; the per-step jitter is drawn on the device (fast).
        # (torch.manual_seed would also reseed the caller's CUDA generators; only the CPU one is needed.)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            nets.append(SkipNet(config))
            inputs.append(torch.rand(config.in_channels, image_size, image_size) * noise_scale)
            stream_seed = int(torch.randint(2**62, ()))
        streams.append(torch.Generator(device).manual_seed(stream_seed))
    model = SkipNet.stack(nets).to(device, dtype)
    z = torch.stack(inputs).to(device, dtype)  # (n, C_in, S, S), fixed

    def noise(step: int) -> Tensor:  # image i's jitter comes from its own stream
        return torch.stack(
            [torch.randn(z.shape[1:], generator=g, device=device, dtype=dtype) for g in streams]
        )

    def report(step: int, out: Tensor, losses: Tensor, average: Tensor) -> None:
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:  # .item() waits for the GPU: not at every step
            bar.set_postfix(loss=f"{losses.mean().item():.4g}", refresh=False)

    return fit_dip(
        model, z, maps, vgg, steps=steps, lr=lr, jitter=jitter, ema=ema, noise=noise, callback=report
    )


def dip_resize(images: Tensor, size: int) -> Tensor:
    """The DIP output resized for the VGG: bicubic, anti-aliased, ``align_corners=False``, as the authors'
    low-level reconstruction does it. (B, 3, H, W) → (B, 3, size, size); a no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def fit_dip(
    model: SkipNet,
    z: Tensor,
    maps: Sequence[Tensor],
    vgg: VGGFeatures,
    *,
    steps: int,
    lr: float = 1e-3,
    jitter: float = 1 / 30,
    ema: float = 0.99,
    noise: Callable[[int], Tensor] | None = None,
    callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Optimise a DIP network (in place) so that the VGG maps of its images match ``maps``.

    The loop of the original: at step s the input is ``z + jitter · noise(s)``; the image goes through
    :func:`dip_resize` to the VGG's side, ImageNet normalisation and the VGG; the loss is the mean over the
    maps of the MSE (mean reduction) to the targets; one Adam step (torch defaults, learning rate ``lr``).
    The network stays in train mode throughout: every forward pass, the first included, normalises with
    BatchNorm *batch* statistics. The output average is ``out`` after the first step, then
    ``ema · average + (1 − ema) · out``.

    Args:
        model: the network (on z's device and dtype); its weights are updated.
        z: (n, C_in, S, S) the fixed input (one per network of ``model``).
        maps: the target maps [(n, C_i, H_i, W_i)].
        vgg: the frozen VGG returning the maps.
        steps: Adam steps.
        lr: Adam learning rate.
        jitter: std of the input noise.
        ema: weight of the running average in the output average.
        noise: ``noise(step)`` → a standard-normal draw shaped like ``z`` (default: ``torch.randn_like(z)``);
            a recorded sequence can be replayed through it.
        callback: ``callback(step, out, losses, average)`` after each step, with the step's images
            (n, 3, S, S) (detached), per-image losses (n,) and the running average.

    Returns:
        (n, 3, S, S) the output average, clamped to [0, 1].
    """
    model.train()  # as in the original: BatchNorm normalises with each image's own statistics
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    average = None
    for step in range(steps):
        draw = torch.randn_like(z) if noise is None else noise(step).to(z)
        out = model(z + jitter * draw)  # (n, 3, S, S)
        losses = _feature_losses(vgg(dip_resize(out, vgg.image_size)), maps)  # (n,)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # a sum, not a mean: each network gets exactly its own image's gradient
        optimizer.step()
        out = out.detach()
        average = out.clone() if average is None else average.mul_(ema).add_(out, alpha=1.0 - ema)
        if callback is not None:
            callback(step, out, losses.detach(), average)
    return average.clamp_(0.0, 1.0)


def _feature_losses(pred: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Per image, the mean over the maps of the MSE: [(n, C_i, H_i, W_i)] ×2 → (n,)."""
    per_map = [(p.to(t.dtype) - t).square().flatten(1).mean(dim=1) for p, t in zip(pred, target, strict=True)]
    return torch.stack(per_map).mean(dim=0)


def _target_maps(targets: Tensor | Sequence[Tensor], vgg_tokens: VGGTokens) -> list[Tensor]:
    """Validated target maps [(N, C_i, H_i, W_i)] from tokens (N, T, D) or from the maps, as float32 (float64
    if given so)."""
    layout = vgg_tokens.layout
    if isinstance(targets, Tensor):
        require(
            targets.ndim == 3 and tuple(targets.shape[1:]) == (layout.total, layout.width),
            f"VGG tokens must have shape (N, {layout.total}, {layout.width}) (VGG16-BN at 112²), "
            f"got {tuple(targets.shape)}",
        )
        require(targets.is_floating_point(), f"VGG tokens must be floating point, got {targets.dtype}")
        require(len(targets) > 0, "no VGG tokens to invert (N = 0)")
        maps = vgg_tokens.to_maps(targets.to(_compute_dtype(targets.dtype)))
    else:
        maps = list(targets)
        shapes = [tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__ for m in maps]
        require(
            len(maps) == len(layout.map_shapes)
            and all(isinstance(m, Tensor) and m.ndim == 4 and m.is_floating_point() for m in maps)
            and [tuple(m.shape[1:]) for m in maps] == list(layout.map_shapes)
            and len({m.shape[0] for m in maps}) == 1
            and maps[0].shape[0] > 0
            and len({(m.device, m.dtype) for m in maps}) == 1,
            f"target maps must be {len(layout.map_shapes)} float tensors (N, C, H, W), N > 0, of one dtype "
            f"and device, with (C, H, W) = {list(layout.map_shapes)}; got {shapes}",
        )
        maps = [m.to(_compute_dtype(m.dtype)) for m in maps]
    return maps


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
