"""Weight-only int8 decoding: the int8 linear against fp32, what is quantized, the load-time guard (a corrupted
scale is refused), and `--dtype int8` through the pipeline."""

import pytest
import torch
import torch.nn.functional as F

from parti import quantize
from parti.decoding import Decoder, PackedLinear
from parti.device import SAMPLING_DTYPES, sampling_dtype
from parti.errors import PartiError
from parti.generator import build_generator
from parti.quantize import MAX_INT8_ERROR, Int8Linear, check_int8, fixed_inputs, load_int8, quantize_int8
from parti.sampling import SamplingParams, generate
from parti.speculative import generate_speculative

pytestmark = [pytest.mark.usefixtures("one_intra_op_thread"),
              pytest.mark.skipif(not quantize.int8_available(), reason="no torch._weight_int8pack_mm")]


@pytest.fixture
def gen():
    torch.manual_seed(0)
    return build_generator("tiny").eval()


@pytest.mark.parametrize("shape", [(4, 64), (3, 2, 64), (1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_follows_the_float_one(shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape)
    q = Int8Linear(layer)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (96,)
    with torch.inference_mode():
        got, want = q(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.01


def test_only_the_decoder_layers_linears_are_quantized(gen):
    quantize_int8(gen)
    layer = gen.layers[0]
    for m in (layer.self_attn.q, layer.self_attn.kv, layer.self_attn.out, layer.cross_attn.q, layer.cross_attn.kv,
              layer.cross_attn.out, layer.mlp.fc1, layer.mlp.fc2):
        assert isinstance(m, Int8Linear)
    assert type(gen.head) is torch.nn.Linear and gen.head.weight.dtype == torch.float32  # the head stays fp32
    assert type(gen.text_proj) is torch.nn.Linear
    # the eager decoding step calls the int8 modules themselves, packing only the float head
    decoder = Decoder(gen, batch=1, guided=True, context_len=4)
    assert isinstance(decoder.linears[0]["fc1"], Int8Linear) and isinstance(decoder.head_linear, PackedLinear)


def test_the_guard_passes_int8_and_refuses_a_corrupted_scale(gen):
    with torch.inference_mode():
        reference = gen(*fixed_inputs(gen))
    quantize_int8(gen)
    assert check_int8(gen, reference) < MAX_INT8_ERROR / 4
    gen.layers[0].mlp.fc1.scale[3] *= 300  # one channel's scale corrupted
    with pytest.raises(PartiError, match="int8 weights change this generator's logits") as err:
        check_int8(gen, reference)
    assert "\n" not in str(err.value) and "--dtype fp32" in str(err.value)


def test_int8_sampling_follows_fp32(gen):
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 5, gen.config.text_dim, generator=g)
    ctx, mask = gen.encode_condition(states, torch.ones(2, 5, dtype=torch.bool))
    greedy = SamplingParams(temperature=0, guidance_scale=2.0)
    want = generate(gen, ctx, mask, params=greedy)
    load_int8(gen)
    got = generate(gen, ctx, mask, params=greedy)
    assert (got == want).float().mean() > 0.5  # near-ties may flip, and a flip changes what follows
    # speculative decoding runs on int8 weights too: greedy SJD is greedy sampling of the same (int8) model
    spec = generate_speculative(gen, ctx, mask, params=SamplingParams(**{**vars(greedy), "sjd_window": 4}))
    assert torch.equal(spec.codes, got)


def test_int8_refuses_other_devices(gen):
    with pytest.raises(PartiError, match="int8 weights are for CPU decoding"):
        quantize_int8(gen.to("meta"))


def test_int8_is_a_sampling_dtype_that_auto_never_picks():
    assert "int8" in SAMPLING_DTYPES
    assert sampling_dtype("int8", torch.device("cpu")) == torch.float32  # blocks and cache stay fp32
    assert sampling_dtype("auto", torch.device("cpu")) == torch.float32


def test_the_pipeline_loads_int8_and_refuses_a_bad_quantization(tiny_folders, monkeypatch):
    from parti.pipeline import load_pipeline

    pipe = load_pipeline(tiny_folders / "gen", device="cpu", dtype="int8", compile=False)
    assert isinstance(pipe.generator.layers[0].mlp.fc1, Int8Linear)
    out = pipe(["red hair"], SamplingParams(top_k=8), num_images_per_prompt=2, return_codes=True)
    assert out.codes.shape == (2, 8, 8)

    real = quantize.quantize_int8

    def corrupting(model):
        real(model)
        model.layers[-1].self_attn.out.scale.mul_(50)
        return model

    monkeypatch.setattr(quantize, "quantize_int8", corrupting)
    with pytest.raises(PartiError, match="sample with --dtype fp32"):
        load_pipeline(tiny_folders / "gen", device="cpu", dtype="int8", compile=False)
