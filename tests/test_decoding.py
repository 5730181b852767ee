"""The sampler's fast path (parti.decoding; compiled, parti.compiled) against the slow, obvious one: packed
and unpacked weights, fp32 and bf16, with and without guidance; the compiled step against eager; the
fallbacks to eager."""

import logging

import pytest
import torch

from parti import compiled as compiled_step
from parti import decoding
from parti.errors import PartiError
from parti.generator import build_generator
from parti.pipeline import as_sampling_dtype
from parti.sampling import SamplingParams, generate, generate_naive

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_generator("tiny", grid_size=4).eval()  # 16 tokens: generate_naive stays quick
    return as_sampling_dtype(model, dtype) if dtype != torch.float32 else model


def condition(model, b=3, length=5):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(b, length, model.config.text_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 3:] = False  # a shorter prompt: padding must be ignored
    with torch.no_grad():
        return model.encode_condition(states, mask)


def sample(fn, model, ctx, mask, params, scale, **kw):
    params = SamplingParams(**{**params.__dict__, "guidance_scale": scale})
    return fn(model, ctx, mask, params=params, generator=torch.Generator().manual_seed(5), **kw)


@pytest.fixture
def no_packing(monkeypatch):
    monkeypatch.setattr(decoding, "mkl_packing_available", lambda: False)
    monkeypatch.setattr(decoding, "onednn_bf16_packing_available", lambda: False)


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("packed", [True, False])
def test_fp32_decoding_gives_the_naive_codes(request, packed, params, scale):
    if not packed:
        request.getfixturevalue("no_packing")
    model = tiny()
    ctx, mask = condition(model)
    assert torch.equal(sample(generate, model, ctx, mask, params, scale),
                       sample(generate_naive, model, ctx, mask, params, scale))


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("packed", [True, False])
def test_bf16_decoding_follows_the_naive_codes(request, packed, params, scale):
    """bf16 rounds each product once more or less depending on the kernel (rows per GEMM, packing, and the ISA:
    without native bf16, as on AVX2, oneDNN accumulates differently), so a code may flip where two logits are
    within a bf16 step, and every later code of that row then follows another prefix. So: each row agrees on
    its first tokens, and most codes agree (a wrong cache or mask would differ from the first token on)."""
    if not packed:
        request.getfixturevalue("no_packing")
    model = tiny(torch.bfloat16)
    ctx, mask = condition(model)
    fast = sample(generate, model, ctx, mask, params, scale)
    same = fast == sample(generate_naive, model, ctx, mask, params, scale)
    first_flip = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1))
    assert first_flip.min() >= 4 and same.float().mean() > 0.6, (first_flip, same.float().mean())
    assert torch.equal(fast, sample(generate, model, ctx, mask, params, scale))  # and it is deterministic


# ---- compile option and fallbacks ------------------------------------------------------------------

@pytest.fixture
def fresh_compile_state(monkeypatch):
    """No failure remembered from other tests, no warning already given."""
    monkeypatch.setattr(compiled_step, "_compile_failure", None)
    monkeypatch.setattr(compiled_step, "_warned", set())


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_compile_option_rejects_other_values(value):
    with pytest.raises(PartiError, match="compile must be True, False or 'auto'"):
        compiled_step.use_compile(value, torch.device("cpu"))


def test_auto_compiles_on_cuda_and_follows_the_cpu_measurement(monkeypatch, fresh_compile_state):
    monkeypatch.setattr(compiled_step, "compile_unavailable", lambda device: None)
    assert compiled_step.use_compile("auto", torch.device("cuda")) is True
    assert compiled_step.use_compile("auto", torch.device("cpu")) is compiled_step.CPU_AUTO_COMPILE
    monkeypatch.setattr(compiled_step, "CPU_AUTO_COMPILE", True)
    assert compiled_step.use_compile("auto", torch.device("cpu")) is True
    assert compiled_step.use_compile(False, torch.device("cuda")) is False


def test_no_cpp_compiler_means_eager_with_one_warning(monkeypatch, fresh_compile_state, caplog):
    monkeypatch.setattr(compiled_step.shutil, "which", lambda name: None)
    assert "C++ compiler" in compiled_step.compile_unavailable(torch.device("cpu"))
    model = tiny()
    ctx, mask = condition(model)
    with caplog.at_level(logging.WARNING, logger="parti.compiled"):
        a = sample(generate, model, ctx, mask, GREEDY, 3.0, compile=True)
        b = sample(generate, model, ctx, mask, GREEDY, 3.0, compile=True)
        c = sample(generate, model, ctx, mask, GREEDY, 3.0, compile="auto")  # auto: eager, silently
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0].getMessage()
    assert torch.equal(a, sample(generate, model, ctx, mask, GREEDY, 3.0)) and torch.equal(a, b)
    assert torch.equal(a, c)


def test_compile_failure_falls_back_to_eager_once(monkeypatch, fresh_compile_state, caplog):
    """An exception while compiling (here torch.compile itself raising) is logged once; decoding then
    runs eager, gives the eager codes, and later calls do not try again."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("inductor exploded\nsecond line of a long traceback")

    monkeypatch.setattr(compiled_step, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken)
    model = tiny()
    ctx, mask = condition(model)
    with caplog.at_level(logging.WARNING, logger="parti.compiled"):
        a = sample(generate, model, ctx, mask, SAMPLED, 3.0, compile=True)
        b = sample(generate, model, ctx, mask, SAMPLED, 1.0, compile=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "inductor exploded" in warnings[0] and "second line" not in warnings[0]
    assert len(calls) == 1
    assert torch.equal(a, sample(generate, model, ctx, mask, SAMPLED, 3.0))
    assert torch.equal(b, sample(generate, model, ctx, mask, SAMPLED, 1.0))


def test_static_shape_step_matches_the_eager_step():
    """What gets compiled, run eager: attention over the whole cache with later positions masked, text
    padded to a multiple of 8, gives the codes of the narrowed eager step."""
    model = tiny()
    # 3 and 6 rows attend by the fused loop over the whole cache; 8 (batch 4 with guidance) by the filled op.
    for b, scale in ((3, 1.0), (3, 3.0), (4, 3.0)):
        ctx, mask = condition(model, b=b)
        guided = scale != 1.0
        static = decoding.Decoder(model, batch=b, guided=guided, context_len=8, static=True, packed=False)
        eager = decoding.Decoder(model, batch=b, guided=guided, context_len=5)
        assert static.filled == (static.rows >= decoding.FILLED_ATTENTION_ROWS) and static.filled == (b == 4)
        with torch.inference_mode():
            for d in (static, eager):
                d.start(ctx, mask, model)
            tokens = torch.randint(0, model.config.num_codes, (static.rows, 16))
            for p in range(16):
                torch.testing.assert_close(static.step(tokens[:, p:p + 1], p), eager.step(tokens[:, p:p + 1], p),
                                           rtol=1e-5, atol=1e-5)


# ---- the compiled step (inductor builds C++ on the first call: tens of seconds on 2 cores) -----------

@pytest.mark.slow
@pytest.mark.parametrize("b, scale", [(3, 1.0), (3, 3.0), (4, 3.0)])  # batch 4 guided: the filled-cache op
def test_compiled_decoding_gives_the_eager_codes(fresh_compile_state, b, scale, caplog):
    if compiled_step.compile_unavailable(torch.device("cpu")):
        pytest.skip(compiled_step.compile_unavailable(torch.device("cpu")))
    model = tiny()
    ctx, mask = condition(model, b=b)
    with caplog.at_level(logging.INFO, logger="parti.compiled"):
        for params in (GREEDY, SAMPLED):
            compiled = sample(generate, model, ctx, mask, params, scale, compile=True)
            assert torch.equal(compiled, sample(generate, model, ctx, mask, params, scale))
            assert torch.equal(compiled, sample(generate_naive, model, ctx, mask, params, scale))
    assert compiled_step._compile_failure is None
    # Compiled once for this shape, its time logged and kept; later calls reuse it.
    assert sum("compiled the decoding step" in r.getMessage() for r in caplog.records) == 1
    with torch.inference_mode():
        d = compiled_step.decoder_for(model, batch=b, guided=scale != 1.0, context_len=5, compile=True)
    assert d.compiled is not None and d.compile_s > 0 and d.filled == (b == 4)


def test_weights_key_changes_with_the_weights_only():
    """The compiled CPU step freezes the weights; `weights_key` is what tells `decoder_for` to compile anew."""
    model = tiny()
    key = compiled_step.weights_key(model)
    assert compiled_step.weights_key(model) == key  # reading, sampling: the same key
    with torch.inference_mode():
        sample(generate, model, *condition(model), GREEDY, 3.0)
    assert compiled_step.weights_key(model) == key
    with torch.no_grad():
        model.head.weight.mul_(1.0)  # an in-place write, even of the same values
    assert compiled_step.weights_key(model) != key
    key = compiled_step.weights_key(model)
    model.load_state_dict(tiny(seed=1).state_dict())
    assert compiled_step.weights_key(model) != key


@pytest.mark.slow
def test_compiled_decoding_follows_changed_weights(fresh_compile_state, caplog):
    """Frozen weights are a snapshot: after the weights change (training between two sampling calls),
    the step is compiled once more with the weights as inputs, and gives the new weights' codes; later
    changes need no further compilation."""
    if compiled_step.compile_unavailable(torch.device("cpu")):
        pytest.skip(compiled_step.compile_unavailable(torch.device("cpu")))
    model = tiny()
    ctx, mask = condition(model)
    before = sample(generate, model, ctx, mask, GREEDY, 3.0, compile=True)
    with caplog.at_level(logging.INFO, logger="parti.compiled"):
        for seed in (1, 2):
            model.load_state_dict(tiny(seed=seed).state_dict())
            after = sample(generate, model, ctx, mask, GREEDY, 3.0, compile=True)
            assert torch.equal(after, sample(generate, model, ctx, mask, GREEDY, 3.0))
            assert not torch.equal(after, before)
            before = after
    messages = [r.getMessage() for r in caplog.records]
    assert sum("weights changed" in m for m in messages) == 1
    assert sum("compiled the decoding step" in m for m in messages) == 1  # the unfrozen one, once
    assert compiled_step._compile_failure is None


@pytest.mark.slow
def test_compiled_decoders_do_not_reach_the_recompile_limit(fresh_compile_state):
    """Every shape compiles its own graph (its own code object), so more than dynamo's limit of 8 compiled
    decoders in one process all stay compiled."""
    if compiled_step.compile_unavailable(torch.device("cpu")):
        pytest.skip(compiled_step.compile_unavailable(torch.device("cpu")))
    model = tiny()
    with torch.inference_mode():
        decoders = [compiled_step.decoder_for(model, batch=b, guided=True, context_len=5, compile=True)
                    for b in range(1, 11)]
    assert compiled_step._compile_failure is None and all(d.compiled is not None for d in decoders)


@pytest.mark.slow
def test_compiled_cpu_step_compiles_once_with_its_settings(fresh_compile_state):
    """The step is compiled in inference mode, as `generate` runs it: a decoder compiled under no_grad
    alone (a caller of `decoder_for`) must not compile again on its first sampling call, which would
    happen outside the frozen-weights / C++-wrapper settings."""
    if compiled_step.compile_unavailable(torch.device("cpu")):
        pytest.skip(compiled_step.compile_unavailable(torch.device("cpu")))
    from torch._dynamo.utils import counters

    model = tiny()
    ctx, mask = condition(model)
    with torch.no_grad():
        d = compiled_step.decoder_for(model, batch=3, guided=True, context_len=5, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert d.compiled is not None and graphs > 0
    codes = sample(generate, model, ctx, mask, SAMPLED, 3.0, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs  # no second compilation
    assert torch.equal(codes, sample(generate, model, ctx, mask, SAMPLED, 3.0))
    # The values are cached (rows, H, d, T) behind a (rows, H, T, d) view: contiguous along positions.
    k, v = d.cache[0]
    assert k.is_contiguous() and v.stride(-2) == 1 and v.shape == k.shape
