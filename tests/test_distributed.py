"""Several processes: 2 CPU processes over gloo (torchrun --standalone --nproc_per_node 2, accelerate picks the
environment up: MULTI_CPU, backend gloo) with batch B per process track 1 process with batch 2B.

Tolerances (2 processes vs 1, tiny presets, 10 steps, fp32):
- generator: weights within 1e-4 (seen: 2.4e-6), every logged loss within 1e-5 relative (seen: 1e-7). Only the
  order of float reductions differs: the data shards, condition dropout (drawn for the global batch), the
  gradient mean and the logged loss are the same as one process's.
- tokenizer (slow): the reconstruction (L2) loss curve within 15% relative on average (seen: about 2%). Not
  tighter: the codebook's first restart draws codes from rank 0's half of the batch, not the whole batch.
  Either way every rank must hold the same weights, codebook usage buffers and discriminator at each save.
Only the main process writes: one metrics line per step, one set of checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parti.batches import epoch_batches

STEPS = 10


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_shards_of_n_ranks_make_the_global_batch_of_one():
    """Rank r of N takes slice r of each global batch: together exactly one process's batch N*B, in order."""
    one = epoch_batches(50, batch_size=8, seed=3, epoch=1, flip_prob=0.5)
    ranks = [epoch_batches(50, batch_size=4, seed=3, epoch=1, rank=r, world=2, flip_prob=0.5) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6
    for step, batch in enumerate(one):
        assert ranks[0][step] + ranks[1][step] == batch  # same items, same flips
        assert not set(i for i, _ in ranks[0][step]) & set(i for i, _ in ranks[1][step])


def cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else ["--no-" + key.replace("_", "-")] if value is False else [flag, str(value)]
    return args


def torchrun(command: str, options: dict, out: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "parti.cli", "-q", command,
                           *cli_args(options), "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def one_process(command: str, options: dict, out: Path) -> None:
    from parti.cli import main

    assert main(["-q", command, *cli_args(options), "--out", str(out)]) == 0  # one thread: see the fixture


def train_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert len({r["step"] for r in train}) == len(train) == STEPS  # one line per step: only main logs
    return {r["step"]: r for r in train}


def assert_replicas_in_sync(run: Path, world: int) -> None:
    for state in sorted((run / "checkpoints").glob("step_*/state.json")):
        meta = json.loads(state.read_text())
        assert meta["world_size"] == world and meta["replicas_in_sync"] is True, state


def test_two_processes_track_one_with_the_global_batch_generator(tmp_path):
    from parti.cache import encode_dataset
    from parti.tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(build_tokenizer("tiny"), tmp_path / "tok")
    encode_dataset(data="synthetic", tokenizer=tmp_path / "tok", out=tmp_path / "cache", synthetic_length=32,
                   max_items=32, batch_size=32, device="cpu", progress=False)
    options = {"data": tmp_path / "cache", "tokenizer": tmp_path / "tok", "preset": "tiny", "text_preset": "tiny",
               "text_tokenizer": "bytes", "steps": STEPS, "lr": 2e-3, "warmup_steps": 2, "cond_drop_prob": 0.3,
               "ema_decay": 0.9, "val_batches": 1, "sample_every": 100, "save_every": 5, "log_every": 1, "cpu": True,
               "mixed_precision": "no", "progress": False}
    proc = torchrun("train", {**options, "batch_size": 4}, tmp_path / "two")
    assert proc.stdout.count("generator saved in") == 1  # the main process reports; rank 1 stays quiet
    one_process("train", {**options, "batch_size": 8}, tmp_path / "one")

    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    rows_two, rows_one = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    for step, row in rows_one.items():
        assert rows_two[step]["loss"] == pytest.approx(row["loss"], rel=1e-5), step
    assert_replicas_in_sync(tmp_path / "two", world=2)
    assert len(list((tmp_path / "two" / "samples").glob("*.png"))) == 1  # the final grid, once


def test_an_error_on_the_main_process_stops_every_rank(tmp_path):
    """Stage 2 encodes its cache on the main process only; when that fails, rank 1 (waiting at a barrier)
    gets the same one-line error. Without it rank 1 waits until the launcher kills it (torchrun does; a
    launcher without an elastic agent leaves it hanging until the collective times out)."""
    from parti.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer("tiny"), tmp_path / "tok")
    (tmp_path / "faces").mkdir()
    for i in range(12):  # files named like images that are not: nothing encodes
        (tmp_path / "faces" / f"{i:02d}.png").write_bytes(b"not a png")
    proc = torchrun("train", {"data": tmp_path / "faces", "tokenizer": tmp_path / "tok", "cpu": True,
                              "progress": False}, tmp_path / "run", check=False)
    # Both ranks report it, one message each (split on the prefix: two ranks share one stderr pipe).
    errors = [m.strip() for m in proc.stderr.split("parti: error:")[1:]]
    errors = [m.splitlines()[0] for m in errors]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
    assert all("no readable images" in e for e in errors), errors


class FakeAcc:
    def __init__(self, main: bool, processes: int):
        self.is_main_process, self.num_processes = main, processes


@pytest.mark.parametrize("main", [True, False])
def test_on_main_tells_every_rank_whether_the_failure_is_a_user_mistake(main, monkeypatch):
    """A PartiError on main becomes an EveryRankError on every rank (the CLI then waits for all to print);
    a bug stays main's own exception (traceback), and elsewhere a plain PartiError that waits for no one
    (main never reaches that wait)."""
    from parti import distributed
    from parti.errors import EveryRankError, PartiError

    sent = {}
    def broadcast(acc, text):  # rank 0's string on every rank; the other rank receives what main sent
        sent.setdefault("text", text)
        return text if acc.is_main_process else sent["main"]
    monkeypatch.setattr(distributed, "_broadcast_text", broadcast)

    def fail(exc):
        def fn():
            raise exc
        return fn

    acc = FakeAcc(main, 2)
    sent["main"] = "Pno readable images in faces/"
    with pytest.raises(EveryRankError, match="^no readable images in faces/$"):
        distributed.on_main(acc, fail(PartiError("no readable images in faces/")))
    sent.clear()
    sent["main"] = "Xthe main process failed (ValueError('bug'))"
    with pytest.raises(ValueError if main else PartiError) as info:
        distributed.on_main(acc, fail(ValueError("bug")))
    assert not isinstance(info.value, EveryRankError) and (main or "ValueError('bug')" in str(info.value))
    sent.clear()
    sent["main"] = ""
    assert distributed.on_main(acc, lambda: 7) == (7 if main else None)
    # One process: the original error, as raised.
    original = PartiError("bad")
    with pytest.raises(PartiError) as info:
        distributed.on_main(FakeAcc(True, 1), fail(original))
    assert info.value is original
    distributed.wait_for_every_rank()  # no process group: returns at once


def test_the_cli_waits_for_every_rank_only_after_an_every_rank_error(monkeypatch, capsys):
    from parti import cli, distributed
    from parti.errors import EveryRankError, PartiError

    from types import SimpleNamespace

    waits = []
    monkeypatch.setattr(distributed, "wait_for_every_rank", lambda: waits.append(1))
    for error, expected in ((PartiError("mine"), []), (EveryRankError("ours"), [1])):
        def boom(args, error=error):
            raise error
        args = SimpleNamespace(quiet=True, func=boom)
        monkeypatch.setattr(cli, "build_parser", lambda args=args: SimpleNamespace(parse_args=lambda argv: args))
        waits.clear()
        assert cli.main([]) == 2 and waits == expected
        assert capsys.readouterr().err == f"parti: error: {error}\n"


@pytest.mark.slow
def test_two_processes_track_one_with_the_global_batch_tokenizer(tmp_path):
    options = {"data": "synthetic", "synthetic_length": 64, "preset": "tiny", "steps": STEPS, "lr": 2e-3,
               "warmup_steps": 2, "perceptual_weight": 0.0, "adversarial_weight": 0.1, "disc_start": 3,
               "disc_channels": 8, "val_images": 4, "sample_every": 100, "save_every": 5, "log_every": 1,
               "cpu": True, "mixed_precision": "no", "progress": False}
    torchrun("train-tokenizer", {**options, "batch_size": 4}, tmp_path / "two")
    one_process("train-tokenizer", {**options, "batch_size": 8}, tmp_path / "one")

    rows_two, rows_one = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    rel = [abs(rows_two[s]["l2"] - r["l2"]) / r["l2"] for s, r in rows_one.items()]
    assert sum(rel) / len(rel) < 0.15, rel
    assert rows_two[STEPS]["d_loss"] == pytest.approx(rows_one[STEPS]["d_loss"], rel=0.05)  # D trained on both
    assert_replicas_in_sync(tmp_path / "two", world=2)  # DDP, all-reduced usage, broadcast restarts, D grads
