"""The FLOP formulas behind the benchmarks' "share of peak" columns count what the code does: torch's
FlopCounterMode over the real calls (SDPA through its math backend, so attention is counted too, and no
MKL-packed weights, which it does not see) gives the same number."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from parti import layers
from parti.generator import build_generator
from parti.sampling import SamplingParams, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(layers, "mkl_packing_available", lambda: False)

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
