"""The sampler's fast path: one KV-cached decoding step of a `Generator` (the eager step, and the
static-shape form of it that `parti.compiled` compiles).

A `Decoder` is built from a generator for a fixed number of prompts (and text length). It holds what
decoding needs beside the weights, so the model itself stays a plain teacher-forcing network:
  - the KV cache, pre-allocated at full length: depth x (k, v), each (rows, H, T, head_dim);
  - the text's cross-attention keys/values, computed once per prompt: (depth, B, H, L, head_dim);
  - with guidance, the null rows' cross-attention output, a constant per layer (`null_cross_outputs`),
    so only the B conditional rows of the 2B attend to text;
  - on CPU (eager), copies of the linear weights packed for the row count (`PackedLinear`).
`Decoder.step(token, pos)` runs one token per row through the network: (rows, 1) -> logits (rows, K).

With `static=True` every step has the same shapes (attention over the whole cache with positions after
`pos` masked, `pos` a tensor): attention at one query is written as reductions (`_attend`) that a compiler
fuses into one loop (the values cached (rows, H, d, T), contiguous along the sum); on CPU from
`FILLED_ATTENTION_ROWS` rows the self-attention is instead SDPA over the filled part of the cache
(`filled_sdpa`). Run eager, the static step gives the eager step's logits; compiling it, the compiled
decoders' caches and the choice between eager and compiled (`decoder_for`) are `parti.compiled`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parti.generator import Generator

# fp32 packs from 2 rows (batch 1 with guidance): there MKL's plain GEMM is slower than its packed one
# with AVX2 kernels, and packing (a copy of the weights per `generate` call) still pays end to end with
# AMX's. At 1 row both stream the weights equally fast, so the copy would not pay. bf16 packs at any row
# count: there the packed product is the one that reads the weights at full bandwidth (see
# docs/benchmarks.md, "Figures behind the code's design choices").
MIN_PACKED_ROWS = 2


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


# From this many rows the static CPU step's self-attention reads only the filled part of the cache
# (`filled_sdpa`; compiled, through a custom op opaque to the compiler): faster than the fused loop over the
# whole cache at 8 rows (batch 4 with guidance), slower at 2 (see docs/benchmarks.md, "Figures behind the
# decoding step's design choices").
FILLED_ATTENTION_ROWS = 8


def filled_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """SDPA of q (R, H, 1, d) over the first pos + 1 positions of the cache k, v (R, H, T, d), the filled
    length read at run time (`pos.item()`). `parti.compiled` wraps it in a custom op for compiled steps."""
    n = int(pos.item()) + 1
    return F.scaled_dot_product_attention(q, k.narrow(2, 0, n), v.narrow(2, 0, n))


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
        # static, CPU, many rows: self-attention over the filled cache only, through `filled_attention`
        # (`filled_sdpa`; `parti.compiled` sets its custom op here before compiling).
        self.filled = static and p.device.type == "cpu" and self.rows >= FILLED_ATTENTION_ROWS
        self.filled_attention = filled_sdpa
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
        # the compiled step's sum over positions reads them contiguously (faster on CPU than (.., T, d): see
        # docs/benchmarks.md, "Figures behind the code's design choices").
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
        # Set by `parti.compiled` on the decoders it compiles; None on eager ones.
        self.compiled = None  # the compiled `static_step`, which `step` then calls
        self.compile_s: float | None = None  # seconds the first compiled steps took (compilation)
        self.weights_key: tuple | None = None  # with frozen weights: the weights' key when compiled

    @staticmethod
    def _linear(m: nn.Module, rows: int, packed: bool):
        # Plain float linears only: others (int8 ones, `parti.quantize`) bring their own kernels.
        return PackedLinear(m, rows) if packed and type(m) is nn.Linear else m

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
        layer, cheaper than a call of SDPA's CPU kernel at one query (see docs/benchmarks.md, "Figures
        behind the decoding step's design choices")."""
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
                o = self.filled_attention(q, k_cache, v_cache, pos)
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
