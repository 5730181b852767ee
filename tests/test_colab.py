"""What Colab does to a long job: a dead runtime's lock, the stop button during Run all, a disconnect.

A Colab runtime that disconnects is gone with its disk and hostname; only Drive is kept. Here Drive is a local
folder, each "runtime" a fresh kernel with its own working folder, HF cache and hostname.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from parti import notebook, runs
from parti.errors import PartiError, set_audience
from parti.runs import LOCK_NAME, RunLock, run_progress

nbformat = pytest.importorskip("nbformat")
NOTEBOOK = Path(__file__).resolve().parent.parent / "parti.ipynb"

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _write_lock(folder: Path, *, host: str, age: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": 4242, "host": host, "boot": "another-boot", "started": "earlier"}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Locks that a dead machine cannot hold


def test_a_live_lock_of_another_host_is_refused_with_what_to_do(tmp_path):
    _write_lock(tmp_path / "run", host="runtime-a", age=5)
    with pytest.raises(PartiError, match=r"in use by another training \(pid 4242 on runtime-a.*releases it 3 min"):
        RunLock(tmp_path / "run").acquire()


def test_a_lock_without_heartbeat_is_taken_over_on_any_host(tmp_path, caplog):
    path = _write_lock(tmp_path / "run", host="runtime-a", age=runs.LEASE_S + 5)
    with caplog.at_level(logging.WARNING, logger="parti.runs"), RunLock(tmp_path / "run"):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert "taking over the stale lock" in caplog.text and "runtime-a" in caplog.text
    assert not path.exists()


def test_the_holder_refreshes_its_lease_and_two_live_writers_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path / "run").acquire()
    try:
        past = time.time() - runs.LEASE_S - 100
        os.utime(lock.path, (past, past))  # as if the holder had been silent: the heartbeat renews it
        deadline = time.time() + 10
        while time.time() - lock.path.stat().st_mtime > runs.LEASE_S and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.path.stat().st_mtime < 10
        with pytest.raises(PartiError, match="in use by another training"):
            RunLock(tmp_path / "run").acquire()
    finally:
        lock.release()
    assert not lock.path.exists() and not any(t.name == "parti-lock-heartbeat" for t in threading.enumerate())


# ---------------------------------------------------------------------------------------------------------------
# Stages that know when they are finished


TOKENIZER = dict(data="synthetic", preset="tiny", steps=6, batch_size=4, lr=2e-3, warmup_steps=1, perceptual_weight=0.0,
                 adversarial_weight=0.0, synthetic_length=16, val_images=4, sample_every=100, save_every=100,
                 log_every=10, cpu=True, mixed_precision="no", progress=False)


def _stop_after(monkeypatch, steps: int) -> None:
    """The stop button: SIGINT during step `steps` (the loop's handler sets the flag, as Colab's ■ does)."""
    from parti.train_tokenizer import TokenizerStage

    real, calls = TokenizerStage.train_step, []

    def step(self, batch, at):
        calls.append(at)
        if len(calls) == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, at)
    monkeypatch.setattr(TokenizerStage, "train_step", step)


def test_a_stopped_run_records_its_progress_and_stage_2_refuses_it_before_any_work(tmp_path, monkeypatch):
    from parti.train_generator import GeneratorTrainConfig, train_generator
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    _stop_after(monkeypatch, 2)
    out = train_tokenizer(TokenizerTrainConfig(**TOKENIZER, out=str(tmp_path / "tok")))
    assert run_progress(out) == {**run_progress(out), "step": 2, "steps": 6, "finished": False}
    gen = GeneratorTrainConfig(data="synthetic", tokenizer=str(out), preset="tiny", text_preset="tiny", steps=2,
                               out=str(tmp_path / "gen"), cpu=True, mixed_precision="no", progress=False)
    with pytest.raises(PartiError, match="stopped at step 2 of 6.*--resume.*--allow-unfinished-tokenizer"):
        train_generator(gen)
    assert not (tmp_path / "gen").exists()  # refused before anything was written
    set_audience("notebook")
    try:
        with pytest.raises(PartiError, match="run the stage-1 cell again"):
            train_generator(gen)
    finally:
        set_audience("cli")
    monkeypatch.undo()
    train_tokenizer(TokenizerTrainConfig(**TOKENIZER, out=str(out), resume=True))
    assert run_progress(out)["finished"] and run_progress(out)["step"] == 6


def test_the_stop_button_in_a_training_cell_raises_so_run_all_stops(tmp_path, monkeypatch):
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    _stop_after(monkeypatch, 3)
    config = TokenizerTrainConfig(**TOKENIZER, out=str(tmp_path / "tok"))
    with pytest.raises(notebook.CellStopped, match="stopped at step 3 of 6 .* run this cell again") as err:
        notebook.train(train_tokenizer, config)
    assert err.value._render_traceback_() == [f"parti: {err.value}"]  # one line in the notebook, no traceback
    monkeypatch.undo()
    assert notebook.train(train_tokenizer, config) == tmp_path / "tok"  # run again: continues and finishes
    assert run_progress(tmp_path / "tok")["finished"]


def test_plotting_cells_cope_with_a_short_log(tmp_path):
    from parti.plots import loss_curves

    (tmp_path / "metrics.jsonl").write_text("")
    fig = loss_curves(tmp_path / "metrics.jsonl", keys=["loss", "val_loss"], strict=False)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "val_loss"]
    with pytest.raises(PartiError, match="no numeric values"):
        loss_curves(tmp_path / "metrics.jsonl", keys=["loss"])


# ---------------------------------------------------------------------------------------------------------------
# Run all, stopped and disconnected (a real kernel each time)


def _kernel_manager(tmp_path: Path):
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    if not (kernels / "parti-test").exists():
        write_kernel_spec(kernels / "parti-test")
    return KernelManager(kernel_name="parti-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def _runtime_cell(*, hostname: str, drive: Path, stop_tokenizer_at: int | None = None) -> nbformat.NotebookNode:
    """What a Colab runtime is, played in a kernel: its hostname, Colab with Drive mounted at `drive`, and
    (optionally) the stop button pressed during a tokenizer step. Runs before the notebook's cells."""
    lines = ["import os, signal, socket",
             "from pathlib import Path",
             "from parti import notebook",
             f"socket.gethostname = lambda: {hostname!r}",
             "notebook.in_colab = lambda: True",
             f"notebook.mount_drive = lambda: Path({str(drive)!r})"]
    if stop_tokenizer_at is not None:
        lines += ["from parti.train_tokenizer import TokenizerStage",
                  "_real, _calls = TokenizerStage.train_step, []",
                  "def _step(self, batch, at):",
                  "    _calls.append(at)",
                  f"    if len(_calls) == {stop_tokenizer_at}:",
                  "        os.kill(os.getpid(), signal.SIGINT)  # the stop button",
                  "    return _real(self, batch, at)",
                  "TokenizerStage.train_step = _step"]
    return nbformat.v4.new_code_cell("\n".join(lines))


def _notebook(*, until: str | None = None) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            assert "USE_DRIVE = True" in cell.source  # Drive is on by default
    if until is not None:
        last = next(i for i, c in enumerate(nb.cells) if until in c.metadata.get("tags", []))
        nb.cells = nb.cells[:last + 1]
    return nb


def _run_all(nb, *, local: Path, hf_home: Path, tmp_path: Path, allow_errors: bool = False):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    env = {k: v for k, v in os.environ.items() if k != notebook.OUT_ENV}
    env.update({notebook.SMALL_ENV: "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"})
    local.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(local)}})
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        if not allow_errors:
            raise
        return nb, e
    return nb, None


def _ran(cell) -> bool:
    return cell.get("execution_count") is not None


def test_the_stop_button_during_run_all_stops_there(tmp_path):
    """■ during stage 1: the cell saves and raises, Run all stops, no later cell runs, stage 2 never starts."""
    pytest.importorskip("nbclient")
    drive = tmp_path / "drive"
    nb = _notebook(until="train-generator")
    nb.cells.insert(0, _runtime_cell(hostname="runtime-a", drive=drive, stop_tokenizer_at=2))
    nb, error = _run_all(nb, local=tmp_path / "a", hf_home=tmp_path / "hf-a", tmp_path=tmp_path, allow_errors=True)
    assert error is not None and "parti: tokenizer stopped at step 2 of 6" in str(error)  # one line, no traceback
    assert "Traceback" not in str(error)
    index = next(i for i, c in enumerate(nb.cells) if "train-tokenizer" in c.metadata.get("tags", []))
    assert _ran(nb.cells[index]) and not any(_ran(c) for c in nb.cells[index + 1:] if c.cell_type == "code")
    out = drive / "parti" / notebook.SMALL_OUT
    assert run_progress(out / "tokenizer")["finished"] is False
    assert not (out / "generator").exists()


def test_a_disconnect_then_a_new_runtime_resumes_both_stages_from_drive(tmp_path):
    """Runtime A is killed mid-stage 1 with Drive on. Runtime B (new hostname, local disk, HF cache) runs all:
    both stages finish from Drive's checkpoints, nothing is downloaded, and the generator loads."""
    pytest.importorskip("nbclient")
    from parti.pipeline import load_pipeline

    drive = tmp_path / "drive"
    out = drive / "parti" / notebook.SMALL_OUT
    nb = _notebook(until="train-generator")
    nb.cells.insert(0, _runtime_cell(hostname="runtime-a", drive=drive))
    # runtime A: Run all, killed (SIGKILL: no save, no cleanup) as soon as stage 1 has saved a checkpoint
    _run_all_then_kill(nb, local=tmp_path / "a", hf_home=tmp_path / "hf-a", tmp_path=tmp_path,
                       when=lambda: any((out / "tokenizer" / "checkpoints").glob("step_*/state.json")))
    assert (out / "tokenizer" / LOCK_NAME).exists()  # the dead runtime's lock, on Drive
    assert run_progress(out / "tokenizer") is None or not run_progress(out / "tokenizer")["finished"]
    # a new runtime gets its machine minutes later: the dead one's lease has run out by then
    past = time.time() - runs.LEASE_S - 60
    os.utime(out / "tokenizer" / LOCK_NAME, (past, past))
    nb = _notebook(until="train-generator")
    nb.cells.insert(0, _runtime_cell(hostname="runtime-b", drive=drive))
    nb, _ = _run_all(nb, local=tmp_path / "b", hf_home=tmp_path / "hf-b", tmp_path=tmp_path)
    log = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")
    assert "taking over the stale lock" in log and "resumed from step" in log
    for stage in ("tokenizer", "generator"):
        assert run_progress(out / stage)["finished"]
    assert not (tmp_path / "hf-b" / "hub").exists() or not any((tmp_path / "hf-b" / "hub").iterdir())
    pipe = load_pipeline(out / "generator", device="cpu")
    assert pipe(["a person with red hair"], num_images_per_prompt=1, seed=0).images.shape[0] == 1


def _run_all_then_kill(nb, *, local: Path, hf_home: Path, tmp_path: Path, when, timeout: float = 240.0) -> None:
    """Queue every code cell in a fresh kernel (Run all), then SIGKILL the kernel once `when()` holds. Driven
    through jupyter_client: nbclient waits out its timeout on a kernel that died under a cell."""
    env = {k: v for k, v in os.environ.items() if k != notebook.OUT_ENV}
    env.update({notebook.SMALL_ENV: "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"})
    local.mkdir(parents=True, exist_ok=True)
    km = _kernel_manager(tmp_path)
    km.start_kernel(env=env, cwd=str(local))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        for cell in nb.cells:
            if cell.cell_type == "code":
                client.execute(cell.source)
        deadline = time.time() + timeout
        while not when():
            assert time.time() < deadline, "runtime A never reached the point where it is killed"
            time.sleep(0.02)
        os.kill(km.provisioner.process.pid, signal.SIGKILL)  # the runtime vanishes
        km.provisioner.process.wait(timeout=30)
    finally:
        client.stop_channels()
        km.cleanup_resources()


# ---------------------------------------------------------------------------------------------------------------
# Runtimes old and new


def test_the_web_demo_comes_after_the_evaluation_and_a_failing_one_stops_nothing(monkeypatch, caplog):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    order = [t for c in nb.cells for t in c.metadata.get("tags", []) if t in ("evaluation", "push", "web-demo")]
    assert order == ["evaluation", "push", "web-demo"] and "web-demo" in nb.cells[-1].metadata.get("tags", [])
    assert 'gradio>=5,<7' in nb.cells[-1].source  # installs only where gradio is missing, never over Colab's

    with caplog.at_level(logging.WARNING, logger="parti.notebook"), notebook.demo_guard():
        # what Run all met on Colab's pinnable 2025.07-2026.04 runtimes
        raise TypeError("Gallery.__init__() got an unexpected keyword argument 'buttons'")
    assert "the web demo could not start (TypeError: Gallery.__init__()" in caplog.text


@pytest.mark.parametrize("runtime", ["2025.07", "2026.01", "2026.08"])
def test_every_colab_runtime_meets_the_floors_so_installing_replaces_nothing(runtime):
    """pip upgrades a preinstalled package only when it misses a floor (then to the newest release, a new
    major); Colab's pinnable runtimes hold versions at or above every floor parti declares."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = NOTEBOOK.parent
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (root / "constraints" / f"colab-{runtime}.txt").read_text(),
                           re.M))
    pins = {name.lower().replace("_", "-"): Version(v) for name, v in pins.items()}
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    needs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["app"]
             + project["optional-dependencies"]["test"]]
    checked = [r.name for r in needs if r.name.lower().replace("_", "-") in pins]
    assert {"transformers", "datasets", "huggingface_hub", "accelerate", "gradio", "pyarrow"} <= set(checked)
    for req in needs:
        pin = pins.get(req.name.lower().replace("_", "-"))
        assert pin is None or req.specifier.contains(pin), f"Colab {runtime} has {req.name} {pin}: {req}"


# ---------------------------------------------------------------------------------------------------------------
# Smaller traps


def test_a_short_notebook_run_still_warms_up_and_draws_grids(monkeypatch):
    monkeypatch.delenv(notebook.SMALL_ENV, raising=False)
    run = notebook.configure(dataset="synthetic", use_drive=False, tokenizer=dict(steps=200),
                             generator=dict(steps=30000))
    assert (run.tokenizer.warmup_steps, run.tokenizer.sample_every) == (20, 10)  # it reaches its peak LR
    assert (run.generator.warmup_steps, run.generator.sample_every) == (500, 1000)
    given = notebook.configure(dataset="synthetic", use_drive=False, warmup_steps=7, tokenizer=dict(sample_every=3))
    assert (given.tokenizer.warmup_steps, given.tokenizer.sample_every, given.generator.warmup_steps) == (7, 3, 7)


def test_a_gan_weight_that_never_switches_on_is_said(caplog):
    from parti.train_tokenizer import TokenizerTrainConfig

    with caplog.at_level(logging.WARNING, logger="parti.train_tokenizer"):
        TokenizerTrainConfig(data="synthetic", steps=500, adversarial_weight=0.1, disc_start=10000)
    assert "adversarial_weight 0.1 has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="parti.train_tokenizer"):
        TokenizerTrainConfig(data="synthetic", steps=500, adversarial_weight=0.1, disc_start=100)
    assert caplog.text == ""


def test_the_free_space_check_counts_only_what_is_still_to_download(tmp_path, monkeypatch, caplog):
    """Shards an interrupted download left in the cache need no room again (it refused a disk that had room)."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants

    from parti import hub
    from tests.hubcache import COMMIT, add_to_cache

    cache = tmp_path / "hub"
    shard = b"PAR1" + b"\0" * 1000
    add_to_cache(cache, "user/faces", {"data/train-00000-of-00002.parquet": shard}, repo_type="dataset")
    siblings = [SimpleNamespace(rfilename=f"data/train-0000{i}-of-00002.parquet", size=60 * 10**9) for i in (0, 1)]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo, **k: SimpleNamespace(siblings=siblings, sha=COMMIT))
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(free=70 * 10**9))
    with caplog.at_level(logging.INFO, logger="parti.hub"):
        hub._announce_download("user/faces", None, ("*.parquet", "**/*.parquet"))  # 60 GB to go: fits in 70
    assert "60.0 GB of parquet shards to download" in caplog.text and "1 of 2 files already there" in caplog.text
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(free=50 * 10**9))
    with pytest.raises(PartiError, match="needs 60.0 GB .* 50.0 GB free"):
        hub._announce_download("user/faces", None, ("*.parquet", "**/*.parquet"))


def test_a_batch_that_does_not_fit_the_gpu_says_what_to_change(tmp_path, monkeypatch):
    import torch

    from parti.train_tokenizer import TokenizerStage, TokenizerTrainConfig, train_tokenizer

    def out_of_memory(self, batch, at):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(TokenizerStage, "train_step", out_of_memory)
    with pytest.raises(PartiError, match=r"step 1: a batch of 4 does not fit the GPU's memory; lower --batch-size"):
        train_tokenizer(TokenizerTrainConfig(**TOKENIZER, out=str(tmp_path / "tok")))
    set_audience("notebook")
    try:
        with pytest.raises(PartiError, match="lower the batch size .* in the configuration cell"):
            train_tokenizer(TokenizerTrainConfig(**TOKENIZER, out=str(tmp_path / "tok2")))
    finally:
        set_audience("cli")
