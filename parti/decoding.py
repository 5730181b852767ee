"""The sampler's fast path: one cached decoding step of a `Generator`, eager or compiled.

A `Decoder` is built from a generator for a fixed number of prompts (and text length). It holds what
decoding needs beside the weights, so the model itself stays a plain teacher-forcing network:
  - the KV cache, pre-allocated at full length: depth x (k, v), each (rows, H, T, head_dim);
  - the text's cross-attention keys/values, computed once per prompt: (depth, B, H, L, head_dim);
  - with guidance, the null rows' cross-attention output, a constant per layer (`null_cross_outputs`),
    so only the B conditional rows of the 2B attend to text;
  - on CPU (eager), copies of the linear weights packed for the row count (`PackedLinear`).
`Decoder.step(token, pos)` runs one token per row through the network: (rows, 1) -> logits (rows, K).

Compiled (`decoder_for(..., compile=True)`): every step has the same shapes (attention over the whole
cache with positions after `pos` masked, `pos` a tensor), so `torch.compile` builds one graph and CUDA
graphs (`mode="reduce-overhead"`) replay it. The state (cache, text keys/values) is passed in as inputs;
attention at one query is written as reductions that inductor fuses into one loop (the values cached
(rows, H, d, T), contiguous along the sum); on CPU from 8 rows the self-attention is instead SDPA over the
filled part of the cache, through a custom op (`_filled_attention`). On CPU the weights are frozen into
the graph as copies packed for MKL's GEMM (about 1.6x the weights' memory, which the process keeps) and
the graph's kernels are called from C++ (inductor's `cpp_wrapper`); after the weights change the step is
compiled once more, unfrozen (weights as inputs, following later changes). The compiled decoder is cached
per generator and shape for the process; compilation failures log one warning and decoding runs eager,
which is also the reference.
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
import torch.nn.functional as F
from torch import nn

from parti.errors import PartiError
from parti.generator import Generator

log = logging.getLogger(__name__)

# fp32 packs from 2 rows (batch 1 with guidance): there MKL's plain GEMM is 1.6x slower than its packed
# one with AVX2 kernels, and packing (a copy of the weights per `generate` call) still gains 1.2x end to
# end with AMX's. At 1 row both stream the weights equally fast, so the copy would not pay. bf16 packs at
# any row count: there the packed product is the one that reads the weights at full bandwidth
# (docs/benchmarks.md).
MIN_PACKED_ROWS = 2
COMPILE_CHOICES = (True, False, "auto")


def mkl_packing_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def onednn_bf16_packing_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """`linear` applied through a copy of its weight packed for the CPU's GEMM at `rows` rows: decoding
    multiplies the same weights by a few rows T times. fp32 through MKL's packed GEMM (from
    MIN_PACKED_ROWS rows), bf16 through oneDNN's (AMX where the CPU has it). `kind` is None where
    neither applies (GPUs, ARM, other dtypes, few fp32 rows): the plain product. The copy is a snapshot:
    build a new one after the weights change."""

    def __init__(self, linear: nn.Linear, rows: int):
        self.linear, self.rows, self.kind, self.packed = linear, rows, None, None
        w = linear.weight.detach()
        if w.device.type != "cpu":
            return
        if w.dtype == torch.float32 and rows >= MIN_PACKED_ROWS and mkl_packing_available():
            self.kind, self.packed = "mkl", torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        elif w.dtype == torch.bfloat16 and onednn_bf16_packing_available():
            self.kind, self.packed = "onednn", torch.ops.mkldnn._reorder_linear_weight(w, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        if self.kind is None or torch.is_grad_enabled():  # the packed kernels have no backward
            return F.linear(x, w, b)
        if self.kind == "onednn":  # any number of rows runs on the packed copy
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, b, "none", [], "")
        # Any number of rows is correct; only `rows` rows use the packed copy, others the plain GEMM on w.
        return torch.ops.mkl._mkl_linear(x, self.packed, w, b, self.rows)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, t, D) -> (B, H, t, D/H), a view."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def context_kv(model: Generator, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cross-attention keys/values of `context` (B, L, dim), once per prompt: depth x two (B, H, L, d),
    contiguous, so that decoding steps do not copy strided views at every token."""
    out = []
    for layer in model.layers:
        kv = layer.cross_attn.kv(context).view(context.shape[0], context.shape[1], 2, model.config.heads, -1)
        out.append((kv[:, :, 0].transpose(1, 2).contiguous(), kv[:, :, 1].transpose(1, 2).contiguous()))
    return out


def null_cross_outputs(model: Generator) -> list[torch.Tensor]:
    """Per decoder layer, the cross-attention output of a null row: (1, 1, dim). The null condition leaves
    one key unmasked, so attention puts all its weight there whatever the query, and the output is the
    out-projection of that key's value."""
    x, _ = model.null_condition(1, 1)
    outs = []
    for layer in model.layers:
        v = layer.cross_attn.kv(x)[..., model.config.dim:]  # (1, 1, dim): the value half
        outs.append(layer.cross_attn.out(v))
    return outs


# From this many rows the compiled CPU step's self-attention reads only the filled part of the cache (SDPA
# through `_filled_attention`, an op opaque to the compiler): 1.10x at 8 rows (batch 4 with guidance),
# 0.81x at 2, where the fused loop over the whole cache wins (docs/benchmarks.md).
FILLED_ATTENTION_ROWS = 8


@functools.cache  # registered on first use, so that importing parti registers nothing
def _filled_attention():
    """`parti::filled_attention(q, k, v, pos)`: SDPA of q (R, H, 1, d) over the first pos + 1 positions of
    the cache k, v (R, H, T, d). A custom op, so that a compiled step calls it with the cache's filled length
    read at run time (`pos.item()`, which cannot be in a CUDA graph: CPU only)."""
    @torch.library.custom_op("parti::filled_attention", mutates_args=())
    def filled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = int(pos.item()) + 1
        return F.scaled_dot_product_attention(q, k.narrow(2, 0, n), v.narrow(2, 0, n))

    @filled_attention.register_fake
    def _(q, k, v, pos):
        return torch.empty_like(q)

    return filled_attention


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row as elementwise products and sums: q (R, H, 1, d), k/v (R, H, T, d),
    bias additive, broadcastable to (R, H, T, 1) -> (R, H, 1, d). Softmax in fp32, as SDPA's kernel does."""
    s = (q.float() * k.float()).sum(-1, keepdim=True) * q.shape[-1] ** -0.5 + bias  # (R, H, T, 1)
    e = torch.exp(s - s.amax(2, keepdim=True))  # softmax, normalised after the sum: one division per output
    return ((e * v.float()).sum(2, keepdim=True) / e.sum(2, keepdim=True)).to(v.dtype)


class Decoder(nn.Module):
    """Cached decoding of `model` for `batch` prompts of `context_len` text tokens. With `guided`, the
    step runs 2 * batch rows: the conditional ones, then null rows (classifier-free guidance).

    static: every step attends over the whole cache, positions after `pos` masked (one shape for all
    steps: what torch.compile and CUDA graphs need); else over the first pos + 1 positions (less work
    in eager). packed: CPU linears through `PackedLinear` (eager only: the copies are snapshots)."""

    def __init__(self, model: Generator, *, batch: int, guided: bool, context_len: int, static: bool = False,
                 packed: bool = True):
        super().__init__()
        c = model.config
        self.batch, self.guided, self.static, self.heads = batch, guided, static, c.heads
        self.rows = 2 * batch if guided else batch
        p = next(model.layers.parameters())  # the blocks' dtype (the head may be kept fp32 for sampling)
        # static, CPU, many rows: self-attention over the filled cache only (`_filled_attention`).
        self.filled = static and p.device.type == "cpu" and self.rows >= FILLED_ATTENTION_ROWS
        if self.filled:
            _filled_attention()  # registers torch.ops.parti.filled_attention
        # The generator's pieces (shared, not copied); not the Generator itself, so that a cached
        # Decoder does not keep its model alive.
        self.token_emb, self.row_emb, self.col_emb = model.token_emb, model.row_emb, model.col_emb
        self.layers, self.norm, self.head = model.layers, model.norm, model.head
        self.register_buffer("row_of", model.rows, persistent=False)
        self.register_buffer("col_of", model.cols, persistent=False)
        d, kw = c.dim // c.heads, {"dtype": p.dtype, "device": p.device}
        # The state a step reads and writes is held as plain tensors, not buffers: the compiled step takes it
        # as inputs (`state`), and freezing would turn a buffer it does not write into a constant.
        # One tensor per layer and k/v, written in place: a write into a view of one big tensor would make
        # the compiled step rebuild that whole tensor (functionalisation) at every layer.
        # static (fused loop): the values are stored (rows, H, d, T) and seen through a transposed view, so that
        # the compiled step's sum over positions reads them contiguously (3-5% faster on CPU than (.., T, d)).
        along = static and not self.filled
        shape = (self.rows, c.heads, d, c.seq_len) if along else (self.rows, c.heads, c.seq_len, d)
        self.cache = [(torch.zeros(self.rows, c.heads, c.seq_len, d, **kw),
                       torch.zeros(shape, **kw).transpose(-1, -2) if along else torch.zeros(shape, **kw))
                      for _ in range(c.depth)]  # depth x (k, v), each (rows, H, T, d)
        self.ctx_kv = torch.zeros(c.depth, 2, batch, c.heads, context_len, d, **kw)
        self.ctx_mask = torch.zeros(batch, 1, 1, context_len, **kw)  # additive
        self.null_outs = torch.zeros(c.depth, 1, 1, c.dim, **kw)
        self.pos = torch.zeros(1, dtype=torch.long, device=p.device)
        self._state = (tuple(t for kv in self.cache for t in kv), self.ctx_kv, self.ctx_mask, self.null_outs)
        self.register_buffer("positions", torch.arange(c.seq_len, device=p.device), persistent=False)
        self.linears = []  # per layer: name -> callable (rows, t, D_in) -> (rows, t, D_out)
        for layer in model.layers:
            every = {"q": layer.self_attn.q, "kv": layer.self_attn.kv, "out": layer.self_attn.out,
                     "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
            cross = {"cq": layer.cross_attn.q, "cout": layer.cross_attn.out}  # the conditional rows only
            self.linears.append({**{k: self._linear(m, self.rows, packed) for k, m in every.items()},
                                 **{k: self._linear(m, batch, packed) for k, m in cross.items()}})
        self.head_linear = self._linear(model.head, self.rows, packed)
        self.compiled = None  # set by `decoder_for`: the compiled `static_step`
        self.compile_s: float | None = None  # seconds the first compiled steps took (compilation)
        self.weights_key: tuple | None = None  # with frozen weights: `weights_key(model)` when compiled

    @staticmethod
    def _linear(m: nn.Linear, rows: int, packed: bool):
        return PackedLinear(m, rows) if packed else m

    def start(self, context: torch.Tensor, context_mask: torch.Tensor, model: Generator) -> None:
        """A new batch of prompts: context (B, L', dim) with L' <= context_len, mask (B, L') bool."""
        b, n = context.shape[:2]
        if b != self.batch or n > self.ctx_kv.shape[-2]:
            raise ValueError(f"a context of {b} rows x {n} tokens for a decoder of {self.batch} rows x "
                             f"{self.ctx_kv.shape[-2]} tokens")
        for k, v in self.cache:
            k.zero_()
            v.zero_()
        self.ctx_kv.zero_()
        for i, (k, v) in enumerate(context_kv(model, context)):
            self.ctx_kv[i, 0, :, :, :n].copy_(k)
            self.ctx_kv[i, 1, :, :, :n].copy_(v)
        # Additive mask, once per call rather than a bool one converted inside SDPA at every layer and step;
        # text positions past L' (padding up to context_len) are masked too.
        self.ctx_mask.fill_(torch.finfo(self.ctx_mask.dtype).min)
        self.ctx_mask[:, 0, 0, :n].masked_fill_(context_mask.bool(), 0.0)
        if self.guided:
            self.null_outs.copy_(torch.stack([o.reshape(1, 1, -1) for o in null_cross_outputs(model)]))

    def state(self) -> tuple:
        """What a step reads beside the weights and writes: the KV cache (flat: k0, v0, k1, ...), the text's
        keys/values, its additive mask and the null rows' outputs. The compiled step takes them as inputs,
        so that freezing (CPU) turns only the weights into constants. The same tensors for every step."""
        return self._state

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """token (rows, 1) long, the inputs at position `pos` (BOS first) -> fp32 logits (rows, K)."""
        self.pos.fill_(pos)  # one tensor for every step: the compiled graph reads `pos` from it
        if self.compiled is not None:
            if self.pos.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
            return self.compiled(token, self.pos, *self.state())
        return self(token, self.pos, length=None if self.static else pos + 1)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """token (rows, 1), pos (1,) long -> logits (rows, K). length: attend over the first `length`
        cached positions (eager, SDPA); None: over all T, those after `pos` masked (static shapes)."""
        return self.static_step(token, pos, *self.state(), length=length)

    def static_step(self, token: torch.Tensor, pos: torch.Tensor, cache: tuple, ctx_kv: torch.Tensor,
                    ctx_mask: torch.Tensor, null_outs: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """`forward` with the state passed in (what gets compiled, with length None). With length None,
        attention is written out as reductions over the cache, which the compiler fuses into one loop per
        layer (SDPA's kernel at one query costs about 100 us a call on a CPU)."""
        x = self.token_emb(token) + self.row_emb(self.row_of[pos]) + self.col_emb(self.col_of[pos])  # (R, 1, D)
        self_bias = None
        if length is None and not self.filled:  # (1, 1, T, 1) additive: 0 up to `pos`, -inf after
            self_bias = torch.where(self.positions <= pos, 0.0, float("-inf"))[None, None, :, None]
        b = self.batch
        for i, layer in enumerate(self.layers):
            lin, k_cache, v_cache = self.linears[i], cache[2 * i], cache[2 * i + 1]  # (R, H, T, d)
            h = layer.norm1(x)
            kv = lin["kv"](h).view(self.rows, 2, self.heads, -1)  # (R, 2, H, d)
            k_cache[:, :, pos] = kv[:, 0, :, None]  # an in-place write at `pos`, also when compiled
            v_cache[:, :, pos] = kv[:, 1, :, None]
            q = _split_heads(lin["q"](h), self.heads)
            if length is None and self.filled:
                o = torch.ops.parti.filled_attention(q, k_cache, v_cache, pos)
            elif length is None:
                o = _attend(q, k_cache, v_cache, self_bias)
            else:
                o = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length))
            x = x + lin["out"](o.transpose(1, 2).reshape(self.rows, 1, -1))
            # Cross-attention of the conditional rows; null rows (guided) add their constant output.
            x_c = x[:b]
            q = _split_heads(lin["cq"](layer.norm2(x_c)), self.heads)
            if length is None:
                o = _attend(q, ctx_kv[i, 0], ctx_kv[i, 1], ctx_mask.transpose(-1, -2))  # (B, 1, L, 1)
            else:
                o = F.scaled_dot_product_attention(q, ctx_kv[i, 0], ctx_kv[i, 1], attn_mask=ctx_mask)
            x_c = x_c + lin["cout"](o.transpose(1, 2).reshape(b, 1, -1))
            x = torch.cat([x_c, x[b:] + null_outs[i]]) if self.guided else x_c
            x = x + lin["fc2"](F.gelu(lin["fc1"](layer.norm3(x)), approximate="tanh"))
        x = self.norm(x)[:, -1].float()  # (R, D)
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 logits, as in training
            if self.head.weight.dtype == torch.float32:
                return self.head_linear(x)
            return F.linear(x, self.head.weight.float())


# ---- the compiled step -----------------------------------------------------------------------------

# Compiled decoders by id(generator), then by shape; an entry goes when its generator is collected.
_DECODERS: dict[int, dict[tuple, Decoder]] = {}
_compile_failure: str | None = None  # set by the first failure: later requests run eager without retrying
_warned: set[str] = set()
# Whether compile="auto" compiles on CPU (CUDA: always, where launch overhead bounds a step). Off: on the
# `bench` preset (`benchmarks/bench_generator.py --compile`) the compiled step, with frozen packed weights,
# attention as fused reductions and a C++ wrapper, samples 1.1-1.5x faster than eager at batch 1 and
# 1.0-1.2x at batch 4, but compiling a shape takes 20-40 s on 2 cores: more than it saves unless a process
# samples that shape dozens of times. `compile=True` (`parti sample --compile on`) opts in. Figures in
# docs/benchmarks.md.
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
        # frozen compilation also keeps about one copy of the weights in memory for the process.)
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


def _own_code(method):
    """`method` (bound) as a function with a code object of its own. Dynamo keeps compiled graphs and
    their guards on the code object: with one code object for every Decoder, each new decoder (a shape,
    new weights) would add an entry there that outlives it, and the ninth would hit dynamo's recompile
    limit (8), which stops compilation for the process. With one each, the limit is per decoder."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    own.__kwdefaults__, own.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(own, method.__self__)


def _compile(decoder: Decoder, bos: int, *, freeze: bool = False) -> float:
    """Compile `decoder.static_step` and run it until compiled (CUDA graphs record on the second or third
    call); -> seconds taken. The warm-up steps leave the cache dirty: `start` clears it.

    freeze (CPU only): the weights are frozen into the compiled step (inductor's `freezing`): it multiplies
    copies of them packed for MKL's GEMM at the step's row count, as eager's `PackedLinear` does. Those
    copies are a snapshot: `decoder_for` checks `weights_key` and, after a change, compiles unfrozen."""
    cuda = decoder.pos.device.type == "cuda"
    mode = "reduce-overhead" if cuda else None
    decoder.compiled = torch.compile(_own_code(decoder.static_step), mode=mode, fullgraph=True, dynamic=False)
    device = decoder.pos.device
    if cuda:  # CUDA graphs read and write these in place: their addresses must not change between replays
        cache, *rest = decoder.state()
        for t in (*decoder.buffers(), decoder.pos, *cache, *rest):
            torch._dynamo.mark_static_address(t)
    import torch._inductor.config as inductor_config

    # CPU: cpp_wrapper makes the step's kernel calls from C++, not Python (about 10% of a step at 1-4 prompts).
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
