"""Shared benchmark helpers: fixed threads, alternating A/B timing, medians and spread, peak memory,
a matmul peak, analytic FLOP counts for our generator, and the table + JSON-line printers.

Why alternate: this machine's speed drifts (other processes share its two cores), so every round runs
each contender once, in a rotating order, and ratios are taken within a round (paired) before the
median. A matmul probe can join the rounds, so FLOP/s fractions are taken against the peak measured at
the same moment.

Peak memory: torch's CPU allocator keeps no statistics, and tracemalloc does not see it, so we read the
kernel's resident high-water mark (VmHWM in /proc/self/status), reset before each call by writing 5 to
/proc/self/clear_refs, after returning freed heap pages with malloc_trim. Reported as the peak resident
memory above what was resident just before the call (activations, gradients, temporaries), in MiB.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

DEFAULT_THREADS = 2


# ---- machine and threads ------------------------------------------------------------------------

def setup(threads: int = DEFAULT_THREADS, seed: int = 0) -> dict:
    """Fix torch's intra-op threads (and one inter-op thread); return a description of the machine."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass
    torch.manual_seed(seed)
    info = machine_info()
    busy = info["loadavg_start"]
    if busy is not None and threads > 1 and busy > 0.5:
        log(f"warning: load average {busy} before start; other processes share these cores, and with {threads} "
            "threads every parallel op waits for a descheduled thread (sampling steps measured 10-40x slower). "
            "Ratios from such a run are unreliable; wait for an idle machine or use --threads 1")
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def describe(info: dict) -> str:
    return (f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, "
            f"{info['threads']} threads, {info['date']}, load average at start {info['loadavg_start']}")


# ---- memory -------------------------------------------------------------------------------------

def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int | None:
    """Return freed heap to the OS, reset the high-water mark; -> resident KiB now (None: unsupported)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _peak_since(base_kib: int | None) -> float | None:
    if base_kib is None:
        return None
    hwm = _status_kib("VmHWM")
    return None if hwm is None else max(hwm - base_kib, 0) / 1024.0


# ---- timing -------------------------------------------------------------------------------------

@dataclass
class Samples:
    """Seconds per call and peak MiB above the resident baseline, one entry per round."""

    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> tuple[float, float]:
        return quartiles(self.seconds)

    @property
    def peak(self) -> float | None:
        return max(self.peak_mib) if self.peak_mib else None


def quartiles(xs: list[float]) -> tuple[float, float]:
    """(q25, q75) for n >= 4, else (min, max): the spread we report."""
    xs = sorted(xs)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return q[0], q[2]
    return xs[0], xs[-1]


def time_call(fn: Callable[[], object], *, memory: bool = True) -> tuple[float, float | None]:
    base = _reset_peak() if memory else None
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, _peak_since(base)


def alternate(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
              memory: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Samples]:
    """Run every function once per round for `repeats` rounds, rotating the order each round.

    `warmup` untimed rounds come first (allocator, thread pools, optimizer state)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: Samples() for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            dt, peak = time_call(fns[name], memory=memory)
            out[name].seconds.append(dt)
            if peak is not None:
                out[name].peak_mib.append(peak)
            if log is not None:
                log(f"  round {r + 1}/{repeats} {name}: {dt:.3f} s")
    return out


def paired_ratio(num: Samples, den: Samples) -> dict:
    """Per-round num/den (rounds are adjacent in time, so drift cancels): median and spread."""
    ratios = [a / b for a, b in zip(num.seconds, den.seconds)]
    lo, hi = quartiles(ratios)
    return {"median": statistics.median(ratios), "lo": lo, "hi": hi, "n": len(ratios)}


def summary(s: Samples) -> dict:
    lo, hi = s.spread()
    return {"median_s": s.median, "q25_s": lo, "q75_s": hi, "min_s": min(s.seconds), "max_s": max(s.seconds),
            "n": len(s.seconds), "peak_mib": None if s.peak is None else round(s.peak, 1)}


# ---- matmul peak --------------------------------------------------------------------------------

MATMUL_N = 2048


def matmul_probe(n: int = MATMUL_N, inner: int = 8, dtype: torch.dtype = torch.float32
                 ) -> tuple[Callable[[], None], float]:
    """-> (fn, flops): fn runs `inner` n x n matmuls in `dtype`; time it and divide to get FLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)

    def fn():
        for _ in range(inner):
            torch.mm(a, b, out=c)

    return fn, 2.0 * n ** 3 * inner


def matmul_peak(n: int = MATMUL_N, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s over `repeats` tries (the machine's practical ceiling now)."""
    fn, flops = matmul_probe(n)
    fn()
    return max(flops / time_call(fn, memory=False)[0] for _ in range(repeats))


# ---- memory bandwidth and MBU ------------------------------------------------------------------------

STREAM_BYTES = 1 << 30  # far above any CPU's last-level cache: every pass streams from DRAM


def stream_probe(nbytes: int = STREAM_BYTES) -> tuple[Callable[[], None], int]:
    """-> (fn, bytes): fn reads a buffer of `nbytes` once (a sum: reads only, vectorised, on every thread);
    bytes / seconds is the machine's streaming bandwidth now, the denominator of MBU. Time it in the same
    rounds as what it is compared with: bandwidth moves with the machine's neighbours hour by hour."""
    x = torch.ones(nbytes // 4)

    def fn():
        x.sum()

    return fn, x.numel() * 4


def decode_bytes(model, *, batch: int, guided: bool, passes: float, text_len: int) -> float:
    """Bytes one sampling call must read (MBU's numerator, as nanochat's inference benchmark counts it:
    weights once per forward pass, plus the KV cache read by attention): `passes` forward passes (256 for
    plain decoding; SJD's measured passes for a batch), each reading the decoder's weights as stored (int8
    buffers count one byte a weight), the self-attention cache of every row at its mean length (half the
    sequence) and the cross-attention keys/values of the conditional rows (the null rows' output is a
    constant). Caches are in the dtype of the model's final norm (the activations' dtype)."""
    c = model.config
    weights = sum(t.numel() * t.element_size() for m in (model.layers, model.norm, model.head)
                  for t in (*m.parameters(), *m.buffers()))
    elem = model.norm.weight.element_size()
    rows = 2 * batch if guided else batch
    kv_self = rows * (c.seq_len / 2) * 2 * c.depth * c.dim * elem
    kv_cross = batch * text_len * 2 * c.depth * c.dim * elem
    return passes * (weights + kv_self + kv_cross)


def mbu(nbytes: float, seconds: list[float], stream_seconds: list[float], stream_bytes: int) -> float:
    """Median over paired rounds of (bytes read / seconds) / (streaming bandwidth of the same round)."""
    return statistics.median((nbytes / t) / (stream_bytes / b) for t, b in zip(seconds, stream_seconds))


# ---- FLOP counts ----------------------------------------------------------------------------------

def generator_forward_flops(c, *, batch: int, text_len: int) -> float:
    """Matmul + attention FLOPs of one teacher-forced forward of our generator (config `c`), including
    the conditioning (text projection, cross-attention keys/values). Attention counts the full T x T
    square (the PaLM / nanoGPT convention). Multiply by 3 for forward + backward."""
    d, T, L, V = c.dim, c.seq_len, text_len, c.num_codes
    hidden = int(c.dim * c.mlp_ratio)
    per_token = c.depth * (6 * d * d + 2 * d * hidden) + d * V  # weights touched per image token
    attn = c.depth * (2 * 2 * T * T * d + 2 * 2 * T * L * d)
    text = L * (c.text_dim * d + c.text_layers * (4 * d * d + 2 * d * hidden) + c.depth * 2 * d * d)
    text_attn = c.text_layers * 2 * 2 * L * L * d
    return batch * (2.0 * (T * per_token + text) + attn + text_attn)


def generator_sample_flops(c, *, batch: int, text_len: int, guided: bool) -> float:
    """FLOPs `parti.sampling.generate` performs for all T tokens (KV cache: one token per row per step),
    plus encode_condition. Guidance doubles the rows for everything but cross-attention: the null rows'
    cross-attention output is a constant per layer (`parti.decoding.null_cross_outputs`), not counted here.
    The compiled step attends over all T cached positions (masked) and so does more work than counted."""
    d, T, L, V = c.dim, c.seq_len, text_len, c.num_codes
    rows = 2 * batch if guided else batch
    hidden = int(c.dim * c.mlp_ratio)
    every_row = c.depth * (4 * d * d + 2 * d * hidden) + d * V  # self-attention q/kv/out, MLP, head
    self_attn = sum(c.depth * 2 * 2 * (p + 1) * d for p in range(T))
    cross = 2.0 * T * c.depth * 2 * d * d + T * c.depth * 2 * 2 * L * d  # q/out and attention, per row
    cond = batch * (2.0 * L * (c.text_dim * d + c.text_layers * (4 * d * d + 2 * d * hidden))
                    + c.text_layers * 2 * 2 * L * L * d)
    ctx_kv = batch * 2.0 * L * c.depth * 2 * d * d
    null = 2.0 * c.depth * 3 * d * d if guided else 0.0  # null_cross_outputs: one key/value and out-projection
    return rows * (2.0 * T * every_row + self_attn) + batch * cross + cond + ctx_kv + null


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch's FlopCounterMode sees while running `fn` once (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def num_params(module: torch.nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---- subnormal floats ---------------------------------------------------------------------------

def subnormal_share(tensors) -> float:
    """Share of nonzero fp32 values below the smallest normal (they make CPU arithmetic slow)."""
    tiny = torch.finfo(torch.float32).tiny
    sub = nonzero = 0
    for t in tensors:
        if t is None or t.dtype != torch.float32:
            continue
        t = t.detach()
        nz = t != 0
        nonzero += int(nz.sum())
        sub += int((nz & (t.abs() < tiny)).sum())
    return sub / max(nonzero, 1)


# ---- output -------------------------------------------------------------------------------------

def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_spread(s: Samples) -> str:
    lo, hi = s.spread()
    return f"{fmt_s(lo)} - {fmt_s(hi)}"


def fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def fmt_ratio(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.2f}x [{r['lo']:.2f}-{r['hi']:.2f}]"


def table(headers: list[str], rows: list[list[str]], *, title: str | None = None) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def emit_json(record: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    record.setdefault("loadavg_end", round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    print(json.dumps(record, default=_jsonable), flush=True)


def _jsonable(x):
    if isinstance(x, Samples):
        return summary(x)
    return str(x)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
