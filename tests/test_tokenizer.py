"""Stage-1 model: shapes, index ranges, straight-through gradients, save/load, presets."""

import json

import pytest
import torch

from parti.errors import PartiError
from parti.metrics import code_usage
from parti.tokenizer import TOKENIZER_PRESETS, build_tokenizer, load_tokenizer, save_tokenizer


@pytest.fixture
def tok():
    torch.manual_seed(0)
    return build_tokenizer("tiny")


def images(n=4, size=32):
    return torch.rand(n, 3, size, size) * 2 - 1


def test_codes_shape_and_range(tok):
    codes = tok.encode(images())
    assert codes.shape == (4, 8, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < tok.config.codebook_size


def test_ffhq128_grid_is_16x16():
    c = TOKENIZER_PRESETS["ffhq128"]
    assert (c.image_size, c.patch_size, c.grid_size, c.codebook_size, c.codebook_dim) == (128, 8, 16, 8192, 32)


def test_decode_encode_shape(tok):
    x = images()
    assert tok.decode(tok.encode(x)).shape == x.shape


def test_forward_named_result_matches_encode_in_eval(tok):
    tok.eval()
    x = images()
    out = tok(x)
    assert torch.equal(out.codes, tok.encode(x))
    assert torch.allclose(out.reconstruction, tok.decode(out.codes), atol=1e-5)
    usage, perplexity = code_usage(torch.bincount(out.codes.flatten(), minlength=tok.config.codebook_size))
    assert 0 < usage <= 1 and 1 <= perplexity <= tok.config.codebook_size


def test_straight_through_gradients_reach_encoder(tok):
    tok.train()
    out = tok(images())
    loss = (out.reconstruction ** 2).mean()  # no commitment term: only the straight-through path
    loss.backward()
    for name in ("patch_embed.weight", "encoder.blocks.0.attn.q.weight", "to_code.weight"):
        grad = dict(tok.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_dead_codes_are_restarted(tok):
    tok.train()
    tok(images(8))  # initialises the codebook from this batch
    q = tok.quantizer
    q.usage_ema.zero_()
    before = q.embedding.weight.detach().clone()
    tok(images(8))
    assert not torch.equal(before, q.embedding.weight), "dead codes should move onto encoder outputs"
    assert (q.usage_ema > 0).all()


def test_save_load_identical(tok, tmp_path):
    tok.train()
    tok(images(8))  # move weights/buffers off init
    tok.eval()
    save_tokenizer(tok, tmp_path / "t")
    loaded = load_tokenizer(tmp_path / "t")
    x = images()
    assert torch.equal(tok.encode(x), loaded.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))
    assert loaded.fingerprint() == tok.fingerprint()


def test_load_refuses_other_kind_and_bad_folders(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["kind"] = "generator"
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PartiError, match="generator checkpoint, not a tokenizer"):
        load_tokenizer(tmp_path / "g")
    with pytest.raises(PartiError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    # Another preset's config with these weights: a strict-load error, not a silent partial load.
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["config"]["dim"] = 32
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PartiError, match="does not match"):
        load_tokenizer(tmp_path / "t")


def test_truncated_weights_are_a_clear_error(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "t")
    w = tmp_path / "t" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(PartiError, match="corrupt or truncated"):
        load_tokenizer(tmp_path / "t")


def test_unknown_config_key_is_an_error(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["config"]["depth"] = 3
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PartiError, match="unknown config keys"):
        load_tokenizer(tmp_path / "t")


def test_wrong_image_size_and_bad_codes(tok):
    with pytest.raises(PartiError, match="expects images of shape"):
        tok.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(PartiError, match="codes must lie in"):
        tok.decode(torch.full((1, 8, 8), 10_000))


def test_ffhq128_parameter_count():
    counts = build_tokenizer("ffhq128").num_parameters()
    # ViT-VQGAN-Small widths: ~51M trainable; the VGG16 of the perceptual loss (14.7M features) lives
    # outside the model and is frozen.
    assert 45e6 < counts["trainable"] < 60e6 and counts["frozen"] == 0
