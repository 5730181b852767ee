"""Metrics against closed forms and direct references; FID Inception layout and loading; CLIP plumbing.

All offline: the Inception and CLIP networks are random-init; nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from parti import inception as inception_mod
from parti.errors import PartiError
from parti.inception import InceptionFeatures, build_fid_inception, load_fid_inception
from parti.metrics import (
    clip_score,
    clip_similarity,
    codebook_stats,
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_clip,
    perplexity_from_loss,
    psnr,
    ssim,
)

# ---------------------------------------------------------------------------------------------------
# FID


def test_fid_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    assert abs(fid_from_features(feats, feats)) < 1e-6 * np.trace(sigma)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # Diagonal: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(1 + 6.25 + 4 + 1)  # the same sum, by hand


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 3.0])
    a = mu1 + rng.standard_normal((n, d)) * np.sqrt(v1)
    b = mu2 + rng.standard_normal((n, d)) * np.sqrt(v2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fid_from_features(torch.from_numpy(a), b) == pytest.approx(expected, abs=0.03)


def test_fid_survives_singular_covariances():
    # Fewer samples than dimensions (rank-deficient covariances): finite and real, as pytorch-fid.
    gen = torch.Generator().manual_seed(1)
    value = fid_from_features(torch.randn(10, 32, generator=gen), torch.randn(10, 32, generator=gen))
    assert math.isfinite(value) and value > 0


def test_feature_statistics_validates_and_uses_float64():
    mu, sigma = feature_statistics(torch.randn(8, 3))
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    with pytest.raises(PartiError):
        feature_statistics(torch.randn(1, 3))


# ---------------------------------------------------------------------------------------------------
# PSNR / SSIM


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    # An offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01 -> 20 dB.
    out = psnr(x, x + 0.2)
    assert out.shape == (2,) and torch.allclose(out, torch.full((2,), 20.0, dtype=out.dtype))
    same = psnr(x, x)
    assert torch.isinf(same).all() and (same > 0).all()


def _numpy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Direct Wang et al. SSIM on (C, H, W) [0, 1] arrays: explicit loop over every valid 11x11 window."""
    off = np.arange(11) - 5.0
    g = np.exp(-(off**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[ch, i : i + 11, j : j + 11], b[ch, i : i + 11, j : j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identity_noise_and_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    small = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    large = (x + 0.5 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    s_small, s_large = ssim(x, small), ssim(x, large)
    assert (s_small < 1).all() and (s_large < s_small).all()
    ref = _numpy_ssim(((x[0].double() + 1) / 2).numpy(), ((large[0].double() + 1) / 2).numpy())
    assert s_large[0].item() == pytest.approx(ref, abs=1e-9)
    with pytest.raises(PartiError):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_ssim_matches_torchmetrics_map_on_valid_windows():
    # torchmetrics (1.9) reflect-pads and averages the whole map; skimage and Wang's reference code average
    # only the windows fully inside the image, as we do. The per-pixel maps agree there.
    tm = pytest.importorskip("torchmetrics.functional.image")
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 24, 24, generator=gen, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    _, full = tm.structural_similarity_index_measure(x, y, data_range=1.0, reduction="none", return_full_image=True)
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(dim=1)
    assert torch.allclose(ssim(x * 2 - 1, y * 2 - 1), ref.double(), atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# FID Inception

# pytorch-fid's checkpoint = torchvision Inception3(aux_logits=False) keys; each BasicConv2d holds
# conv.weight + bn.{weight, bias, running_mean, running_var}. Written out independently of the module.
_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
      "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [f"branch7x7dbl_{i}" for i in range(1, 6)] + [
    "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
_CONVS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
_CONVS += [f"Mixed_5{m}.{b}" for m in "bcd" for b in _A] + [f"Mixed_6a.{b}" for b in _B]
_CONVS += [f"Mixed_6{m}.{b}" for m in "bcde" for b in _C] + [f"Mixed_7a.{b}" for b in _D]
_CONVS += [f"Mixed_7{m}.{b}" for m in "bc" for b in _E]
PYTORCH_FID_KEYS = {f"{c}.{p}" for c in _CONVS
                    for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")}


@pytest.fixture(scope="module")
def fid_net() -> InceptionFeatures:
    torch.manual_seed(0)
    return build_fid_inception(pretrained=False)


def test_fid_inception_key_names_match_pytorch_fid(fid_net):
    state = fid_net.state_dict()
    ours = {k for k in state if not k.endswith("num_batches_tracked")}
    assert ours == PYTORCH_FID_KEYS
    assert not any(k.startswith(("fc.", "AuxLogits.")) for k in state)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)


def test_fid_inception_output_shape(fid_net):
    images = torch.rand(2, 3, 64, 48) * 2 - 1  # any size; resized to 299 inside
    feats = fid_net(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert not feats.requires_grad and not fid_net.training
    assert torch.equal(fid_net(images), feats)  # eval mode: deterministic
    stacked = extract_features([images, images[:1]], extractor=fid_net)
    assert stacked.shape == (3, 2048) and stacked.dtype == torch.float64


def _pytorch_fid_style_state(net: InceptionFeatures) -> dict[str, torch.Tensor]:
    """What the real .pth holds: our keys without BN step counters, plus the 1008-way classifier."""
    state = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def test_load_fid_inception_from_local_files(fid_net, tmp_path):
    ref = fid_net.state_dict()
    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(st_path))
    loaded = load_fid_inception(path=st_path, allow_download=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    assert not loaded.training
    # A test stand-in for the third-party pytorch-fid .pth (the package itself never writes pickles).
    pth_path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_pytorch_fid_style_state(fid_net), pth_path)
    from_pth = load_fid_inception(path=pth_path, allow_download=False)
    assert all(torch.equal(from_pth.state_dict()[k], v) for k, v in ref.items())
    bad = tmp_path / "bad.safetensors"
    save_file({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, str(bad))
    with pytest.raises(PartiError, match="--inception PATH"):
        load_fid_inception(path=bad)
    with pytest.raises(PartiError, match="--inception PATH"):
        load_fid_inception(path=tmp_path / "missing.safetensors")


def test_load_fid_inception_offline_without_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTI_HOME", str(tmp_path / "home"))
    with pytest.raises(PartiError, match="--inception PATH") as info:
        load_fid_inception(allow_download=False)
    assert "fid_inception.safetensors" in str(info.value)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(inception_mod.torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PartiError, match="--inception PATH"):
        load_fid_inception(allow_download=True)


def test_download_is_cached_as_safetensors(fid_net, tmp_path, monkeypatch):
    monkeypatch.setenv("PARTI_HOME", str(tmp_path))
    calls = []

    def fake_download(url, **kwargs):
        calls.append(url)
        assert kwargs["weights_only"] is True
        return _pytorch_fid_style_state(fid_net)

    monkeypatch.setattr(inception_mod.torch.hub, "load_state_dict_from_url", fake_download)
    first = load_fid_inception()
    assert (tmp_path / "fid_inception.safetensors").is_file() and calls == [inception_mod.FID_WEIGHTS_URL]
    second = load_fid_inception(allow_download=False)  # served from the cache, no second download
    assert len(calls) == 1
    assert torch.equal(first.state_dict()["Mixed_7c.branch_pool.conv.weight"],
                       second.state_dict()["Mixed_7c.branch_pool.conv.weight"])


# ---------------------------------------------------------------------------------------------------
# CLIP score


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    # Byte-level BPE vocabulary: every printable byte char as a word-final and a plain token, a few merges.
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "Ġ"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>")]  # tokenizers 0.2x wants pairs, not "a b" strings
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval(), tokenizer


def test_clip_score_plumbing():
    model, tokenizer = _tiny_clip()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 40, 48, generator=gen) * 2 - 1  # non-square, not the model's size
    texts = ["a smiling woman", "the man with a beard", "a face"]
    score = clip_score(images, texts, model=model, processor=tokenizer)
    assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 100.0
    assert clip_score(images, texts, model=model, processor=tokenizer) == score
    per_pair = clip_similarity(images, texts, model=model, processor=tokenizer)
    assert per_pair.shape == (3,) and (per_pair >= 0).all() and per_pair.mean().item() == pytest.approx(score)
    with pytest.raises(PartiError):
        clip_score(images, texts[:2], model=model, processor=tokenizer)


def test_load_clip_missing_local_folder_is_a_parti_error(tmp_path):
    with pytest.raises(PartiError, match="--clip PATH"):
        load_clip(str(tmp_path / "no_clip_here"), device="cpu")


# ---------------------------------------------------------------------------------------------------
# Codebook and perplexity


def test_codebook_stats_known_codes():
    uniform = torch.arange(16).repeat(5).view(5, 16)
    stats = codebook_stats(uniform, 16)
    assert stats["usage"] == 1.0 and stats["perplexity"] == pytest.approx(16.0)
    assert torch.equal(stats["counts"], torch.full((16,), 5))
    collapsed = codebook_stats(torch.full((4, 8), 3), 16)
    assert collapsed["usage"] == 1 / 16 and collapsed["perplexity"] == pytest.approx(1.0)
    half = codebook_stats(torch.tensor([0, 1, 2, 3]), 8)  # 4 of 8 codes, evenly: perplexity 4
    assert half["usage"] == 0.5 and half["perplexity"] == pytest.approx(4.0)
    with pytest.raises(PartiError):
        codebook_stats(torch.tensor([0, 16]), 16)


def test_perplexity_from_loss():
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(torch.tensor(math.log(1024.0))) == pytest.approx(1024.0)
    assert perplexity_from_loss(1e4) == math.inf
