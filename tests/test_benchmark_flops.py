"""The FLOP formulas behind the benchmarks' "share of peak" columns count what the code does: torch's
FlopCounterMode over the real calls (SDPA through its math backend, so attention is counted too, and no
MKL-packed weights, which it does not see) gives the same number."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from parti import decoding
from parti.generator import build_generator
from parti.sampling import SamplingParams, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(decoding, "mkl_packing_available", lambda: False)

    def count(fn):
        with sdpa_kernel(SDPBackend.MATH):
            return common.counted_flops(fn)
    return count


@pytest.mark.parametrize("text_layers", [0, 1])
def test_generator_flop_formulas_match_the_counted_operations(counted, text_layers):
    torch.manual_seed(0)
    gen = build_generator("tiny", text_layers=text_layers).eval()
    c, b, length = gen.config, 3, 5
    states, mask = torch.randn(b, length, c.text_dim), torch.ones(b, length, dtype=torch.bool)
    codes = torch.randint(0, c.num_codes, (b, c.seq_len))

    def forward():
        gen(codes, *gen.encode_condition(states, mask))

    assert counted(forward) == common.generator_forward_flops(c, batch=b, text_len=length)
    for scale in (3.0, 1.0):
        def sample(scale=scale):
            with torch.no_grad():
                ctx, ctx_mask = gen.encode_condition(states, mask)
            generate(gen, ctx, ctx_mask, params=SamplingParams(guidance_scale=scale, top_k=10))

        want = common.generator_sample_flops(c, batch=b, text_len=length, guided=scale != 1)
        assert counted(sample) == want, scale


def test_decode_parts_benchmark_times_the_linears_a_guided_step_runs(monkeypatch):
    """benchmarks/bench_decode_parts.py times `decode_linears` as the linear work of sampling: the same
    modules at the same row counts as one guided decoding step of `generate`."""
    from bench_decode_parts import decode_linears

    torch.manual_seed(0)
    gen = build_generator("tiny").eval()
    b = 3
    seen = []
    real = decoding.PackedLinear.__call__

    def spy(self, x):
        seen.append((self.linear, x.reshape(-1, self.linear.in_features).shape[0]))
        return real(self, x)

    ctx, mask = gen.encode_condition(torch.randn(b, 4, gen.config.text_dim), torch.ones(b, 4, dtype=torch.bool))
    with torch.no_grad():
        decoder = decoding.Decoder(gen, batch=b, guided=True, context_len=4)
        decoder.start(ctx, mask, gen)  # the text side runs once per prompt, not per step
        monkeypatch.setattr(decoding.PackedLinear, "__call__", spy)
        decoder.step(torch.full((2 * b, 1), gen.bos), 0)
    key = lambda pairs: sorted((id(m), rows) for m, rows in pairs)  # noqa: E731
    assert key(seen) == key(decode_linears(gen, b))


@pytest.mark.parametrize("guided", [True, False])
def test_generator_benchmark_floor_runs_the_linears_a_step_runs(monkeypatch, guided):
    """benchmarks/bench_generator.py's `linears_alone` (the floor the anchor's time is set against) runs,
    for each token, exactly the decoder's linears at the row counts one decoding step of `generate` uses,
    and counts the bytes of their weights."""
    from bench_generator import linears_alone

    torch.manual_seed(0)
    gen = build_generator("tiny").eval()
    b, T = 2, gen.config.seq_len
    real = decoding.PackedLinear.__call__
    seen = []

    def spy(self, x):
        seen.append((id(self.linear), x.reshape(-1, self.linear.in_features).shape[0]))
        return real(self, x)

    ctx, mask = gen.encode_condition(torch.randn(b, 4, gen.config.text_dim), torch.ones(b, 4, dtype=torch.bool))
    fn, nbytes = linears_alone(gen, b, guided=guided)
    monkeypatch.setattr(decoding.PackedLinear, "__call__", spy)
    with torch.inference_mode():
        decoder = decoding.Decoder(gen, batch=b, guided=guided, context_len=4)
        decoder.start(ctx, mask, gen)
        decoder.step(torch.full((decoder.rows, 1), gen.bos), 0)
    step = sorted(seen)
    seen.clear()
    fn()
    assert len(seen) == T * len(step)
    assert sorted(seen[:len(step)]) == step
    linears = [m for m in gen.modules() if isinstance(m, torch.nn.Linear) and id(m) in {i for i, _ in step}]
    assert nbytes == sum(p.numel() * p.element_size() for m in linears for p in m.parameters())
