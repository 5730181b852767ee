"""Stage-2 model and sampling: KV cache vs naive, causality, guidance, seeds, save/load, overfitting."""

import json

import pytest
import torch
import torch.nn.functional as F

from parti.errors import PartiError
from parti.generator import build_generator, load_generator, save_generator
from parti.decoding import (MIN_PACKED_ROWS, Decoder, PackedLinear, mkl_packing_available, null_cross_outputs,
                            onednn_bf16_packing_available)
from parti.sampling import SamplingParams, generate, generate_naive, select_next


@pytest.fixture
def gen():
    torch.manual_seed(0)
    return build_generator("tiny").eval()


def condition(gen, b=3, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, length, gen.config.text_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 3:] = False  # a shorter prompt: padding must be ignored
    return gen.encode_condition(states, mask)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_greedy_equals_naive(gen, scale):
    ctx, mask = condition(gen)
    params = SamplingParams(temperature=0.0, guidance_scale=scale)
    assert torch.equal(generate(gen, ctx, mask, params=params), generate_naive(gen, ctx, mask, params=params))


def test_cached_sampling_equals_naive_with_same_rng(gen):
    ctx, mask = condition(gen)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, guidance_scale=2.0)
    a = generate(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(5))
    b = generate_naive(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_sampled_codes_are_an_ordinary_tensor(gen):
    """generate runs under inference_mode but hands back a tensor callers may edit and use with autograd on."""
    ctx, mask = condition(gen)
    codes = generate(gen, ctx, mask, params=SamplingParams(temperature=0.0))
    assert not codes.is_inference() and not torch.is_inference_mode_enabled()
    codes[:, 0] = 0  # raises on an inference tensor outside inference mode
    emb = gen.token_emb(codes)  # and autograd can record an op on it
    assert emb.requires_grad


needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="this torch has no MKL packed GEMM")


@needs_mkl
@pytest.mark.parametrize("shape", [(8, 64), (3, 1, 64), (8, 1, 64), (40, 64)])
def test_packed_linear_matches_linear_for_any_rows(shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(*shape)
    want = F.linear(x, layer.weight, layer.bias)
    packed = PackedLinear(layer, rows=8)
    with torch.no_grad():
        assert packed.kind == "mkl"
        got = packed(x)
    assert set(vars(layer)) == set(vars(torch.nn.Linear(64, 96)))  # the layer itself holds no packed copy
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_packing_is_skipped_with_autograd():
    layer = torch.nn.Linear(16, 16)
    packed = PackedLinear(layer, rows=4)
    assert packed.kind == "mkl"
    x = torch.randn(4, 16, requires_grad=True)
    packed(x).sum().backward()  # grad mode: the plain path, so gradients flow
    assert x.grad is not None and layer.weight.grad is not None


def test_packing_skips_other_dtypes_and_few_fp32_rows():
    layer = torch.nn.Linear(16, 16).to(torch.float16)
    assert PackedLinear(layer, rows=4).kind is None
    layer = torch.nn.Linear(16, 16)
    assert PackedLinear(layer, rows=MIN_PACKED_ROWS - 1).kind is None  # weight-bound: packing would cost more


needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16_packing_available(), reason="no oneDNN bf16 packed GEMM")


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_bf16_packed_linear_matches_linear_for_any_rows(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    packed = PackedLinear(layer, rows=rows)
    for shape in [(rows, 64), (rows, 1, 64), (rows + 5, 64)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        want = F.linear(x, layer.weight, layer.bias)
        with torch.no_grad():
            assert packed.kind == "onednn"
            got = packed(x)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        # Both round to bf16 once from an fp32 accumulation: equal up to a bf16 step.
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    x = torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True)
    packed(x).float().sum().backward()  # grad mode: the plain path, so gradients flow
    assert x.grad is not None and layer.weight.grad is not None


@needs_onednn_bf16
def test_bf16_sampler_packs_its_blocks_and_samples_like_the_unpacked_one(monkeypatch):
    from parti import decoding
    from parti.pipeline import as_sampling_dtype

    torch.manual_seed(0)
    model = as_sampling_dtype(build_generator("tiny"), torch.bfloat16).eval()
    ctx, mask = condition(model)
    seen = []
    real = decoding.PackedLinear

    def spy(linear, rows):
        out = real(linear, rows)
        seen.append((linear.weight.dtype, out.kind))
        return out

    monkeypatch.setattr(decoding, "PackedLinear", spy)
    params = SamplingParams(temperature=0.0, guidance_scale=2.0)
    packed = generate(model, ctx, mask, params=params)
    assert (torch.bfloat16, "onednn") in seen
    monkeypatch.setattr(decoding, "onednn_bf16_packing_available", lambda: False)
    plain = generate(model, ctx, mask, params=params)
    # Greedy decoding through the same bf16 weights: the packed product must not change the argmax often.
    assert (packed == plain).float().mean() > 0.9


def decode_all(decoder, inputs, steps):
    """Logits (rows, steps, K) of `steps` decoding steps fed inputs[:, p] at position p."""
    return torch.stack([decoder.step(inputs[:, p:p + 1], p) for p in range(steps)], dim=1)


@pytest.mark.parametrize("static", [False, True])
def test_decoding_steps_match_teacher_forcing_with_and_without_packed_weights(static):
    torch.manual_seed(0)
    model = build_generator("tiny", grid_size=4).eval()
    ctx, mask = condition(model, b=4)
    codes = torch.randint(0, model.config.num_codes, (4, 3))
    inputs = torch.cat([torch.full_like(codes[:, :1], model.bos), codes[:, :-1]], dim=1)
    with torch.no_grad():
        want = model(codes, ctx, mask)  # teacher forcing through SDPA: no cache, no packing
        got = {}
        for packed in (False, True):
            decoder = Decoder(model, batch=4, guided=False, context_len=ctx.shape[1], static=static, packed=packed)
            if packed:
                assert decoder.head_linear.kind == ("mkl" if mkl_packing_available() else None)
            decoder.start(ctx, mask, model)
            got[packed] = decode_all(decoder, inputs, 3)
    torch.testing.assert_close(got[False], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[True], want, rtol=1e-4, atol=1e-4)


def test_null_rows_cross_attention_output_is_the_constant_whatever_the_query(gen):
    torch.manual_seed(0)
    null_x, null_mask = gen.null_condition(4, 5)  # one unmasked key among five
    with torch.no_grad():
        outs = null_cross_outputs(gen)
        for layer, want in zip(gen.layers, outs):
            x = torch.randn(4, 3, gen.config.dim) * 3
            got = layer.cross_attn(x, null_x, mask=null_mask[:, None, None, :])
            torch.testing.assert_close(got, want.expand_as(got), rtol=1e-5, atol=1e-6)
    assert len(outs) == gen.config.depth and outs[0].shape == (1, 1, gen.config.dim)


@pytest.mark.parametrize("packed", [False, True])
def test_decoding_with_null_outputs_matches_null_rows_in_the_batch(packed):
    torch.manual_seed(0)
    model = build_generator("tiny", grid_size=4).eval()
    b = 4
    ctx, mask = condition(model, b=b)
    null_x, null_mask = model.null_condition(b, ctx.shape[1])
    codes = torch.randint(0, model.config.num_codes, (b, 5))
    inputs = torch.cat([torch.full_like(codes[:, :1], model.bos), codes[:, :-1]], dim=1).repeat(2, 1)
    n = ctx.shape[1]

    with torch.no_grad():
        plain = Decoder(model, batch=2 * b, guided=False, context_len=n, packed=packed)
        plain.start(torch.cat([ctx, null_x]), torch.cat([mask, null_mask]), model)
        want = decode_all(plain, inputs, 5)
        guided = Decoder(model, batch=b, guided=True, context_len=n, packed=packed)
        if packed and mkl_packing_available():
            assert guided.linears[0]["cq"].rows == b and guided.linears[0]["fc1"].rows == 2 * b
        guided.start(ctx, mask, model)
        got = decode_all(guided, inputs, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The conditional and null halves differ: the shortcut did not just copy one into the other.
    assert (got[:b] - got[b:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rows"):
        plain.start(ctx, mask, model)


def test_causality(gen):
    ctx, mask = condition(gen)
    codes = torch.randint(0, gen.config.num_codes, (3, gen.config.seq_len))
    t = 20
    changed = codes.clone()
    changed[:, t] = (changed[:, t] + 1) % gen.config.num_codes
    a, b = gen(codes, ctx, mask), gen(changed, ctx, mask)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])  # logits up to t predict codes <= t from codes < t
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_padding_does_not_change_logits(gen):
    states = torch.randn(1, 4, gen.config.text_dim)
    padded = torch.cat([states, torch.randn(1, 3, gen.config.text_dim)], dim=1)
    m1 = torch.ones(1, 4, dtype=torch.bool)
    m2 = torch.cat([m1, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    codes = torch.randint(0, gen.config.num_codes, (1, 16))
    a = gen(codes, *gen.encode_condition(states, m1))
    b = gen(codes, *gen.encode_condition(padded, m2))
    assert torch.allclose(a, b, atol=1e-5)


def test_logits_are_fp32_under_autocast(gen):
    ctx, mask = condition(gen)
    codes = torch.randint(0, gen.config.num_codes, (3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gen(codes, ctx, mask).dtype == torch.float32


def test_guidance_scale_one_equals_conditional(gen):
    ctx, mask = condition(gen)
    params = SamplingParams(temperature=1.0, guidance_scale=1.0)
    a = generate(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(3))
    # Unguided sampling by hand: conditional rows only, same RNG draws.
    b = generate_naive(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # And the mixing formula at scale 1 returns the conditional logits exactly.
    from parti.sampling import guide as _guide
    logits = torch.randn(6, 10)
    assert torch.allclose(_guide(logits, 3, 1.0), logits[:3])


def test_guidance_changes_samples(gen):
    ctx, mask = condition(gen)
    a = generate(gen, ctx, mask, params=SamplingParams(temperature=0, guidance_scale=1.0))
    b = generate(gen, ctx, mask, params=SamplingParams(temperature=0, guidance_scale=8.0))
    assert not torch.equal(a, b)


def test_seeds(gen):
    ctx, mask = condition(gen)
    params = SamplingParams(temperature=1.0)
    run = lambda s: generate(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(select_next(logits, SamplingParams(top_k=2), g)) for _ in range(200)}
    assert draws == {0, 1}
    # p(0) ~ 0.72, p(1) ~ 0.26: top_p 0.5 keeps only the first token, 0.9 the first two.
    assert {int(select_next(logits, SamplingParams(top_p=0.5), g)) for _ in range(100)} == {0}
    assert {int(select_next(logits, SamplingParams(top_p=0.9), g)) for _ in range(300)} == {0, 1}
    assert int(select_next(logits, SamplingParams(temperature=0), g)) == 0


@pytest.mark.parametrize("params, keep", [
    (SamplingParams(), [0, 1, 2, 3, 4, 5]),
    (SamplingParams(temperature=0.5), [0, 1, 2, 3, 4, 5]),
    (SamplingParams(top_k=3), [0, 1, 3]),
    (SamplingParams(top_p=0.8), [0, 1, 3]),  # sorted masses 0.47, 0.26, 0.17 (+0.06): 0.73 < 0.8 <= 0.90
    (SamplingParams(top_k=4, top_p=0.8), [0, 1, 3]),
])
def test_draws_follow_the_filtered_softmax(params, keep):
    """Frequencies over 40,000 draws (a batch of 8,000 rows, 5 times) match the renormalised softmax of the
    kept tokens within 4 binomial standard errors; dropped tokens never appear."""
    logits = torch.tensor([2.0, 1.4, -0.5, 1.0, 0.0, -3.0])
    want = torch.zeros(6)
    want[keep] = (logits[keep] / max(params.temperature, 1e-6)).softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([select_next(logits.expand(8000, 6), params, g) for _ in range(5)])
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert set(draws.unique().tolist()) <= set(keep)
    sigma = (want * (1 - want) / draws.numel()).sqrt()
    assert torch.all((freq - want).abs() <= 4 * sigma + 1e-9), (freq, want)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"), ({"guidance_scale": -1.0}, "guidance_scale"),
    # nan < 0 is False: without a finiteness check guidance_scale=nan would sample constant codes
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"guidance_scale": "3"}, "guidance_scale"), ({"temperature": True}, "temperature"),
    ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"), ({"top_k": "50"}, "top_k"), ({"top_k": 50.0}, "top_k")])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(PartiError, match=message) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value)


def test_valid_sampling_params_of_other_number_types():
    import numpy as np

    assert SamplingParams(guidance_scale=3, temperature=np.float32(0.5), top_k=np.int64(5), top_p=1).top_k == 5


def test_save_load_same_logits(gen, tmp_path):
    save_generator(gen, tmp_path / "g", extra={"tokenizer_fingerprint": "abc"})
    loaded, data = load_generator(tmp_path / "g")
    ctx, mask = condition(gen)
    codes = torch.randint(0, gen.config.num_codes, (3, 64))
    assert torch.equal(gen(codes, ctx, mask), loaded(codes, *condition(loaded)))
    assert data["tokenizer_fingerprint"] == "abc"


def test_load_refuses_tokenizer_folder(tmp_path):
    from parti.tokenizer import build_tokenizer, save_tokenizer
    save_tokenizer(build_tokenizer("tiny"), tmp_path / "t")
    with pytest.raises(PartiError, match="tokenizer checkpoint, not a generator"):
        load_generator(tmp_path / "t")


def test_null_condition_replaces_dropped_rows(gen):
    states = torch.randn(2, 5, gen.config.text_dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ctx, m = gen.encode_condition(states, mask, drop=torch.tensor([True, False]))
    null, null_mask = gen.null_condition(1, 5)
    assert torch.equal(ctx[0], null[0]) and torch.equal(m[0], null_mask[0])
    assert m[1].all()


def test_overfits_a_handful_of_pairs():
    """Tiny generator + tiny trainable text encoder memorise 4 (caption, codes) pairs: greedy
    sampling then reproduces each caption's codes exactly."""
    from parti.text import TEXT_ENCODER_PRESETS, TrainableTextEncoder

    torch.manual_seed(0)
    captions = ["red hair blue background", "black hair green background",
                "blonde hair purple background", "white hair yellow background"]
    enc = TrainableTextEncoder(TEXT_ENCODER_PRESETS["tiny"])
    gen = build_generator("tiny", num_codes=64, grid_size=4, text_dim=enc.dim, cond_drop_prob=0.0)
    codes = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    ids, ids_mask = enc.tokenize(captions)
    params = list(gen.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(300):
        ctx, mask = gen.encode_condition(enc(ids, ids_mask), ids_mask)
        loss = F.cross_entropy(gen(codes, ctx, mask).reshape(-1, 64), codes.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    with torch.no_grad():
        ctx, mask = gen.encode_condition(enc(ids, ids_mask), ids_mask)
        out = generate(gen, ctx, mask, params=SamplingParams(temperature=0, guidance_scale=1.0))
    assert torch.equal(out, codes), f"final loss {loss.item():.4f}"
