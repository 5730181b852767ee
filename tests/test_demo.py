"""`parti demo`'s wiring end to end (the `smoke` size: tiny models, a few steps), and its resume."""

import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch

from parti import synthetic
from parti.cli import main
from parti.data import to_tensor
from parti.errors import PartiError
from parti.evaluate import attribute_accuracy, score_attributes


def test_demo_smoke_end_to_end_and_rerun(tmp_path, capsys):
    out, images = tmp_path / "demo", tmp_path / "images"
    args = ["-q", "demo", "--size", "smoke", "--out", str(out), "--images", str(images), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert (images / "demo_samples.png").stat().st_size > 0
    assert (images / "demo_reconstructions.png").stat().st_size > 0
    acc = summary["attribute_accuracy"]
    for key in ("background_color", "hair_color"):
        assert 0.0 <= acc[f"attribute_accuracy.{key}"] <= 1.0
        assert abs(acc[f"chance.{key}"] - 1 / 6) < 1e-9
    assert (out / "generator" / "config.json").exists() and (out / "tokenizer" / "config.json").exists()
    printed = capsys.readouterr().out
    assert "background_color accuracy" in printed
    # The picture's own prompts are scored too, unasked-for glasses and hats included.
    assert acc["grid_attribute_accuracy.num_images"] == 36 and 0.0 <= acc["grid_attribute_accuracy.unasked"] <= 1.0
    assert 0.0 <= acc["heldout_phrasing_attribute_accuracy.overall"] <= 1.0
    # Rerunning skips the finished stages (no new resumes, same metrics) and redraws the pictures.
    metrics = (out / "generator" / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert (out / "generator" / "metrics.jsonl").read_text() == metrics
    again = json.loads((out / "demo.json").read_text())["seconds"]  # training times carried over
    assert again["tokenizer"] == summary["seconds"]["tokenizer"] > 0
    assert again["generator"] == summary["seconds"]["generator"] > 0


def test_a_demo_folder_made_with_other_settings_is_not_continued(tmp_path):
    """A key an older run.json lacks counts as its default: phrase pieces off, as before the setting existed."""
    from parti.demo import DemoConfig, _check_same_run, stage_configs

    _, gen_cfg = stage_configs(DemoConfig(out=str(tmp_path)), "cpu")
    run = tmp_path / "generator"
    run.mkdir()
    old = {k: v for k, v in dataclasses.asdict(gen_cfg).items() if k != "phrase_pieces"}
    (run / "run.json").write_text(json.dumps({"config": old}))
    assert gen_cfg.phrase_pieces  # the CPU demo's captions use them
    with pytest.raises(PartiError, match=r"phrase_pieces: False -> True.*pass --out NEW_FOLDER"):
        _check_same_run(run, gen_cfg)
    (run / "run.json").write_text(json.dumps({"config": {**old, "phrase_pieces": True}}))
    _check_same_run(run, gen_cfg)  # the same settings: continued
    (run / "run.json").write_text(json.dumps({"config": {**old, "phrase_pieces": True, "steps": 7}}))
    with pytest.raises(PartiError, match=r"steps: 7 -> 1600"):
        _check_same_run(run, gen_cfg)


def _faces(attrs_list, size=48):
    return torch.stack([to_tensor(synthetic.render_face(a, size), size) for a in attrs_list])


def test_unasked_glasses_and_hats_are_counted_as_errors():
    """Planted pictures: a face with glasses for a prompt that names none is an unasked-for feature; the same
    face for a prompt that asks for glasses is not, and a prompt that names no accessory is not wrong in accuracy."""
    base = dict(background_color="blue", hair_color="red", hair_length="long", skin_tone="tan",
                expression="smiling", glasses=False, hat=False)
    plain = "a person with red hair on a blue background"
    images = _faces([{**base, "glasses": True}, base, {**base, "hat": True, "glasses": True}, base])
    prompts = [plain, plain, "a person in glasses with red hair on a blue background", plain]
    out = score_attributes(images, prompts, prefix="p")
    assert out["p.unasked_glasses"] == pytest.approx(1 / 3)  # 1 of the 3 images whose prompt names no glasses
    assert out["p.unasked_hat"] == pytest.approx(1 / 4)  # the hat nobody asked for
    assert out["p.unasked"] == pytest.approx(2 / 7)
    assert out["p.overall"] == 1.0 and out["p.glasses"] == 1.0  # the colours and the asked-for glasses are right
    clean = score_attributes(_faces([base, base]), [plain, plain], prefix="p")
    assert clean["p.unasked"] == 0.0
    named = score_attributes(_faces([base]), ["a person with red hair, no glasses, no hat, blue background"],
                             prefix="p")
    assert "p.unasked" not in named  # every prompt names both: nothing can be unasked-for


class _FaithfulPipeline:
    """Draws each prompt's named attributes; unnamed accessories absent, as the captions teach."""

    def __call__(self, prompts, sampling=None, *, num_images_per_prompt=1, seed=0, batch_size=64):
        rng = random.Random(seed)
        attrs = [{**synthetic.sample_attributes(rng), "glasses": False, "hat": False, **synthetic.parse_prompt(p)}
                 for p in prompts for _ in range(num_images_per_prompt)]
        return SimpleNamespace(images=_faces(attrs, 32))


def test_attribute_accuracy_scores_held_out_phrasings_apart():
    result = attribute_accuracy(_FaithfulPipeline(), num_prompts=20, seed=2, holdout=True)
    assert result["heldout_phrasing_attribute_accuracy.overall"] == 1.0
    assert result["heldout_phrasing_attribute_accuracy.num_images"] == 20
    assert result["heldout_phrasing_attribute_accuracy.unasked"] == 0.0
    assert result["holdout_attribute_accuracy.overall"] == result["attribute_accuracy.overall"] == 1.0
    off = attribute_accuracy(_FaithfulPipeline(), num_prompts=20, seed=2, heldout_phrasing=False)
    assert not any(k.startswith("heldout_phrasing") for k in off)
