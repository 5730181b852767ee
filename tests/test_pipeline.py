"""The whole pipeline offline on CPU, through the CLI, as a user runs it:
train-tokenizer -> load in a new process -> train (trainable text encoder) -> sample from the folder alone.
Also: the tokenizer learns (held-out PSNR), caches and generators refuse a different tokenizer."""

import json
import subprocess
import sys

import pytest
import torch

from parti.errors import PartiError
from parti.sampling import SamplingParams


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "parti.cli", "-q", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"parti {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tok = root / "tok"
    # The command, verbatim but for the folder (perceptual loss off: no VGG weights offline).
    run("train-tokenizer", "--data", "synthetic", "--preset", "tiny", "--steps", "200", "--out", str(tok),
        "--perceptual-weight", "0", "--adversarial-weight", "0", "--synthetic-length", "2000",
        "--sample-every", "100", "--save-every", "100", "--no-progress")
    gen = root / "gen"
    run("train", "--data", "synthetic", "--tokenizer", str(tok), "--preset", "tiny", "--text-preset", "tiny",
        "--vocab-size", "300", "--steps", "60", "--batch-size", "16", "--out", str(gen), "--synthetic-length", "500",
        "--sample-every", "60", "--save-every", "30", "--no-progress")
    return {"root": root, "tok": tok, "gen": gen}


def test_tokenizer_run_folder(runs):
    tok = runs["tok"]
    for name in ("config.json", "model.safetensors", "run.json", "metrics.jsonl", "samples/step_0000200.png"):
        assert (tok / name).exists(), name
    run_json = json.loads((tok / "run.json").read_text())
    assert {"config", "git", "versions", "device"} <= set(run_json)
    assert not list(tok.rglob("*.pt")) and not list(tok.rglob("*.pkl"))


def test_load_tokenizer_round_trip_in_new_process(runs):
    code = ("import parti, torch; t = parti.load_tokenizer(%r); x = torch.rand(2, 3, 32, 32) * 2 - 1; "
            "c = t.encode(x); y = t.decode(c); print(tuple(c.shape), tuple(y.shape), c.dtype)") % str(runs["tok"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(2, 8, 8) (2, 3, 32, 32) torch.int64"


def test_tokenizer_learns(runs):
    """200 tiny steps must beat both the untrained model and the best image-independent output (the
    per-pixel mean of the training images) on held-out faces: the codes carry image content."""
    from parti.data import open_source
    from parti.metrics import psnr
    from parti.tokenizer import build_tokenizer, load_tokenizer

    val = open_source("synthetic", split="val", image_size=32)
    x = torch.stack([val[i]["image"] for i in range(64)])
    train = open_source("synthetic", split="train", image_size=32, synthetic_length=2000)
    mean = torch.stack([train[i]["image"] for i in range(256)]).mean(0, keepdim=True)
    trained = load_tokenizer(runs["tok"])
    untrained = build_tokenizer("tiny").eval()
    p_trained = psnr(trained.decode(trained.encode(x)).clamp(-1, 1), x).mean().item()
    p_untrained = psnr(untrained.decode(untrained.encode(x)).clamp(-1, 1), x).mean().item()
    p_mean = psnr(mean.expand_as(x), x).mean().item()
    assert p_trained > p_untrained + 5, (p_trained, p_untrained)
    assert p_trained > p_mean + 3, (p_trained, p_mean)


def test_generator_folder_is_self_contained(runs):
    gen = runs["gen"]
    for name in ("config.json", "model.safetensors", "tokenizer/config.json", "text_encoder/spm.model",
                 "cache/manifest.json", "samples/step_0000060.png"):
        assert (gen / name).exists(), name


def test_sample_from_checkpoint_alone_in_new_process(runs, tmp_path):
    out = tmp_path / "grid.png"
    run("sample", "--checkpoint", str(runs["gen"]), "--prompt", "a person with long red hair on a blue background",
        "--prompt", "short black hair, green background", "--num-images", "2", "--guidance-scale", "3",
        "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--seed", "1", "--out", str(out))
    from PIL import Image
    assert Image.open(out).size[0] > 0


def test_pipeline_seeds_and_codes(runs):
    import parti
    pipe = parti.load_pipeline(runs["gen"], device="cpu")
    a = pipe(["red hair", "blue background"], num_images_per_prompt=2, seed=3, return_codes=True)
    b = pipe(["red hair", "blue background"], num_images_per_prompt=2, seed=3, return_codes=True)
    c = pipe(["red hair", "blue background"], num_images_per_prompt=2, seed=4, return_codes=True)
    assert a.images.shape == (4, 3, 32, 32) and a.codes.shape == (4, 8, 8)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert a.prompts == ["red hair", "red hair", "blue background", "blue background"]
    with pytest.raises(PartiError, match="no prompts"):
        pipe([])


def test_bf16_sampling_follows_fp32(runs):
    """dtype="bf16": bf16 generator weights and KV cache, fp32 logits. Teacher-forced logits stay within
    bf16 rounding of fp32's, and greedy codes mostly agree (exact ties aside, which bf16 may flip)."""
    import parti
    from parti.device import sampling_dtype

    fp32 = parti.load_pipeline(runs["gen"], device="cpu", dtype="fp32")
    bf16 = parti.load_pipeline(runs["gen"], device="cpu", dtype="bf16")
    assert {p.dtype for p in bf16.generator.layers.parameters()} == {torch.bfloat16}
    assert bf16.generator.head.weight.dtype == torch.float32  # logits are fp32 either way
    assert sampling_dtype("auto", torch.device("cpu")) == torch.float32
    prompts = ["red hair", "blue background", "a hat", "green background"]
    a = fp32(prompts, SamplingParams(temperature=0), return_codes=True)
    b = bf16(prompts, SamplingParams(temperature=0), return_codes=True)
    assert b.images.dtype == torch.float32 and torch.isfinite(b.images).all()
    assert (a.codes == b.codes).float().mean() > 0.5
    states, mask = fp32.text_encoder.encode(prompts)
    codes = a.codes.flatten(1)
    want = fp32.generator(codes, *fp32.generator.encode_condition(states, mask))
    got = bf16.generator(codes, *bf16.generator.encode_condition(states, mask))
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(PartiError, match="dtype must be one of"):
        parti.load_pipeline(runs["gen"], device="cpu", dtype="fp16")


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "top_k"), (["--top-p", "1.5"], "top_p"), (["--temperature", "-1"], "temperature")])
def test_sample_cli_rejects_bad_values(runs, args, message, tmp_path):
    proc = run("sample", "--checkpoint", str(runs["gen"]), "--prompt", "x", "--out", str(tmp_path / "a.png"),
               *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sample_cli_no_prompt(runs, tmp_path):
    proc = run("sample", "--checkpoint", str(runs["gen"]), "--out", str(tmp_path / "a.png"), check=False)
    assert proc.returncode == 2 and "no prompts" in proc.stderr


def test_generator_refuses_another_tokenizer(runs, tmp_path):
    import shutil

    from parti.pipeline import load_pipeline
    from parti.tokenizer import build_tokenizer, save_tokenizer

    other = build_tokenizer("tiny")
    copy = tmp_path / "gen"
    shutil.copytree(runs["gen"], copy, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    save_tokenizer(other, copy / "tokenizer")
    with pytest.raises(PartiError, match="not the tokenizer the generator was trained with"):
        load_pipeline(copy)


def test_generator_refuses_another_trainable_text_encoder(runs, tmp_path):
    """A text_encoder/ folder swapped for another one (same config, other weights) is refused on load."""
    import shutil

    from parti.pipeline import load_pipeline
    from parti.text import load_text_encoder, save_text_encoder

    copy = tmp_path / "gen"
    shutil.copytree(runs["gen"], copy, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    load_pipeline(copy, device="cpu")  # its own encoder loads
    encoder = load_text_encoder(copy / "text_encoder")
    with torch.no_grad():
        next(encoder.parameters()).add_(0.01)
    save_text_encoder(encoder, copy / "text_encoder")
    with pytest.raises(PartiError, match="not the text encoder the generator was trained with"):
        load_pipeline(copy, device="cpu")


def test_cache_refused_after_tokenizer_changes(runs, tmp_path):
    from parti.cache import CodeCache
    from parti.tokenizer import load_tokenizer, save_tokenizer

    cache = CodeCache(runs["gen"] / "cache", "train")
    cache.check(tokenizer_fingerprint=load_tokenizer(runs["tok"]).fingerprint(), text_identity=None)
    changed = load_tokenizer(runs["tok"])
    with torch.no_grad():
        changed.to_pixels.weight.add_(0.01)  # "retrained": same config, different weights
    save_tokenizer(changed, tmp_path / "tok2")
    fp = load_tokenizer(tmp_path / "tok2").fingerprint()
    with pytest.raises(PartiError, match="re-run `parti encode`"):
        cache.check(tokenizer_fingerprint=fp, text_identity=None)
    # Through the CLI: training on that cache with the changed tokenizer is refused in one line.
    proc = run("train", "--data", str(runs["gen"] / "cache"), "--tokenizer", str(tmp_path / "tok2"), "--preset",
               "tiny", "--text-preset", "tiny", "--steps", "2", "--out", str(tmp_path / "g2"), "--no-progress",
               check=False)
    assert proc.returncode == 2 and "re-run `parti encode`" in proc.stderr


def test_encode_command_and_cache_contents(runs, tmp_path):
    from parti.cache import CodeCache

    run("encode", "--data", "synthetic", "--tokenizer", str(runs["tok"]), "--out", str(tmp_path / "c"),
        "--max-items", "40", "--batch-size", "16")
    cache = CodeCache(tmp_path / "c", "train")
    assert len(cache) == 40 and cache.codes[0].dtype.name == "uint16"
    item = cache[5]
    assert item["codes"].shape == (64,) and isinstance(item["caption"], str) and item["caption"]


@pytest.mark.parametrize("capability, want", [((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_sampling_dtype_follows_compute_capability(monkeypatch, capability, want):
    """A T4 (7.5) reports bf16 as supported but only emulates it: auto keeps fp32 there, like the training
    rule (parti.runs.choose_mixed_precision), and picks bf16 from Ampere (8.0) on."""
    from parti.device import sampling_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert sampling_dtype("auto", torch.device("cuda")) == want
    assert sampling_dtype("fp32", torch.device("cuda")) == torch.float32


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folders):
    import parti
    return parti.load_pipeline(tiny_folders / "gen", device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images_per_prompt": 2.5}, "num_images_per_prompt must be a positive int"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive int"),
    ({"num_images_per_prompt": True}, "num_images_per_prompt must be a positive int"),
    ({"batch_size": 0}, "batch_size must be a positive int"), ({"batch_size": 2.5}, "batch_size must be a positive int"),
    ({"seed": -1}, "seed must be an int"), ({"seed": 2**63}, "seed must be an int"), ({"seed": 1.5}, "seed must be an int"),
    ({"seed": "1"}, "seed must be an int")])
def test_pipeline_rejects_bad_arguments_in_one_line(tiny_pipe, kwargs, message):
    with pytest.raises(PartiError, match=message) as e:
        tiny_pipe("red hair", **kwargs)
    assert "\n" not in str(e.value)


def test_pipeline_takes_sampling_params_whole(tiny_pipe):
    with pytest.raises(PartiError, match="sampling must be a parti.SamplingParams"):
        tiny_pipe("red hair", {"guidance_scale": 2.0})
    with pytest.raises(TypeError):
        tiny_pipe("red hair", guidance_scale=2.0)  # the old unpacked keywords are gone
    greedy = SamplingParams(temperature=0, guidance_scale=2.0)
    a = tiny_pipe(["red hair", "a hat"], greedy, seed=2**63 - 1, batch_size=1, return_codes=True)
    b = tiny_pipe(["red hair", "a hat"], greedy, seed=0, return_codes=True)
    assert torch.equal(a.codes, b.codes)  # greedy: the seed and the batching do not matter
    c = tiny_pipe(["red hair", "a hat"], SamplingParams(temperature=0, guidance_scale=1.0), return_codes=True)
    assert not torch.equal(a.codes, c.codes)  # the guidance scale reached the sampler


def test_pipeline_compile_option(tiny_folders):
    import parti
    with pytest.raises(PartiError, match="compile must be True, False or 'auto'"):
        parti.load_pipeline(tiny_folders / "gen", device="cpu", compile="yes")
    assert parti.load_pipeline(tiny_folders / "gen", device="cpu", compile=False).compile is False


@pytest.mark.parametrize("flag, want", [([], "auto"), (["--compile", "on"], True), (["--compile", "off"], False)])
def test_sample_cli_passes_compile_through(monkeypatch, tmp_path, flag, want):
    from parti import cli
    from parti.cli import main

    seen = {}

    def fake_load(path, **kw):
        seen.update(kw)
        raise PartiError("stop here")
    monkeypatch.setattr(cli, "load_pipeline", fake_load)
    assert main(["sample", "--checkpoint", "x", "--prompt", "a face", "--out", str(tmp_path / "a.png"), *flag]) != 0
    assert seen["compile"] == want
