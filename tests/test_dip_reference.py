"""The DIP against vectors recorded from the authors' low-level reconstruction (``tests/data/dip_reference.npz``).

Their ``skip`` network (8 channels instead of 128, a 128² output) is loaded into :class:`SkipNet` through
:func:`skipnet_state_from_dip`, their VGG stand-in (VGG16-BN's layout, width 8 between the tapped ReLUs)
goes through :class:`VGGFeatures`, and three optimisation steps are replayed with their recorded input
and jitter draws: the first forward pass, each step's image, its 112² resize, loss and output average.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.vgg import make_layers

from brainit_pl.backbones.vgg import TAPS, VGGFeatures, VGGTokens
from brainit_pl.recon.dip import SkipConfig, SkipNet, dip_resize, fit_dip, skipnet_state_from_dip

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

REF = Path(__file__).parent / "data" / "dip_reference.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(REF) as z:
        return {k: z[k] for k in z.files}


def group(ref, prefix):
    return {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in ref.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def vgg(ref):
    features = make_layers(json.loads(str(ref["dip/vgg_cfg"])), batch_norm=True)[: TAPS[-1] + 1]
    features.load_state_dict(group(ref, "dip/vgg/"))
    return VGGFeatures(features)


def skipnet(ref):
    call = json.loads(str(ref["dip/get_net_call"]))
    kw = {**call["kwargs"], **call["override"]}
    config = SkipConfig(
        in_channels=call["args"][0],
        channels=kw["skip_n33d"],
        skip_channels=kw["skip_n11"],
        scales=kw["num_scales"],
    )
    net = SkipNet(config)
    net.load_state_dict(skipnet_state_from_dip(group(ref, "dip/weights/"), config.scales))
    return net


def test_first_forward_pass_uses_batch_statistics(ref):
    net = skipnet(ref).train()  # never put in eval mode by the original
    out = net(torch.from_numpy(ref["dip/net_input"]))
    torch.testing.assert_close(out, torch.from_numpy(ref["dip/forward0_out"]), rtol=0, atol=1e-5)
    assert not torch.allclose(skipnet(ref).eval()(torch.from_numpy(ref["dip/net_input"])), out, atol=1e-3)


def test_three_steps_match_the_original_loop(ref, vgg):
    hp = json.loads(str(ref["dip/hparams"]))
    net, z = skipnet(ref), torch.from_numpy(ref["dip/net_input"])
    net.train()(z)  # their first forward pass (it only moves the BatchNorm running statistics)
    maps = VGGTokens(vgg).to_maps(torch.from_numpy(ref["dip/target_tokens"]).float()[None])
    jitter = torch.from_numpy(ref["dip/jitter_noise"])  # (3, 1, C, H, W)
    seen = []
    average = fit_dip(
        net,
        z,
        maps,
        vgg,
        steps=3,
        lr=hp["LR"],
        jitter=hp["reg_noise_std"],
        ema=hp["exp_weight"],
        noise=lambda step: jitter[step],
        callback=lambda step, out, loss, avg: seen.append((out.clone(), loss.clone(), avg.clone())),
    )
    for s, (out, loss, avg) in enumerate(seen):
        tol = 1e-5 if s == 0 else 1e-4
        torch.testing.assert_close(out[0], torch.from_numpy(ref["dip/step_out"][s]), rtol=0, atol=tol)
        resized = dip_resize(out, vgg.image_size)[0]
        torch.testing.assert_close(resized, torch.from_numpy(ref["dip/step_resized"][s]), rtol=0, atol=tol)
        assert abs(loss.item() / ref["dip/step_loss"][s] - 1) <= tol
        ema = torch.from_numpy(ref["dip/step_ema"][s]).permute(2, 0, 1)  # HWC as returned → CHW
        torch.testing.assert_close(avg[0], ema, rtol=0, atol=tol)
    torch.testing.assert_close(
        average[0], torch.from_numpy(ref["dip/step_ema"][2]).permute(2, 0, 1), rtol=0, atol=1e-4
    )
    # The weights moved as theirs did. Excepted: biases whose true gradient is zero, as a train-mode BatchNorm
    # follows (conv biases, at .0 of a (conv, BN, act) block; the concatenation's BatchNorm bias, as a conv
    # and a BatchNorm follow it): Adam moves them by amounts driven by rounding noise; and the running means
    # that follow those biases. Adam's first steps are ±lr whatever the gradient's size, hence 5e-4.
    after = skipnet_state_from_dip(group(ref, "dip/weights_after3/"))
    for key, value in net.state_dict().items():
        if not key.endswith((".0.bias", "merge_norm.bias", "running_mean", "num_batches_tracked")):
            torch.testing.assert_close(value, after[key], rtol=0, atol=5e-4, msg=key)


def test_the_resize_is_bicubic_and_antialiased(ref):
    out = torch.from_numpy(ref["dip/step_out"][:1])
    expected = torch.from_numpy(ref["dip/step_resized"][:1])
    torch.testing.assert_close(dip_resize(out, 112), expected, rtol=0, atol=1e-6)
    for mode, antialias in (("bilinear", True), ("bicubic", False)):
        other = torch.nn.functional.interpolate(out, (112, 112), mode=mode, antialias=antialias)
        assert (other - expected).abs().max() > 1e-3
