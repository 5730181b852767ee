"""Several processes: the accelerator, main-process-only work, reductions of logs, gradients and counts.

Every function here is a no-op (or the identity) with one process, so the training loop calls them
unconditionally; with several, each is a collective that every rank must reach.
"""

from __future__ import annotations

import logging

import torch

from parti.device import choose_mixed_precision
from parti.errors import EveryRankError, PartiError
from parti.metrics import code_usage

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "auto", *, cpu: bool = False, log_with: str | None = None,
                     project_dir: str | None = None):
    """An accelerate.Accelerator with bf16 where supported, fp16 on older GPUs, fp32 on CPU; `log_with`: its
    tracker (tensorboard, wandb), writing under `project_dir`."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        # By compute capability: a T4 claims bf16 support but only emulates it (slowly), so it gets fp16.
        mixed_precision = "no" if cpu else choose_mixed_precision()
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise PartiError(f"--mixed-precision must be auto, no, bf16 or fp16; got {mixed_precision!r}")
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=log_with, project_dir=project_dir)
    log.info("device %s, mixed precision %s, %d process(es)", acc.device, mixed_precision, acc.num_processes)
    return acc


def on_main(acc, fn):
    """Run `fn` on the main process only. Its failure is raised on every rank (a PartiError with the same
    one-line message, an EveryRankError when there are several ranks; any other error re-raised on main, a
    PartiError naming it elsewhere), so the other ranks never wait forever at the next collective. Returns
    fn's result on the main process, else None."""
    result, message, error = None, "", None
    if acc.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            error = e
            # First character: P, a user mistake every rank reports; X, a bug main raises with its traceback.
            message = f"P{str(e) or 'failed'}" if isinstance(e, PartiError) else f"Xthe main process failed ({e!r})"
    if acc.num_processes > 1:
        message = _broadcast_text(acc, message)
    if not message:
        return result
    kind, text = message[0], message[1:]
    if kind == "P" and acc.num_processes > 1:
        raise EveryRankError(text) from error
    if error is not None:
        raise error
    raise PartiError(text)


def wait_for_every_rank(timeout_s: float = 30.0) -> None:
    """After an EveryRankError is printed: wait (at most timeout_s) until every rank has printed it too."""
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - exiting anyway: a rank that is gone must not turn an error into a hang
        pass


def _broadcast_text(acc, text: str) -> str:
    """The main process's string on every rank, sent as bytes in a tensor (nothing pickled)."""
    from accelerate.utils import broadcast

    data = torch.tensor(list(text.encode("utf-8")[:4096]), dtype=torch.uint8)
    length = broadcast(torch.tensor([len(data)], dtype=torch.long, device=acc.device), from_process=0)
    buf = torch.zeros(int(length.item()), dtype=torch.uint8, device=acc.device)
    if acc.is_main_process:
        buf.copy_(data.to(acc.device))
    if buf.numel():
        buf = broadcast(buf, from_process=0)
    return bytes(buf.cpu().tolist()).decode("utf-8", errors="replace")


def reduce_logs(acc, logs: dict[str, float]) -> dict[str, float]:
    """Scalar logs averaged over ranks (one all-reduce); unchanged with one process."""
    if acc.num_processes == 1 or not logs:
        return logs
    keys = sorted(logs)
    values = acc.reduce(torch.tensor([float(logs[k]) for k in keys], device=acc.device), reduction="mean")
    return dict(zip(keys, values.tolist()))


def total_over_ranks(acc, value: float) -> float:
    """Sum of a per-rank count (e.g. unreadable images met) over ranks; the value itself with one process."""
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor([float(value)], device=acc.device), reduction="sum").item())


def global_codebook_stats(acc, codes: torch.Tensor, size: int) -> dict[str, float]:
    """Share of the codebook used and perplexity of the global batch (code counts summed over ranks;
    averaging per-rank usage would understate it)."""
    counts = torch.bincount(codes.flatten(), minlength=size).float()
    if acc.num_processes > 1:
        counts = acc.reduce(counts, reduction="sum")
    usage, perplexity = code_usage(counts)
    return {"usage": float(usage), "perplexity": float(perplexity)}


def average_gradients(acc, module: torch.nn.Module) -> None:
    """Mean of `module`'s gradients over ranks: for a module trained outside DDP (the discriminator)."""
    if acc.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all tensors
    dist.all_reduce(flat)
    flat /= acc.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def replicas_agree(acc, module: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights and buffers (compared by per-tensor float64 sums). All
    ranks must call it: DDP, the all-reduced codebook usage and broadcast code restarts keep it True."""
    if acc.num_processes == 1:
        return True
    sums = torch.stack([v.detach().double().sum() for v in module.state_dict().values()
                        if v.dtype.is_floating_point]).to(acc.device)
    every = acc.gather(sums[None])  # (world, n)
    agree = bool((every == every[0]).all().item())
    if not agree:
        log.error("model replicas differ across ranks (max difference %.3g)", float((every - every[0]).abs().max()))
    return agree
