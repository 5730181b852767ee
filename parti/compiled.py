"""The compiled decoding step: `torch.compile` of a static-shape `parti.decoding.Decoder`, and its caches.

`decoder_for(..., compile=...)` is where sampling gets its decoder: an eager one (`parti.decoding`), or this
module's compiled one. Compiled, every step has the same shapes (the decoder's `static` mode: attention over
the whole cache with positions after `pos` masked, `pos` a tensor), so `torch.compile` builds one graph and
CUDA graphs (`mode="reduce-overhead"`) replay it. The state (cache, text keys/values) is passed in as
inputs. On CPU from `FILLED_ATTENTION_ROWS` rows the self-attention is SDPA over the filled part of the
cache, through a custom op registered here on first use (`parti::filled_attention`). On CPU the weights are
frozen into the graph as copies packed for MKL's GEMM (memory the process keeps: see docs/benchmarks.md,
"Figures behind the code's design choices") and the graph's kernels are called from C++
(inductor's `cpp_wrapper`); after the weights change the step is compiled once more, unfrozen (weights as
inputs, following later changes).

Process-wide state: the compiled decoders, per generator and shape (`_DECODERS`), the generators being
trained (`_CHANGING`), the first compilation failure (after which decoding runs eager, which is also the
reference) and the warnings already given. `use_compile` resolves the `compile` option.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import types
import weakref

import torch
from torch import nn

from parti.decoding import Decoder, filled_sdpa
from parti.errors import PartiError
from parti.generator import Generator

log = logging.getLogger(__name__)

# Compiled decoders by id(generator), then by shape; an entry goes when its generator is collected.
_DECODERS: dict[int, dict[tuple, Decoder]] = {}
_compile_failure: str | None = None  # set by the first failure: later requests run eager without retrying
_warned: set[str] = set()
# Whether compile="auto" compiles on CPU (CUDA: always, where launch overhead bounds a step). Off: on the
# `bench` preset (`benchmarks/bench_generator.py --compile`) the compiled step, with frozen packed weights,
# attention as fused reductions and a C++ wrapper, samples only somewhat faster than eager, and compiling a
# shape takes longer than that saves unless a process samples that shape dozens of times (see
# docs/benchmarks.md, "Figures behind the code's design choices"). `compile=True`
# (`parti sample --compile on`) opts in.
CPU_AUTO_COMPILE = False
_CHANGING: set[int] = set()  # ids of generators whose weights changed after a frozen compilation


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot build a decoding step for `device` here (None: it can)."""
    try:
        import torch._inductor  # noqa: F401
    except ImportError as e:
        return f"torch without inductor ({e})"
    if device.type == "cpu":
        if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
            return "no C++ compiler on PATH (inductor compiles C++ for CPU)"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (inductor needs it for CUDA)"
    else:
        return f"compiled decoding supports CPU and CUDA, not {device.type}"
    return None


def use_compile(compile: bool | str, device: torch.device) -> bool:
    """Resolve a `compile` option (True, False or "auto") for `device`. True where compilation is not
    available logs one warning and gives False (eager); "auto" compiles on CUDA, and on CPU where
    CPU_AUTO_COMPILE says it measured faster."""
    if not (compile is True or compile is False or compile == "auto"):
        raise PartiError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile is False:
        return False
    if _compile_failure is not None:  # warned when it failed
        return False
    reason = compile_unavailable(device)
    if reason is not None:
        if compile is True:
            _warn_once(f"compiled decoding unavailable, decoding eager: {reason}")
        return False
    return compile is True or device.type == "cuda" or CPU_AUTO_COMPILE


def weights_key(model: nn.Module) -> tuple:
    """What changes when a module's weights do: each parameter's storage and in-place version (an
    optimizer step, `load_state_dict`, `copy_`). Tensors made under inference mode keep no version:
    their storage alone stands for them."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version)
                 for t in (*model.parameters(), *model.buffers()))


def decoder_for(model: Generator, *, batch: int, guided: bool, context_len: int,
                compile: bool | str = False) -> Decoder:
    """A Decoder for `batch` prompts of up to `context_len` text tokens: a fresh eager one (packed CPU
    weights), or the process's compiled one for this generator and shape (compiled on first use;
    `decoder.compile_s` holds the seconds that took)."""
    p = next(model.layers.parameters())
    if not use_compile(compile, p.device):
        return Decoder(model, batch=batch, guided=guided, context_len=context_len)
    length = -(-context_len // 8) * 8  # text lengths in steps of 8: fewer shapes, fewer compilations
    key = (batch, guided, length, p.dtype, p.device, model.head.weight.dtype)
    cached = _DECODERS.get(id(model), {})
    if key in cached:
        if cached[key].weights_key is None or cached[key].weights_key == weights_key(model):
            return cached[key]
        # Its frozen weights are out of date: this generator is being trained. Compile once more with the
        # weights as inputs (no freezing), which follows later changes without compiling again. (Each
        # frozen compilation also keeps a copy of the weights in memory for the process: see
        # docs/benchmarks.md, "Figures behind the code's design choices".)
        del cached[key]
        _CHANGING.add(id(model))
        log.info("the generator's weights changed since its decoding step was compiled with them frozen: "
                 "compiling it again with the weights as inputs")
    freeze = p.device.type == "cpu" and id(model) not in _CHANGING  # CPU: packed, frozen weights (`_compile`)
    decoder = Decoder(model, batch=batch, guided=guided, context_len=length, static=True, packed=False)
    try:
        decoder.compile_s = _compile(decoder, model.bos, freeze=freeze)
        decoder.weights_key = weights_key(model) if freeze else None
    except Exception as e:  # noqa: BLE001 - any compiler error: decode eager, as without a compiler
        global _compile_failure
        _compile_failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _warn_once(f"compiling the decoding step failed, decoding eager from now on: {_compile_failure}")
        return Decoder(model, batch=batch, guided=guided, context_len=context_len)
    if id(model) not in _DECODERS:
        weakref.finalize(model, _DECODERS.pop, id(model), None)
        weakref.finalize(model, _CHANGING.discard, id(model))
    _DECODERS.setdefault(id(model), {})[key] = decoder
    log.info("compiled the decoding step for %d rows x %d text tokens (%s, %s) in %.1f s", decoder.rows, length,
             p.device.type, str(p.dtype).removeprefix("torch."), decoder.compile_s)
    return decoder


@functools.cache  # registered on first use, so that importing parti registers nothing
def _filled_attention():
    """`parti::filled_attention(q, k, v, pos)`: `parti.decoding.filled_sdpa` (SDPA of q (R, H, 1, d) over
    the first pos + 1 positions of the cache k, v (R, H, T, d)) as a custom op, opaque to the compiler, so
    that a compiled step calls it with the cache's filled length read at run time (`pos.item()`, which
    cannot be in a CUDA graph: CPU only). -> the op, `torch.ops.parti.filled_attention`."""
    @torch.library.custom_op("parti::filled_attention", mutates_args=())
    def filled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return filled_sdpa(q, k, v, pos)

    @filled_attention.register_fake
    def _(q, k, v, pos):
        return torch.empty_like(q)

    return torch.ops.parti.filled_attention


def _own_code(method):
    """`method` (bound) as a function with a code object of its own. Dynamo keeps compiled graphs and
    their guards on the code object: with one code object for every Decoder, each new decoder (a shape,
    new weights) would add an entry there that outlives it, and the ninth would hit dynamo's recompile
    limit (8), which stops compilation for the process. With one each, the limit is per decoder."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    own.__kwdefaults__, own.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(own, method.__self__)


def _graph_steps(step):
    """`step` (compiled with CUDA graphs) with each call marked as a new step: the previous step's logits
    are consumed, so its graph's outputs may be overwritten."""
    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args)
    return run


def _compile(decoder: Decoder, bos: int, *, freeze: bool = False) -> float:
    """Compile `decoder.static_step` and run it until compiled (CUDA graphs record on the second or third
    call); -> seconds taken. The warm-up steps leave the cache dirty: `start` clears it.

    freeze (CPU only): the weights are frozen into the compiled step (inductor's `freezing`): it multiplies
    copies of them packed for MKL's GEMM at the step's row count, as eager's `PackedLinear` does. Those
    copies are a snapshot: `decoder_for` checks `weights_key` and, after a change, compiles unfrozen."""
    cuda = decoder.pos.device.type == "cuda"
    if decoder.filled:  # the filled-cache attention as an op the compiler does not trace into
        decoder.filled_attention = _filled_attention()
    mode = "reduce-overhead" if cuda else None
    compiled = torch.compile(_own_code(decoder.static_step), mode=mode, fullgraph=True, dynamic=False)
    decoder.compiled = _graph_steps(compiled) if cuda else compiled
    device = decoder.pos.device
    if cuda:  # CUDA graphs read and write these in place: their addresses must not change between replays
        cache, *rest = decoder.state()
        for t in (*decoder.buffers(), decoder.pos, *cache, *rest):
            torch._dynamo.mark_static_address(t)
    import torch._inductor.config as inductor_config

    # CPU: cpp_wrapper makes the step's kernel calls from C++, not Python, which saves a visible share of a
    # step at 1-4 prompts (see docs/benchmarks.md, "Figures behind the code's design choices").
    # (Passed as torch.compile's options, `freezing` is ignored: hence a patch around the compiling call.)
    patch = {} if cuda else {"freezing": freeze, "cpp_wrapper": True}
    t0 = time.perf_counter()
    # Compiles on the first call, in inference mode and with an inference-mode token, as `generate` runs it:
    # otherwise the first step in `generate` fails a guard and compiles again, outside this patch.
    with torch.inference_mode(), inductor_config.patch(**patch):
        token = torch.full((decoder.rows, 1), bos, dtype=torch.long, device=device)
        for _ in range(3 if cuda else 1):
            decoder.step(token, 0)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
