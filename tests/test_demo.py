"""`parti demo`'s wiring end to end (the `smoke` size: tiny models, a few steps), and its resume."""

import dataclasses
import json

import pytest

from parti.cli import main
from parti.errors import PartiError


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
