"""Run folders describe themselves; the metrics log survives interruptions and resumes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from parti.errors import PartiError
from parti.runs import MetricsLogger, RunFolder, config_changes, git_info, library_versions, read_metrics
from parti.device import choose_mixed_precision, detect_device

CONFIG = {"model": {"dim": 32, "depth": 2, "patch": (4, 4)}, "lr": 3e-4, "steps": 100}


def test_run_json_fields(tmp_path):
    run = RunFolder(tmp_path / "run", config=CONFIG, resume=False)
    assert (run.path / "samples").is_dir() and (run.path / "checkpoints").is_dir()
    info = json.loads((run.path / "run.json").read_text())
    assert info["config"]["model"]["patch"] == [4, 4]  # stored as JSON: tuples become lists
    assert set(info["git"]) == {"commit", "dirty"}
    assert info["git"]["commit"] is None or len(info["git"]["commit"]) == 40
    assert {"python", "torch", "transformers", "accelerate", "pyarrow", "numpy", "parti"} <= set(info["versions"])
    assert info["versions"]["torch"] and info["versions"]["numpy"]
    assert info["device"]["type"] in {"cpu", "cuda", "mps"} and info["device"]["count"] >= 1
    assert info["device"]["mixed_precision"] in {"no", "fp16", "bf16"}
    assert info["started"].endswith("+00:00") and isinstance(info["argv"], list)
    assert info["resumes"] == [] and run.resumed is False
    assert run.config == json.loads(json.dumps(CONFIG))


def test_resume_appends_and_keeps_old_content(tmp_path):
    first = RunFolder(tmp_path, config=CONFIG, resume=False)
    with MetricsLogger(first.metrics_path) as metrics:
        metrics.log(1, loss=1.0)
    second = RunFolder(tmp_path, config={**CONFIG, "steps": 200}, resume=True)
    third = RunFolder(tmp_path, config={**CONFIG, "steps": 300}, resume=True)
    info = json.loads((tmp_path / "run.json").read_text())
    assert second.resumed and third.resumed
    assert info["started"] == first.info["started"] and info["config"]["steps"] == 100  # the original run
    assert [r["config_changes"] for r in info["resumes"]] == [{"steps": [100, 200]}, {"steps": [100, 300]}]
    assert all({"time", "argv", "git", "versions", "device"} <= set(r) for r in info["resumes"])


def test_existing_run_without_resume_is_an_error(tmp_path):
    RunFolder(tmp_path, config=CONFIG, resume=False)
    (tmp_path / "checkpoints" / "step_000010").mkdir()
    changed = {**CONFIG, "model": {**CONFIG["model"], "dim": 64}}
    with pytest.raises(PartiError, match=r"different config \(model\.dim: 32 -> 64\).*--resume.*--out"):
        RunFolder(tmp_path, config=changed, resume=False)
    with pytest.raises(PartiError, match="--resume"):  # same config: a forgotten --resume must not clobber it
        RunFolder(tmp_path, config=CONFIG, resume=False)


def test_run_that_did_nothing_starts_over(tmp_path):
    RunFolder(tmp_path, config=CONFIG, resume=False)
    run = RunFolder(tmp_path, config={**CONFIG, "lr": 1e-3}, resume=False)
    assert run.config["lr"] == 1e-3 and not run.resumed


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PartiError, match="is a file"):
        RunFolder(tmp_path / "f", config=CONFIG, resume=False)


def test_config_changes_nested_and_missing():
    assert config_changes({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 3}) == {
        "a.b": [1, 2], "c": [2, None], "d": [None, 3]}


def test_metrics_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as metrics:
        metrics.log(0, loss=torch.tensor(2.5), lr=1e-3)
        metrics.log(10, loss=1.5)
        metrics.log(10, split="val", loss=1.75)
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 10, 10]
    assert records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-3 and isinstance(records[0]["time"], float)
    assert records[2] == {"step": 10, "split": "val", "loss": 1.75, "time": records[2]["time"]}
    with pytest.raises(TypeError):
        MetricsLogger(path).log(1.5, loss=1.0)


def test_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    with caplog.at_level(logging.INFO):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with MetricsLogger(path) as metrics:  # reopening drops the fragment so new lines stay whole
        metrics.log(3, loss=1.8)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3


def test_whole_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}')
    with MetricsLogger(path) as metrics:
        metrics.log(2, loss=1.0)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_truncate_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    metrics = MetricsLogger(path)
    for step in range(0, 50, 10):
        metrics.log(step, loss=float(step))
    assert metrics.truncate_after(20) == 2
    metrics.log(30, loss=-1.0)  # the resumed run logs on after the truncation
    metrics.close()
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 10, 20, 30] and records[-1]["loss"] == -1.0


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(PartiError, match="not found"):
        read_metrics(tmp_path / "nope.jsonl")


def test_device_and_precision_on_cpu(caplog):
    device = detect_device()
    assert device["type"] in {"cpu", "cuda", "mps"} and device["count"] >= 1
    with caplog.at_level(logging.INFO, logger="parti.device"):
        choice = choose_mixed_precision()
    assert choice in {"no", "fp16", "bf16"} and "mixed precision" in caplog.text
    if not torch.cuda.is_available():
        assert choice == "no"


def test_git_info_never_fails(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git on PATH
    assert git_info() == {"commit": None, "dirty": None}
    assert library_versions()["python"].count(".") == 2
