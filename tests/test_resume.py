"""Runs that survive: a run SIGKILLed at an arbitrary step and resumed with --resume ends bit-identical to an
uninterrupted one (both stages: model, optimizer, LR, EMA, discriminator, codebook buffers, RNG, data order);
SIGTERM saves and exits cleanly; a kill inside a save or a full disk never costs the previous checkpoint.

The interrupted runs are real `parti` processes; the reference and resumed runs run in this process. All
use one intra-op thread (OMP_NUM_THREADS=1 / torch.set_num_threads(1)), so float reductions agree bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_code_cache
from parti.errors import PartiError

TOTAL = 12  # steps of every run here; checkpoints every 2, evaluation every 3 (sample points inside)
TOKENIZER = {"data": "synthetic", "preset": "tiny", "steps": TOTAL, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2,
             "perceptual_weight": 0.0, "adversarial_weight": 0.1, "disc_start": 3, "disc_channels": 8,
             "synthetic_length": 20,  # 5 batches an epoch: the runs cross epochs 0 -> 2
             "val_images": 4, "sample_every": 3, "save_every": 2, "log_every": 1, "keep_checkpoints": 2,
             "cpu": True, "mixed_precision": "no", "progress": False}
GENERATOR = {"preset": "tiny", "text_preset": "tiny", "vocab_size": 300, "steps": TOTAL, "batch_size": 4,
             "lr": 2e-3, "warmup_steps": 2, "cond_drop_prob": 0.3, "ema_decay": 0.9, "val_batches": 1,
             "sample_every": 5, "save_every": 2, "log_every": 1, "keep_checkpoints": 2, "cpu": True,
             "mixed_precision": "no", "progress": False}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def cli_args(options: dict) -> list[str]:
    """The `parti` flags for a config dict (booleans as the CLI spells them)."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def start(command: str, options: dict, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "parti.cli", "-q", command, *cli_args(options), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (out / "checkpoints").glob("step_*/state.json"))


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 240.0) -> int:
    """Poll until a checkpoint is complete; return its step. Fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = complete_steps(out)
        if steps:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def train_in_process(stage: str, options: dict, out: Path, *, resume: bool = False) -> Path:
    if stage == "tokenizer":
        from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

        return train_tokenizer(TokenizerTrainConfig(**options, out=str(out), resume=resume))
    from parti.train_generator import GeneratorTrainConfig, train_generator

    return train_generator(GeneratorTrainConfig(**options, out=str(out), resume=resume))


def assert_same_tensors(a: Path, b: Path) -> int:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    return len(ta)


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Exported model, final training state (weights, optimizer, EMA/discriminator, RNG) and every logged
    training loss are bit-identical."""
    assert_same_tensors(resumed / "model.safetensors", reference / "model.safetensors")
    final = f"checkpoints/step_{TOTAL:07d}/state.safetensors"
    assert_same_tensors(resumed / final, reference / final)

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        key = "total" if "total" in rows[0] else "loss"
        return {r["step"]: r[key] for r in rows if key in r}

    assert losses(resumed) == losses(reference) and len(losses(reference)) == TOTAL
    # The export holds the best evaluation's weights (compared above); its step and value are the same, in
    # run.json and in the exported config.json.
    best = json.loads((reference / "run.json").read_text())["best"]
    assert best is not None and json.loads((resumed / "run.json").read_text())["best"] == best
    assert json.loads((resumed / "config.json").read_text())["best"] == best


@pytest.fixture(scope="module")
def tokenizer_reference(tmp_path_factory) -> Path:
    return train_in_process("tokenizer", TOKENIZER, tmp_path_factory.mktemp("tok") / "reference")


@pytest.fixture(scope="module")
def generator_setup(tmp_path_factory) -> dict:
    """An (untrained) tiny tokenizer, a code cache of 24 train / 24 val synthetic faces, a reference run."""
    root = tmp_path_factory.mktemp("gen")
    options = {**GENERATOR, **tiny_code_cache(root, train_faces=24)}
    return {"root": root, "options": options, "reference": train_in_process("generator", options, root / "reference")}


def kill_resume(stage: str, options: dict, out: Path, sig: int = signal.SIGKILL) -> subprocess.Popen:
    """Start the real command, signal it just after its first checkpoint, return the finished process."""
    proc = start("train-tokenizer" if stage == "tokenizer" else "train", options, out)
    wait_for_checkpoint(proc, out)
    time.sleep(0.05)  # some moment after it: mid-step, mid-export, mid-evaluation (short: fast machines finish)
    proc.send_signal(sig)
    proc.wait(timeout=240)
    return proc


def test_tokenizer_sigkill_then_resume_is_bit_identical(tokenizer_reference, tmp_path):
    out = tmp_path / "killed"
    proc = kill_resume("tokenizer", TOKENIZER, out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    at = complete_steps(out)[-1]
    assert 2 <= at < TOTAL  # it really died mid-run
    with pytest.raises(PartiError, match="--resume"):  # rerunning without --resume never overwrites it
        train_in_process("tokenizer", TOKENIZER, out)
    train_in_process("tokenizer", TOKENIZER, out, resume=True)
    assert_same_run(out, tokenizer_reference)
    state = load_file(str(out / f"checkpoints/step_{TOTAL:07d}/state.safetensors"))
    assert any(k.startswith("disc.") for k in state) and any(k.startswith("optd.") for k in state)  # D trained
    assert "model.quantizer.usage_ema" in state  # the codebook's usage buffer (drives restarts) is saved
    assert len(complete_steps(out)) == TOKENIZER["keep_checkpoints"]
    run = json.loads((out / "run.json").read_text())
    assert len(run["resumes"]) == 1


def test_generator_sigkill_then_resume_is_bit_identical(generator_setup, tmp_path):
    """EMA on, condition dropout, sentencepiece text encoder trained jointly: all restored exactly."""
    out = tmp_path / "killed"
    proc = kill_resume("generator", generator_setup["options"], out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert 2 <= complete_steps(out)[-1] < TOTAL
    # The resumed run rebuilds its text encoder from the checkpoint alone, even with text_encoder/ gone.
    shutil.rmtree(out / "text_encoder", ignore_errors=True)
    train_in_process("generator", generator_setup["options"], out, resume=True)
    assert_same_run(out, generator_setup["reference"])
    state = load_file(str(out / f"checkpoints/step_{TOTAL:07d}/state.safetensors"))
    assert any(k.startswith("ema.") for k in state) and "text_tokenizer.proto" in state
    import parti
    pipe = parti.load_pipeline(out)  # the exported folder works on its own
    assert pipe(["red hair"], seed=0).images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tokenizer_reference, tmp_path, monkeypatch, capsys, sig):
    """A real signal to this process at step 5 (no save point): the CLI saves step 5 and returns 0."""
    from parti.cli import main
    from parti.runs import MetricsLogger

    log = MetricsLogger.log

    def signal_at_step_5(self, step, **scalars):
        if step == 5 and "split" not in scalars:
            os.kill(os.getpid(), sig)
        return log(self, step, **scalars)

    monkeypatch.setattr(MetricsLogger, "log", signal_at_step_5)
    out = tmp_path / "stopped"
    assert main(["-q", "train-tokenizer", *cli_args(TOKENIZER), "--out", str(out)]) == 0
    assert complete_steps(out) == [4, 5]  # stopped at 5 with a checkpoint of it
    assert (out / "config.json").exists() and "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(MetricsLogger, "log", log)
    train_in_process("tokenizer", TOKENIZER, out, resume=True)
    assert_same_run(out, tokenizer_reference)


def test_sigterm_from_outside_stops_a_real_run_cleanly(tokenizer_reference, tmp_path):
    out = tmp_path / "stopped"
    proc = kill_resume("tokenizer", TOKENIZER, out, sig=signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert complete_steps(out)[-1] < TOTAL  # stopped early, with a checkpoint of the step it stopped at
    train_in_process("tokenizer", TOKENIZER, out, resume=True)
    assert_same_run(out, tokenizer_reference)



def test_sigterm_to_the_process_group_with_loader_workers_stops_cleanly(tmp_path):
    """`timeout`, SLURM and container stops signal the whole group: the DataLoader workers get SIGTERM too.
    They ignore it, so the main process still saves the step it stopped at and exits 0, no traceback."""
    out = tmp_path / "group"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "parti.cli", "-q", "train-tokenizer", *cli_args(TOKENIZER),
                             "--num-workers", "2", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    wait_for_checkpoint(proc, out)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=240)
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert "saving a checkpoint" in stderr and complete_steps(out)[-1] < TOTAL

KILL_DURING_SAVE = r"""
import os, signal, sys
import safetensors.torch as st
import parti.checkpoint as ck
real = st.save_file
calls = {"n": 0}
def dying_save(tensors, path, metadata=None):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[1]):  # this save dies half written, as a power cut or SIGKILL would leave it
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)
ck.save_file = dying_save
from parti.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("dying_write", [3, 4], ids=["state", "export"])
def test_kill_inside_a_save_keeps_the_previous_checkpoint(tokenizer_reference, tmp_path, dying_write):
    """Saves at step 2 write state (1) then the export (2); the save at step 4 dies in its 3rd or 4th write."""
    out = tmp_path / "torn"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(dying_write), "-q", "train-tokenizer",
                           *cli_args(TOKENIZER), "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = list(out.rglob(".*.tmp"))
    assert leftovers  # the half-written temporary file is still there, never renamed into place
    assert complete_steps(out)[-1] == (2 if dying_write == 3 else 4)
    import parti
    parti.load_tokenizer(out)  # the exported model is whole (old or new, never torn)
    train_in_process("tokenizer", TOKENIZER, out, resume=True)
    assert_same_run(out, tokenizer_reference)
    assert not list((out / "checkpoints").rglob(".*.tmp"))  # debris of the killed save is cleaned up


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    import errno

    import parti.checkpoint as ck
    from parti.state import Checkpoints

    ckpts = Checkpoints(tmp_path, keep=2)
    ckpts.save(2, {"w": torch.ones(3)}, {"epoch": 0})
    real = ck.save_file

    def full(tensors, path, metadata=None):  # the disk fills half way: ENOSPC
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(PartiError, match="No space left on device; free disk space"):
        ckpts.save(4, {"w": torch.zeros(3)}, {"epoch": 0})

    def silent_short_write(tensors, path, metadata=None):  # a writer that loses the end without raising
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4)

    monkeypatch.setattr(ck, "save_file", silent_short_write)
    with pytest.raises(PartiError, match="short write"):
        ckpts.save(6, {"w": torch.zeros(3)}, {"epoch": 0})
    tensors, meta = ckpts.latest()
    assert meta["step"] == 2 and torch.equal(tensors["w"], torch.ones(3))
    assert not list(tmp_path.rglob("*.tmp"))


def test_checkpoints_keep_the_newest_k_and_skip_damaged_ones(tmp_path, caplog):
    from parti.state import Checkpoints

    ckpts = Checkpoints(tmp_path, keep=3)
    for step in (5, 10, 100, 1000, 10_000_000):  # ordered by number, not by name
        ckpts.save(step, {"w": torch.full((2,), float(step))}, {})
    assert [int(p.name[5:]) for p in ckpts.complete()] == [100, 1000, 10_000_000]
    newest = ckpts.complete()[-1] / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])  # damaged on disk after the fact
    tensors, meta = ckpts.latest()
    assert meta["step"] == 1000 and "skipping unreadable checkpoint" in caplog.text
    for p in ckpts.complete():
        (p / "state.safetensors").write_bytes(b"")
    with pytest.raises(PartiError, match="no readable checkpoint"):
        ckpts.latest()


def test_torn_export_is_read_from_the_weights_file(tmp_path, caplog):
    """A kill between the two renames of an export leaves new weights beside an old config.json: the
    weights carry their own copy of the config, so the folder still loads exactly what they are."""
    from parti.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

    torch.manual_seed(0)
    first, second = build_tokenizer("tiny"), build_tokenizer("tiny")
    save_tokenizer(first, tmp_path / "a")
    save_tokenizer(second, tmp_path / "b")
    old_config = (tmp_path / "a" / "config.json").read_text()
    (tmp_path / "b" / "config.json").write_text(old_config)  # config.json of the previous save
    loaded = load_tokenizer(tmp_path / "b")
    assert loaded.fingerprint() == second.fingerprint() != first.fingerprint()
    assert "config.json is older than model.safetensors" in caplog.text
