"""A run that reports its own health, and keeps its best weights.

Each health warning is provoked on a tiny run by settings that cause it (a huge learning rate: the codebook
collapses, the gradients explode, then turn NaN; a generator trained long on eight faces: it overfits), except
the discriminator winning, which tiny runs do not reach in seconds: there the logged D and GAN losses are forced
(and the detector is fed rows of that shape directly). Each warning appears once in the log and in run.json; a
healthy tiny run gives none. The export holds the best weights by validation loss, across a stop and --resume.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_code_cache
from parti.errors import PartiError
from parti.health import Health

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOKENIZER = {"data": "synthetic", "preset": "tiny", "batch_size": 8, "lr": 2e-3, "warmup_steps": 5,
             "perceptual_weight": 0.0, "adversarial_weight": 0.0, "synthetic_length": 200, "val_images": 16,
             "sample_every": 10, "save_every": 1000, "log_every": 1, "cpu": True, "mixed_precision": "no",
             "progress": False}
GENERATOR = {"preset": "tiny", "text_preset": "tiny", "text_tokenizer": "bytes", "batch_size": 8, "lr": 5e-3,
             "warmup_steps": 5, "cond_drop_prob": 0.0, "ema_decay": 0.0, "weight_decay": 0.0, "val_batches": 1,
             "sample_every": 10, "save_every": 20, "log_every": 1, "cpu": True, "mixed_precision": "no",
             "progress": False}


def train_tokenizer(out: Path, **options) -> Path:
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    return train_tokenizer(TokenizerTrainConfig(**{**TOKENIZER, **options}, out=str(out)))


def train_generator(out: Path, **options) -> Path:
    from parti.train_generator import GeneratorTrainConfig, train_generator

    return train_generator(GeneratorTrainConfig(**{**GENERATOR, **options}, out=str(out)))


def warnings_of(run: Path) -> list[str]:
    return [w["kind"] for w in json.loads((run / "run.json").read_text()).get("warnings", [])]


def logged(caplog, kind_words: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith(f"health: {kind_words}"))


@pytest.fixture(scope="module")
def overfitted(eight_faces, tmp_path_factory) -> Path:
    """80 steps on the eight faces: the validation loss bottoms out at step 30, then rises."""
    return train_generator(tmp_path_factory.mktemp("overfit") / "gen", **eight_faces, steps=80)


@pytest.fixture(scope="module")
def eight_faces(tmp_path_factory) -> dict:
    """An untrained tiny tokenizer and a code cache of 8 training faces (24 validation)."""
    return tiny_code_cache(tmp_path_factory.mktemp("faces"), train_faces=8)


# ---------------------------------------------------------------------------------------------------------------
# The detectors on rows


def feed(health: Health, rows: list[tuple[int, dict]]) -> list[str]:
    found = []
    for step, row in rows:
        found += [w.kind for w in (health.val_row(step, row) if "val_loss" in row else health.train_row(step, row))]
    return found


def test_each_detector_fires_once_on_its_condition_and_never_on_healthy_rows():
    healthy = [(s, {"loss": 5.0 - 0.01 * s, "grad_norm": 1.0 + 0.1 * (s % 3), "nonfinite_steps": 0,
                    "usage": 0.3 + 0.01 * (s % 2), "perplexity": 40.0, "d_loss": 0.9, "adv": 0.1}) for s in range(1, 200)]
    healthy += [(s, {"val_loss": 5.0 - 0.005 * s}) for s in range(20, 200, 20)]
    healthy.sort(key=lambda r: r[0])
    assert feed(Health(train_metric="loss", val_metric="val_loss", gan_start=50), healthy) == []

    collapse = [(s, {"usage": 0.3 if s < 30 else 0.05, "perplexity": 40.0 if s < 30 else 3.0}) for s in range(1, 60)]
    assert feed(Health(train_metric="loss", val_metric=None), collapse) == ["codebook_collapse"]
    # D's hinge loss to ~0 while the GAN loss climbs (the shape a winning discriminator logs), after disc_start only
    d_wins = [(s, {"d_loss": 1.0 if s < 60 else 0.01, "adv": 0.1 if s < 60 else 0.1 + 0.1 * (s - 60)})
              for s in range(1, 100)]
    assert feed(Health(train_metric="loss", val_metric=None, gan_start=50), d_wins) == ["discriminator_wins"]
    assert feed(Health(train_metric="loss", val_metric=None, gan_start=None), d_wins) == []  # no GAN, no check
    overfit = [(s, {"loss": 3.0 - 0.02 * s}) for s in range(1, 101)]
    overfit += [(s, {"val_loss": v}) for s, v in zip(range(20, 101, 20), (3.0, 2.9, 3.0, 3.1, 3.2))]
    overfit.sort(key=lambda r: r[0])
    assert feed(Health(train_metric="loss", val_metric="val_loss"), overfit) == ["overfitting"]
    both_rise = [(s, {"loss": 1.0 + 0.02 * s}) for s in range(1, 101)]  # val and training loss rise together
    both_rise += [(s, {"val_loss": v}) for s, v in zip(range(20, 101, 20), (3.0, 2.9, 3.0, 3.1, 3.2))]
    both_rise.sort(key=lambda r: r[0])
    assert feed(Health(train_metric="loss", val_metric="val_loss"), both_rise) == []
    wobble = [(s, {"loss": 3.0 - 0.02 * s}) for s in range(1, 101)]  # a plateau's tiny rises are not overfitting
    wobble += [(s, {"val_loss": 3.0 + 0.0001 * s}) for s in range(20, 101, 20)]
    wobble.sort(key=lambda r: r[0])
    assert feed(Health(train_metric="loss", val_metric="val_loss"), wobble) == []
    norms = [(s, {"grad_norm": 1.0 if s < 20 else 50.0, "nonfinite_steps": 0}) for s in range(1, 30)]
    norms += [(30, {"grad_norm": float("nan"), "nonfinite_steps": 0}), (31, {"grad_norm": 1.0, "nonfinite_steps": 3})]
    assert feed(Health(train_metric="loss", val_metric=None), norms) == ["exploding_gradients", "nonfinite_gradients"]
    one_spike = [(s, {"grad_norm": 25.0 if s == 9 else 2.0, "nonfinite_steps": 0}) for s in range(1, 40)]
    assert feed(Health(train_metric="loss", val_metric=None), one_spike) == []  # one clipped spike: routine
    far = [(s, {"grad_norm": 500.0 if s == 9 else 2.0, "nonfinite_steps": 0}) for s in range(1, 40)]
    assert feed(Health(train_metric="loss", val_metric=None), far) == ["exploding_gradients"]  # 250x: said at once
    # warned before a resume (run.json): quiet now
    assert feed(Health(train_metric="loss", val_metric=None, warned=["codebook_collapse"]), collapse) == []


# ---------------------------------------------------------------------------------------------------------------
# Provoked on real tiny runs


def test_a_huge_learning_rate_warns_of_collapse_explosion_and_nan_once_each(tmp_path, caplog):
    """lr 3: the codebook collapses to one code, the gradient norm explodes, then the loss turns NaN until the
    non-finite guard stops the run. Each warning once, in the log and in run.json, before the stop."""
    out = tmp_path / "tok"
    with pytest.raises(PartiError, match="NaN/inf for 20 steps"):
        train_tokenizer(out, steps=40, lr=3.0)
    kinds = warnings_of(out)
    assert sorted(kinds) == ["codebook_collapse", "exploding_gradients", "nonfinite_gradients"]
    for words in ("codebook collapsing", "exploding gradients", "non-finite values"):
        assert logged(caplog, words) == 1, words


def test_a_winning_discriminator_is_warned_once(tmp_path, caplog, monkeypatch):
    """Forced: after disc_start the logged D loss goes to ~0 and the GAN loss climbs (a tiny run does not
    get there in seconds); the warning comes from the run's own rows, once, with gan_start = disc_start."""
    from parti.train_tokenizer import TokenizerStage

    real_step, real_row = TokenizerStage.train_step, TokenizerStage.log_row

    def step(self, batch, step):
        self.at = step + 1
        return real_step(self, batch, step)

    def winning(self):
        row = real_row(self)
        if self.at > 8:
            row.update(d_loss=0.01, adv=0.2 * (self.at - 8))
        return row

    monkeypatch.setattr(TokenizerStage, "train_step", step)
    monkeypatch.setattr(TokenizerStage, "log_row", winning)
    out = train_tokenizer(tmp_path / "tok", steps=24, adversarial_weight=0.1, disc_start=8, disc_channels=8)
    assert warnings_of(out) == ["discriminator_wins"]
    assert logged(caplog, "the discriminator is winning") == 1


def test_overfitting_is_warned_and_the_export_keeps_the_best_weights(overfitted):
    """The validation loss rises while the training loss keeps falling: warned once (the log line is checked
    on the detector's rows above and on the resumed run below). The export (what users load) holds the best
    evaluation's weights, not the last ones; run.json and config.json name its step."""
    out = overfitted
    assert warnings_of(out) == ["overfitting"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    best_step = min(val, key=val.get)
    assert best_step < 80 and val[80] > val[best_step]  # it did overfit: the last weights are not the best
    best = {"step": best_step, "metric": "val_loss", "value": val[best_step]}
    assert json.loads((out / "run.json").read_text())["best"] == best
    assert json.loads((out / "config.json").read_text())["best"] == best
    exported = load_file(str(out / "model.safetensors"))
    state = load_file(str(out / "checkpoints/step_0000080/state.safetensors"))
    assert all(torch.equal(v, state[f"best.generator.{k}"]) for k, v in exported.items())
    assert not all(torch.equal(v, state[f"obj.generator.{k}"]) for k, v in exported.items())
    import parti

    parti.load_pipeline(out)  # the best export loads as a whole (generator, tokenizer, text encoder)


def test_the_best_survives_a_stop_and_resume(eight_faces, overfitted, tmp_path, monkeypatch, caplog):
    """Stopped (SIGINT) at step 45, after its best (step 30) and before its overfitting warning, then resumed:
    the later evaluations compare with the restored best, and the export, its best step and the warnings
    equal an uninterrupted run's."""
    from parti.runs import MetricsLogger

    reference = overfitted
    log = MetricsLogger.log

    def stop_at_45(self, step, **scalars):
        if step == 45 and "split" not in scalars:
            os.kill(os.getpid(), signal.SIGINT)
        return log(self, step, **scalars)

    monkeypatch.setattr(MetricsLogger, "log", stop_at_45)
    out = train_generator(tmp_path / "stopped", **eight_faces, steps=80)
    monkeypatch.setattr(MetricsLogger, "log", log)
    run = json.loads((out / "run.json").read_text())
    assert run["progress"]["step"] == 45 and run["best"]["step"] < 45
    train_generator(out, **eight_faces, steps=80, resume=True)
    run, ref = (json.loads((p / "run.json").read_text()) for p in (out, reference))
    assert run["best"] == ref["best"]
    assert warnings_of(out) == warnings_of(reference) == ["overfitting"] and logged(caplog, "overfitting") == 1
    a, b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_healthy_tiny_run_gives_no_warning(eight_faces, tmp_path, caplog):
    out = train_tokenizer(tmp_path / "tok", steps=30, adversarial_weight=0.1, disc_start=10, disc_channels=8)
    assert warnings_of(out) == []
    best = json.loads((out / "run.json").read_text())["best"]
    assert best["metric"] == "val_l1" and best["step"] > 10  # after disc_start: the GAN phase competes apart
    assert json.loads((out / "config.json").read_text())["best"] == best
    gen = train_generator(tmp_path / "gen", **eight_faces, steps=20, lr=1e-3)
    assert warnings_of(gen) == [] and not [r for r in caplog.records if r.getMessage().startswith("health:")]


# ---------------------------------------------------------------------------------------------------------------
# Trackers


def test_report_to_tensorboard_writes_event_files_in_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    out = train_tokenizer(tmp_path / "tok", steps=4, report_to="tensorboard")
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_report_to_a_missing_package_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PartiError, match="pip install wandb"):
        train_tokenizer(tmp_path / "tok", steps=2, report_to="wandb")
    assert not (tmp_path / "tok").exists()  # refused before anything was written


def test_show_tensorboard_loads_the_extension_on_the_runs_folder(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    IPython = pytest.importorskip("IPython")
    from parti import notebook

    calls = []

    class Shell:
        def run_line_magic(self, name, line):
            calls.append((name, line))

    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    (tmp_path / "runs" / "tokenizer" / "tensorboard").mkdir(parents=True)
    notebook.show_tensorboard(tmp_path / "runs")
    assert calls == [("load_ext", "tensorboard"), ("tensorboard", f"--logdir {tmp_path / 'runs'}")]
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    with pytest.raises(PartiError, match="tensorboard --logdir"):  # not in a notebook: what to run instead
        notebook.show_tensorboard(tmp_path / "runs")
