"""Evaluation, offline on CPU: attribute accuracy is exact on the dataset's own faces, held-out prompts
really are held out, missing metric weights fail one metric (not the run), and both CLI commands work.

The generator folder is assembled once per module from untrained tiny parts, exactly as training exports
it: these tests check plumbing and bookkeeping, not image quality (training would triple the file's time).
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from parti import synthetic
from parti.data import to_tensor
from parti.errors import PartiError
from parti.evaluate import (GeneratorEvalConfig, TokenizerEvalConfig, attribute_accuracy, attribute_prompts,
                            evaluate_generator, evaluate_tokenizer, fid, format_table, holdout_attribute_prompts,
                            write_results)
from parti.metrics import fid_from_features


class RenderingPipeline:
    """Stands in for `Pipeline`: draws exactly the prompted face (unnamed attributes at random)."""

    def __init__(self, size: int = 32):
        self.size, self.calls = size, []

    def __call__(self, prompts, sampling=None, *, num_images_per_prompt=1, seed=0, batch_size=64):
        self.calls.append(list(prompts))
        rng = __import__("random").Random(seed)
        images = []
        for prompt in prompts:
            for _ in range(num_images_per_prompt):
                attrs = {**synthetic.sample_attributes(rng), **synthetic.parse_prompt(prompt)}
                images.append(to_tensor(synthetic.render_face(attrs, self.size), self.size))
        return SimpleNamespace(images=torch.stack(images))


@pytest.mark.parametrize("phrasing", ["describe", "captions"])
def test_attribute_accuracy_of_the_datasets_own_faces_is_100_percent(phrasing):
    pipe = RenderingPipeline()
    result = attribute_accuracy(pipe, num_prompts=24, images_per_prompt=2, seed=3, holdout=True, phrasing=phrasing)
    assert result["attribute_accuracy.overall"] == 1.0
    assert result["holdout_attribute_accuracy.overall"] == 1.0
    assert result["attribute_accuracy.background_color"] == result["attribute_accuracy.hair_color"] == 1.0
    assert result["attribute_accuracy.num_images"] == 48 and result["holdout_attribute_accuracy.num_images"] == 48
    assert result["chance.background_color"] == pytest.approx(1 / 6)
    assert result["chance.hair_color"] == pytest.approx(1 / 6) and result["chance.glasses"] == 0.5
    if phrasing == "describe":  # every attribute named and scored
        assert {f"attribute_accuracy.{name}" for name in synthetic.ATTRIBUTES} <= set(result)
    assert len(pipe.calls) == 1  # one batched pipeline call


def test_attribute_accuracy_scores_wrong_faces_as_wrong():
    class WrongBackground(RenderingPipeline):
        def __call__(self, prompts, sampling=None, **kwargs):
            out = super().__call__(prompts, sampling, **kwargs)
            out.images[:, :, :4, :4] = out.images[:, :, -4:, -4:] = 0.0  # gray-ish corners, mostly wrong
            out.images[:, :, :4, -4:] = out.images[:, :, -4:, :4] = 0.0
            return out

    result = attribute_accuracy(WrongBackground(), num_prompts=30, seed=0)
    assert result["attribute_accuracy.background_color"] < 0.5
    assert result["attribute_accuracy.hair_color"] == 1.0


def test_holdout_prompts_use_held_out_combinations_and_seen_prompts_avoid_them():
    held = holdout_attribute_prompts(num_prompts=12, seed=0)
    pairs = [(a["hair_color"], a["background_color"]) for a in held]
    assert set(pairs) == set(synthetic.HOLDOUT_COMBINATIONS)  # every held-out pair, twice
    seen = attribute_prompts(num_prompts=300, seed=0, holdout=True)
    assert not {(a["hair_color"], a["background_color"]) for a in seen} & set(synthetic.HOLDOUT_COMBINATIONS)
    assert attribute_prompts(num_prompts=5, seed=1) == attribute_prompts(num_prompts=5, seed=1)  # deterministic
    # What the pipeline is asked for is what the prompts say: parse the prompts it received.
    pipe = RenderingPipeline()
    attribute_accuracy(pipe, num_prompts=6, seed=0, holdout=True)
    asked = [synthetic.parse_prompt(p) for p in pipe.calls[0][6:12]]  # then 6 in held-out phrasings
    assert {(a["hair_color"], a["background_color"]) for a in asked} == set(synthetic.HOLDOUT_COMBINATIONS)


def test_reduced_fid_equals_the_full_computation():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 48, generator=gen, dtype=torch.float64) * 2 + 1
    b = torch.randn(9, 48, generator=gen, dtype=torch.float64) @ torch.randn(48, 48, generator=gen, dtype=torch.float64)
    assert fid(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A generator folder laid out as `train_generator` exports it: tokenizer/, text_encoder/, generator."""
    from parti import text
    from parti.generator import build_generator, save_generator
    from parti.tokenizer import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("eval_run") / "gen"
    torch.manual_seed(0)
    tokenizer = build_tokenizer("tiny", patch_size=8)  # 32 px, 4x4 codes from 256: 16 sampling steps
    save_tokenizer(tokenizer, root / "tokenizer")
    encoder = text.build_text_encoder("trainable", config=text.TEXT_ENCODER_PRESETS["tiny"])  # byte-level
    text.save_text_encoder(encoder, root / "text_encoder")
    generator = build_generator("tiny", num_codes=256, grid_size=4, text_dim=encoder.dim)
    save_generator(generator, root, extra={"tokenizer_fingerprint": tokenizer.fingerprint(),
                                           "text_encoder": encoder.identity()})
    return root


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_run):
    return tiny_run / "tokenizer"


# ---- tokenizer ---------------------------------------------------------------------------------------


def test_evaluate_tokenizer_offline_reports_missing_weights_and_the_rest(tiny_tokenizer, tmp_path):
    result = evaluate_tokenizer(TokenizerEvalConfig(checkpoint=tiny_tokenizer, data="synthetic", num_images=6,
                                                    batch_size=4, download=False))
    assert result["num_images"] == 6
    assert math.isfinite(result["psnr"]) and -1.0 <= result["ssim"] <= 1.0
    assert 0.0 < result["codebook_usage"] <= 1.0 and 1.0 <= result["codebook_perplexity"] <= 256
    assert result["lpips"] is None and result["rfid"] is None
    for name, flag in (("lpips", "--vgg-weights PATH"), ("rfid", "--inception PATH")):
        assert flag in result["errors"][name] and "\n" not in result["errors"][name]
    path = write_results(tmp_path / "eval.json", result)
    assert json.loads(path.read_text())["psnr"] == pytest.approx(result["psnr"])
    table = format_table(result)
    assert "psnr" in table and "rfid: unavailable" in table


def test_evaluate_tokenizer_rfid_with_local_inception_weights(tiny_tokenizer, tmp_path):
    from parti.inception import build_fid_inception

    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file(build_fid_inception().state_dict(), str(weights))
    result = evaluate_tokenizer(TokenizerEvalConfig(checkpoint=tiny_tokenizer, data="synthetic", num_images=2,
                                                    batch_size=2, inception=str(weights), download=False))
    assert math.isfinite(result["rfid"]) and "rfid" not in result["errors"]


# ---- generator ---------------------------------------------------------------------------------------

class PooledFeatures(nn.Module):
    """A cheap stand-in for the FID Inception: 4x4 average-pooled pixels, (B, 48)."""

    dim = 48

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def _tiny_clip_folder(folder):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "Ġ"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["th"] = len(vocab)  # the one merge below
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[("t", "h")]).save_pretrained(folder)
    return str(folder)


def test_evaluate_generator_on_synthetic(tiny_run, tmp_path):
    # batch_size 8: one sampling pass for the 4 FID/CLIP images, one for the 4 + 4 attribute prompts.
    result = evaluate_generator(GeneratorEvalConfig(checkpoint=tiny_run, data="synthetic", num_images=4, batch_size=8,
                                                    seed=0, clip=_tiny_clip_folder(tmp_path / "clip"), download=False,
                                                    holdout=True, attribute_prompts=4),
                                inception=PooledFeatures())
    assert math.isfinite(result["val_loss"]) and result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_loss"] < math.log(256) + 1  # a barely trained model is still near uniform over 256 codes
    assert math.isfinite(result["fid"]) and 0.0 <= result["clip_score"] <= 100.0 and result["errors"] == {}
    assert result["num_images"] == result["num_generated"] == 4
    for name in ("background_color", "hair_color"):
        assert 0.0 <= result[f"attribute_accuracy.{name}"] <= 1.0
        assert 0.0 <= result[f"holdout_attribute_accuracy.{name}"] <= 1.0
        assert result[f"chance.{name}"] == pytest.approx(1 / 6)
    assert "attribute_accuracy.overall" in result and result["settings"]["holdout"] is True
    table = format_table(result)
    assert "attribute_accuracy.hair_color" in table and "16.7%" in table  # the chance column


def test_evaluate_generator_without_metric_weights_still_reports_the_rest(tiny_run):
    result = evaluate_generator(GeneratorEvalConfig(checkpoint=tiny_run, data="synthetic", num_images=4, batch_size=4,
                                                    download=False, attribute_prompts=0))
    assert result["fid"] is None and result["clip_score"] is None and result["num_generated"] == 0
    assert "--inception PATH" in result["errors"]["fid"] and "--clip PATH" in result["errors"]["clip_score"]
    assert math.isfinite(result["val_loss"]) and not any(k.startswith("attribute_accuracy") for k in result)


# In-process (`main` returns the exit code): a subprocess per test would spend its time importing.

def test_cli_evaluate_writes_json_and_prints_a_table(tiny_run, tmp_path, capsys):
    from parti.cli import main

    out = tmp_path / "eval.json"
    code = main(["-q", "evaluate", "--checkpoint", str(tiny_run), "--data", "synthetic", "--num-images", "4",
                 "--attribute-prompts", "4", "--batch-size", "4", "--no-download", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    assert {"val_loss", "attribute_accuracy.background_color", "chance.hair_color", "errors"} <= set(data)
    assert "val_loss" in printed and "attribute_accuracy.hair_color" in printed and str(out) in printed


def test_cli_evaluate_tokenizer_defaults_to_the_checkpoint_folder(tiny_run, capsys):
    from parti.cli import main

    code = main(["-q", "evaluate-tokenizer", "--checkpoint", str(tiny_run), "--data", "synthetic",
                 "--num-images", "4", "--no-download"])
    assert code == 0 and "codebook_usage" in capsys.readouterr().out
    data = json.loads((tiny_run / "eval_tokenizer.json").read_text())  # a generator folder: its tokenizer/
    assert data["num_images"] == 4 and data["settings"]["checkpoint"] == str(tiny_run)


@pytest.mark.parametrize("command", ["evaluate", "evaluate-tokenizer"])
def test_cli_bad_checkpoint_is_one_line_exit_2(command, tmp_path, capsys):
    from parti.cli import main

    code = main(["-q", command, "--checkpoint", str(tmp_path / "nope"), "--data", "synthetic"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("parti: error:") and "does not exist" in lines[0]
    assert not (tmp_path / "nope").exists()  # nothing written for a failed evaluation


def test_bad_arguments_are_parti_errors(tiny_tokenizer, tiny_run, tmp_path):
    with pytest.raises(PartiError, match="num_images"):
        evaluate_tokenizer(TokenizerEvalConfig(checkpoint=tiny_tokenizer, data="synthetic", num_images=1))
    with pytest.raises(PartiError, match="phrasing"):
        attribute_accuracy(RenderingPipeline(), num_prompts=2, phrasing="poetry")
    with pytest.raises(PartiError, match="--data synthetic"):
        evaluate_generator(GeneratorEvalConfig(checkpoint=tiny_run, data=str(tmp_path), holdout=True))
