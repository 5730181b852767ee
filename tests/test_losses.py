"""Tokenizer losses: VGG naming and weight loading (offline), LPIPS properties, hinge/adaptive maths,
and which parameters each TokenizerLoss term sends gradients to. CPU only, no downloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parti.errors import PartiError
from parti.losses import (
    LPIPS,
    LPIPS_HEADS_CACHE_NAME,
    VGG16_CACHE_NAME,
    Discriminator,
    LossConfig,
    TokenizerLoss,
    VGG16Features,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    load_vgg16_weights,
)


@pytest.fixture(autouse=True)
def parti_home(tmp_path, monkeypatch):
    home = tmp_path / "parti_home"
    monkeypatch.setenv("PARTI_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def lpips(tmp_path_factory):
    # Module-scoped fixtures run before the autouse one: point PARTI_HOME at a temp folder here too.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARTI_HOME", str(tmp_path_factory.mktemp("lpips_home")))
        torch.manual_seed(0)
        return LPIPS.build(pretrained=False)


def _images(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def _random_vgg_state(seed=1, *, with_classifier=False):
    torch.manual_seed(seed)
    state = {k: torch.randn(v.shape) for k, v in VGG16Features().state_dict().items()}  # as torchvision saves them
    if with_classifier:  # a full torchvision vgg16 state dict also holds the classifier
        state["classifier.0.weight"] = torch.randn(8, 4)
    return state


def test_vgg_keys_match_torchvision_naming_and_tap_shapes():
    model = VGG16Features()
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv indices in torchvision's vgg16
    expected = [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    assert list(model.state_dict()) == expected  # 13 conv layers, features.0 ... features.28
    assert len(convs) == 13
    taps = model(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in taps] == [
        (2, 64, 64, 64), (2, 128, 32, 32), (2, 256, 16, 16), (2, 512, 8, 8), (2, 512, 4, 4)]


def test_vgg_stays_frozen_under_parent_train():
    parent = nn.Sequential(VGG16Features())
    parent.train()
    assert not parent[0].training
    assert not any(p.requires_grad for p in parent.parameters())


def test_lpips_properties(lpips):
    x, y = _images(2, 3, 64, 64, seed=0), _images(2, 3, 64, 64, seed=1)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d_xy = lpips(x, y)
    assert d_xy.shape == (2,) and (d_xy > 0).all()
    assert torch.allclose(d_xy, lpips(y, x), rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not lpips.vgg.training


def test_lpips_gradients_reach_input_and_stay_finite(lpips):
    x = _images(1, 3, 32, 32, seed=2).requires_grad_(True)
    black = -torch.ones(1, 3, 32, 32)  # large all-zero feature regions: the norm's gradient must not be NaN
    lpips(x, black).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_split_pass_matches_the_joint_pass(lpips):
    """Training takes the real side without a graph (VGG's backward over half the images); the distance
    and the gradient must equal those of one VGG pass over both sides."""
    real, fake = _images(3, 3, 32, 32, seed=3), _images(3, 3, 32, 32, seed=4)
    grads = []
    for x_grad, y_grad in ((False, True), (True, False), (True, True)):  # the last one: the joint pass
        x, y = real.clone().requires_grad_(x_grad), fake.clone().requires_grad_(y_grad)
        d = lpips(x, y)
        (d * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        grads.append((d.detach(), x.grad, y.grad))
    (d_split, _, gy_split), (d_split2, gx_split2, _), (d_joint, gx_joint, gy_joint) = grads
    torch.testing.assert_close(d_split, d_joint, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_split2, d_joint, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gy_split, gy_joint, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gx_split2, gx_joint, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(lpips(real, fake), d_joint, rtol=1e-5, atol=1e-6)


def test_conv_weights_are_channels_last_and_save_contiguous(tmp_path):
    from parti.checkpoint import read_tensors, write_tensors

    d = Discriminator(image_size=32, channels=8)
    w = d.blocks[0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    write_tensors(tmp_path / "d.safetensors", d.state_dict())  # safetensors needs contiguous copies
    fresh = Discriminator(image_size=32, channels=8)
    fresh.load_state_dict(read_tensors(tmp_path / "d.safetensors"))
    x = _images(4, 3, 32, 32, seed=5)
    torch.testing.assert_close(fresh(x), d(x))
    assert fresh.blocks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_lpips_heads_are_torchmetrics_weights(lpips, parti_home):
    heads = [h.weight for h in lpips.heads]
    assert [tuple(w.shape) for w in heads] == [(1, 64, 1, 1), (1, 128, 1, 1), (1, 256, 1, 1), (1, 512, 1, 1),
                                               (1, 512, 1, 1)]
    assert all((w >= 0).all() for w in heads)  # LPIPS heads are trained non-negative; random init is not
    # The first build here reads torchmetrics' pickle and caches it; the second reads the safetensors cache.
    first = LPIPS.build(pretrained=False)
    assert (parti_home / LPIPS_HEADS_CACHE_NAME).is_file()
    again = LPIPS.build(pretrained=False)
    for a, b, c in zip(first.heads, again.heads, lpips.heads):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)


def test_load_vgg_from_local_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = _random_vgg_state(seed=3)
    path = tmp_path / "vgg.safetensors"
    save_file(state, str(path))
    model = VGG16Features()
    load_vgg16_weights(model, path=str(path), allow_download=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_load_vgg_from_local_pth_caches_safetensors(tmp_path, parti_home):
    state = _random_vgg_state(seed=4, with_classifier=True)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    model = VGG16Features()
    load_vgg16_weights(model, path=str(path), allow_download=False)
    assert torch.equal(model.state_dict()["features.28.weight"], state["features.28.weight"])
    # The pickle is read once; the features-only safetensors cache serves later loads without a path.
    assert (parti_home / VGG16_CACHE_NAME).is_file()
    other = VGG16Features()
    load_vgg16_weights(other, allow_download=False)
    assert torch.equal(other.state_dict()["features.0.weight"], state["features.0.weight"])


def test_load_vgg_errors_are_parti_errors(tmp_path, parti_home):
    with pytest.raises(PartiError) as err:
        load_vgg16_weights(VGG16Features(), allow_download=False)
    message = str(err.value)
    assert str(parti_home / VGG16_CACHE_NAME) in message and "--vgg-weights" in message
    assert "perceptual_weight=0" in message and "\n" not in message
    with pytest.raises(PartiError, match="not found"):
        load_vgg16_weights(VGG16Features(), path=str(tmp_path / "missing.pth"), allow_download=False)
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(2)}, wrong)
    with pytest.raises(PartiError, match="VGG16 features"):
        load_vgg16_weights(VGG16Features(), path=str(wrong), allow_download=False)


def test_lpips_build_pretrained_offline_without_weights_fails_cleanly():
    with pytest.raises(PartiError, match="--vgg-weights"):
        LPIPS.build(pretrained=True, allow_download=False)


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    assert torch.allclose(hinge_g_loss(fake), torch.tensor(1 / 3))


def test_adaptive_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = layer(x)
    rec = (out - 1).pow(2).mean()
    gan = -(out * torch.tensor([0.3, -2.0, 0.7])).mean()
    w = adaptive_weight(rec, gan, layer.weight)
    # By hand, out = x W^T + b over n*3 entries: d rec/dW = 2/(3n) (out-1)^T x; d gan/dW[j] = -c_j/(3n) sum_i x_i.
    with torch.no_grad():
        n = x.shape[0]
        g_rec = 2 / (n * 3) * (out - 1).T @ x
        g_gan = -(torch.tensor([0.3, -2.0, 0.7]).unsqueeze(1) / (n * 3)) * x.sum(0, keepdim=True)
        expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    assert torch.allclose(w, expected, rtol=1e-5)
    assert not w.requires_grad
    big = adaptive_weight(rec, gan * 1e-12, layer.weight, max_weight=7.0)
    assert big.item() == 7.0


def test_discriminator_size_at_128px():
    disc = Discriminator(image_size=128)  # default channels=64
    n_params = sum(p.numel() for p in disc.parameters())
    print(f"discriminator params at 128 px, channels=64: {n_params / 1e6:.2f}M")
    assert 0.5e6 < n_params < 30e6
    assert disc(_images(3, 3, 128, 128)).shape == (3,)  # batch not divisible by the stddev group: still works
    with pytest.raises(PartiError, match="power-of-two"):
        Discriminator(image_size=96)


def test_discriminator_blocks_convolve_after_downsampling():
    """Each block's second 3x3 conv runs at the output resolution (StyleGAN2's order), not at the input's."""
    disc = Discriminator(image_size=32, channels=8)
    seen = []
    for block in disc.blocks:
        block.conv2.register_forward_hook(lambda m, inp, out: seen.append((inp[0].shape[-1], out.shape[-1])))
    disc(_images(4, 3, 32, 32))
    assert seen == [(16, 16), (8, 8), (4, 4)]


def _tiny_setup(**overrides):
    config = LossConfig(disc_start=5, disc_channels=8, **overrides)
    loss = TokenizerLoss(config, image_size=32, pretrained_vgg=False)
    torch.manual_seed(0)
    decoder = nn.Conv2d(3, 3, kernel_size=1)  # stands in for the tokenizer's decoder; its weight is last_layer
    real = _images(2, 3, 32, 32, seed=5)
    fake = torch.tanh(decoder(_images(2, 3, 32, 32, seed=6)))
    return loss, decoder, real, fake


def test_before_disc_start_no_adversarial_term_and_no_disc_grad():
    loss, decoder, real, fake = _tiny_setup()
    total, logs = loss.generator_loss(real, fake, commit_loss=torch.tensor(0.25), step=4,
                                      last_layer=decoder.weight)
    assert logs["adv"] == 0.0 and logs["adaptive_weight"] == 0.0
    assert logs["total"] == pytest.approx(logs["l2"] + logs["l1"] + 0.1 * logs["perceptual"] + 0.25, rel=1e-5)
    assert set(logs) == {"l2", "l1", "perceptual", "commit", "adv", "adaptive_weight", "total"}
    assert all(isinstance(v, float) for v in logs.values())
    total.backward()
    assert decoder.weight.grad is not None
    assert all(p.grad is None for p in loss.discriminator.parameters())
    d_loss, d_logs = loss.discriminator_loss(real, fake, step=4)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs["d_loss"] == 0.0


def test_after_disc_start_disc_grads_come_only_from_discriminator_loss():
    loss, decoder, real, fake = _tiny_setup()
    total, logs = loss.generator_loss(real, fake, commit_loss=torch.tensor(0.0), step=5,
                                      last_layer=decoder.weight)
    assert logs["adv"] != 0.0 and logs["adaptive_weight"] > 0.0
    total.backward()
    assert decoder.weight.grad is not None
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters())  # flags restored after the G pass
    decoder.zero_grad(set_to_none=True)
    d_loss, d_logs = loss.discriminator_loss(real, fake, step=5)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert decoder.weight.grad is None  # fake is detached for D
    assert set(d_logs) == {"d_loss", "logits_real", "logits_fake"}


def test_one_pass_loss_matches_the_two_pass_form():
    """generator_loss backpropagates through VGG and D once each; its value and the gradients it gives the
    decoder (through the reconstruction and the commitment term) equal taming's two-pass form:
    total = rec + commit + w * adv with w = adaptive_weight(rec, adv, last_layer), total.backward()."""
    from parti.losses import hinge_g_loss

    def run(one_pass: bool):
        loss, decoder, real, fake = _tiny_setup()
        commit = 0.01 * decoder.weight.pow(2).sum()
        if one_pass:
            total, logs = loss.generator_loss(real, fake, commit_loss=commit, step=5, last_layer=decoder.weight)
        else:
            cfg = loss.config
            rec = (cfg.l2_weight * torch.nn.functional.mse_loss(fake, real)
                   + cfg.l1_weight * torch.nn.functional.l1_loss(fake, real)
                   + cfg.perceptual_weight * loss.lpips(real, fake).mean())
            for q in loss.discriminator.parameters():
                q.requires_grad_(False)
            adv = hinge_g_loss(loss.discriminator(fake))
            w = adaptive_weight(rec, adv, decoder.weight)
            total, logs = rec + commit + cfg.adversarial_weight * w * adv, {"adaptive_weight": w.item()}
        total.backward()
        return total.item(), logs["adaptive_weight"], decoder.weight.grad.clone(), decoder.bias.grad.clone()

    value, weight, g_w, g_b = run(True)
    ref_value, ref_weight, ref_w, ref_b = run(False)
    assert value == pytest.approx(ref_value, rel=1e-5) and weight == pytest.approx(ref_weight, rel=1e-4)
    assert weight > 0
    assert torch.allclose(g_w, ref_w, rtol=1e-4, atol=1e-7) and torch.allclose(g_b, ref_b, rtol=1e-4, atol=1e-7)


def test_adaptive_weight_needs_last_layer_or_can_be_off():
    loss, decoder, real, fake = _tiny_setup()
    with pytest.raises(PartiError, match="last_layer"):
        loss.generator_loss(real, fake, commit_loss=torch.tensor(0.0), step=5, last_layer=None)
    loss, decoder, real, fake = _tiny_setup(adaptive_weight=False)
    _, logs = loss.generator_loss(real, fake, commit_loss=torch.tensor(0.0), step=5, last_layer=None)
    assert logs["adaptive_weight"] == 1.0


def test_no_perceptual_builds_no_lpips_and_needs_no_weights(parti_home, caplog):
    config = LossConfig(perceptual_weight=0.0, adversarial_weight=0.0)
    with caplog.at_level("INFO", logger="parti.losses"):
        loss = TokenizerLoss(config, image_size=32)  # pretrained_vgg=True, yet nothing to load
    assert loss.lpips is None and loss.discriminator is None
    assert "perceptual_weight=0" in caplog.text
    assert not (parti_home / VGG16_CACHE_NAME).exists()
    real, fake = _images(2, 3, 32, 32, seed=7), _images(2, 3, 32, 32, seed=8)
    _, logs = loss.generator_loss(real, fake, commit_loss=torch.tensor(0.0), step=10**6, last_layer=None)
    assert logs["perceptual"] == 0.0 and logs["adv"] == 0.0


def test_pretrained_loss_offline_without_weights_fails_cleanly():
    with pytest.raises(PartiError, match="perceptual_weight=0"):
        TokenizerLoss(LossConfig(), image_size=32, allow_download=False)
