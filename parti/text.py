"""Text encoders: `captions -> (embeddings (B, L, D), mask (B, L))`, behind one small interface.

Two kinds, chosen by `build_text_encoder(spec)`:
- `FrozenT5`: a pretrained T5 encoder (Imagen/LlamaGen style), frozen, run once and cached on disk.
  Loaded only by the explicit `load_t5` call; nothing downloads at import or in a constructor.
- `TrainableTextEncoder`: a small randomly initialised T5-style encoder trained jointly with the
  generator, as the Parti paper does, with a byte tokenizer or a sentencepiece model trained on the
  dataset's captions. Saved as a self-describing folder (config.json + model.safetensors [+ spm.model]).

Text is bounded before it is tokenized: cut to MAX_TEXT_BYTES UTF-8 bytes (`clip_text`), so a 50 MB prompt
costs what a long one does; then both tokenizers truncate to `max_length` keeping the final eos, and say how
many prompts they cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from parti.checkpoint import (
    CONFIG_NAME,
    SPM_NAME,
    check_folder,
    config_from_dict,
    fingerprint_state,
    load_model_weights,
    save_model,
)
from parti.errors import PartiError
from parti.files import atomic_write, read_bytes
from parti.hub import is_local_path
from parti.validate import check_model_config, divides, values_of

T5_ALIASES = {f"t5-{s}": f"google-t5/t5-{s}" for s in ("small", "base", "large", "3b", "11b")}
KIND = "text_encoder"

MAX_TEXT_TOKENS = 128  # tokens kept of a caption or prompt, by default (T5 and the trainable encoder)
# Bytes kept of a caption or prompt before tokenizing: 64 bytes a token at the default length, far more than
# any tokenizer here needs (1 for bytes, ~4 for T5 and sentencepiece), and a bound on what one text costs.
MAX_TEXT_BYTES = 8192


class TruncationWarning(UserWarning):
    """Some prompts were longer than `max_length` tokens and were cut."""


@runtime_checkable
class TextEncoder(Protocol):
    """What the generator and the caches need from any text encoder."""

    dim: int  # D, width of the embeddings
    max_length: int  # L never exceeds this
    trainable: bool  # False: run once and cache; True: train with the generator

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Embeddings (B, L, D) float, zero at padding, and mask (B, L) bool, True at real tokens."""
        ...

    def identity(self) -> dict[str, Any]:
        """A stable JSON-able description (name, fingerprint, ...) recorded in caches and checkpoints."""
        ...


# ----------------------------------------------------------------------------------------------------
# shared padding / truncation


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str):
        raise PartiError("encode takes a list of prompts, not a single string; wrap it as [prompt]")
    if len(texts) == 0:
        raise PartiError("encode needs at least one prompt; got an empty list")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise PartiError(f"prompts must be strings, got {bad[0]}; convert captions to str first")


def clip_text(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, at a character boundary. A character takes at most 4 bytes,
    so the string is cut to `limit` characters first: the cost never depends on the length given."""
    if len(text) <= limit // 4:
        return text
    data = text[:limit].encode("utf-8", errors="surrogatepass")
    return text if len(data) <= limit and len(text) <= limit else data[:limit].decode("utf-8", errors="ignore")


def _clip_all(texts: list[str]) -> tuple[list[str], set[int]]:
    """Each text cut to MAX_TEXT_BYTES before tokenizing, and the indices of those that were cut."""
    clipped = [clip_text(t) for t in texts]
    return clipped, {i for i, (a, b) in enumerate(zip(texts, clipped)) if a is not b}


def _pad_and_truncate(seqs: list[list[int]], *, max_length: int, pad_id: int, eos_id: int,
                      clipped: set[int] = frozenset()) -> tuple[Tensor, Tensor]:
    """Right-pad token lists to the longest (<= max_length); cut longer ones keeping their final eos. `clipped`:
    the texts already cut to their byte bound (counted as cut too)."""
    cut = 0
    out = []
    for i, seq in enumerate(seqs):
        seq = list(seq) or [eos_id]  # at least one real token, even for a tokenizer that adds no eos
        if len(seq) > max_length or i in clipped:
            cut += 1
        if len(seq) > max_length:
            seq = seq[: max_length - 1] + [eos_id] if seq[-1] == eos_id else seq[:max_length]
        out.append(seq)
    if cut:
        warnings.warn(f"{cut} of {len(seqs)} prompts were longer than {max_length} tokens and were truncated",
                      TruncationWarning, stacklevel=3)
    length = max(len(s) for s in out)
    ids = torch.full((len(out), length), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(out), length), dtype=torch.bool)  # (B, L)
    for i, seq in enumerate(out):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = True
    return ids, mask


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise PartiError(f"max_length must be an integer >= 2 (room for a token and eos), got {max_length!r}")


# ----------------------------------------------------------------------------------------------------
# frozen pretrained T5


class FrozenT5:
    """A pretrained T5 encoder with its tokenizer; eval mode, no gradients. Build it with `load_t5`."""

    trainable = False

    def __init__(self, *, name: str, model: nn.Module, tokenizer: Any, max_length: int):
        _check_max_length(max_length)
        self.name, self.model, self.tokenizer, self.max_length = name, model, tokenizer, max_length
        self.model.eval().requires_grad_(False)
        self.dim = int(model.config.d_model)
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        _check_texts(texts)
        # Cut to the byte bound, tokenize (untruncated, to count what gets cut), then cut to max_length ourselves
        # (keeping eos) and warn once.
        texts, clipped = _clip_all(list(texts))
        seqs = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        ids, mask = _pad_and_truncate(seqs, max_length=self.max_length, pad_id=self.tokenizer.pad_token_id,
                                      eos_id=self.tokenizer.eos_token_id, clipped=clipped)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        # Padding outputs are meaningless; zero them so cached embeddings do not depend on batching.
        return states * mask[..., None].to(states.dtype), mask

    def identity(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = _t5_fingerprint(self.model, self.tokenizer)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"kind": "t5", "name": self.name, "fingerprint": self._fingerprint, "dim": self.dim,
                "max_length": self.max_length, "dtype": dtype}


def _dtype_argument(dtype: Any) -> dict[str, Any]:
    """from_pretrained's precision argument: `dtype` from transformers 4.56 on, `torch_dtype` before (Colab's
    2025.07 runtime has 4.53, which refuses `dtype` with a TypeError)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _t5_fingerprint(model: nn.Module, tokenizer: Any) -> str:
    """Hash of architecture, vocabulary and a strided sample (<= 4096 values) of every weight tensor.

    Hashing all of t5-large (~1.3 GB) takes seconds; a sample of every tensor still tells apart any two
    real checkpoints (or a fine-tune) while costing milliseconds. The dtype is recorded beside it.
    """
    h = hashlib.sha256()
    cfg = model.config
    arch = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj",
            "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")
    h.update(repr([(k, getattr(cfg, k, None)) for k in arch]).encode())
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().contiguous()
        h.update(name.encode() + repr(tuple(t.shape)).encode() + sample.numpy().tobytes())
    return h.hexdigest()[:16]


def load_t5(name_or_path: str = "google-t5/t5-large", *, max_length: int = MAX_TEXT_TOKENS, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, local_files_only: bool | None = None) -> FrozenT5:
    """Load a frozen T5 encoder from a local folder or a hub name ("t5-large" means "google-t5/t5-large").

    Only safetensors weights are read. Use float32 or bfloat16: T5 is known to overflow in float16.
    `local_files_only=None` means: True for a local folder, otherwise whatever the hub's offline mode says.
    """
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel  # heavy import, only when loading

    _check_max_length(max_length)
    if name_or_path == "trainable":  # a generator whose record of its own text encoder was deleted: not a T5
        raise PartiError("the generator's config.json does not record its text encoder (its 'text_encoder' entry "
                         "is missing: it was trained with its own, in text_encoder/); restore config.json, or "
                         "export the run again with --resume")
    if not isinstance(name_or_path, str) or not name_or_path:
        raise PartiError(f"no T5 named (got {name_or_path!r}): the generator's config.json does not record its text "
                         "encoder; pass the T5 it was trained with (--text-encoder-path PATH)")
    path = Path(name_or_path).expanduser()
    is_local = path.is_dir()
    if not is_local and is_local_path(name_or_path):
        raise PartiError(f"T5 folder {name_or_path} does not exist; pass a folder holding config.json, "
                         "model.safetensors and the tokenizer files")
    name = str(path) if is_local else T5_ALIASES.get(name_or_path, name_or_path)
    # identity() records the folder's name only: machine paths stay out of caches and checkpoints.
    label = path.resolve().name if is_local else name
    if is_local and not (path / CONFIG_NAME).is_file():
        raise PartiError(f"could not load T5 from folder {path}: it holds no config.json; pass a folder holding "
                         f"config.json, model.safetensors and the tokenizer files")
    local_only = is_local if local_files_only is None else local_files_only
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
        if config.model_type != "t5":
            raise PartiError(f"{name_or_path} holds a {config.model_type!r} model, not T5; pass a T5 checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = T5EncoderModel.from_pretrained(name, local_files_only=local_only, use_safetensors=True,
                                               **_dtype_argument(dtype))
    except PartiError:
        raise
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = f"from folder {name}: {reason}" if is_local else f"{name_or_path!r} (no such folder here; offline?)"
        raise PartiError(f"could not load T5 {where}; pass a local folder with --text-encoder PATH") from e
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise PartiError(f"the tokenizer of {name_or_path} has no pad or eos token; is this a T5 tokenizer?")
    if len(tokenizer) > config.vocab_size:
        raise PartiError(f"the tokenizer of {name_or_path} has {len(tokenizer)} tokens but the model only "
                         f"{config.vocab_size}; tokenizer and weights do not belong together")
    return FrozenT5(name=label, model=model.to(device), tokenizer=tokenizer, max_length=max_length)


# ----------------------------------------------------------------------------------------------------
# tokenizers for the trainable encoder (pad = 0, eos = 1 in both)


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: id 0 = pad, 1 = eos, 2 + b = byte b. Needs no training, handles any text."""

    kind = "bytes"
    pad_id, eos_id = 0, 1
    vocab_size = 2 + 256

    def __init__(self, *, max_length: int = MAX_TEXT_TOKENS):
        _check_max_length(max_length)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """ids (B, L) long and mask (B, L) bool, padded to the longest prompt, each ending in eos."""
        _check_texts(texts)
        texts, clipped = _clip_all(list(texts))
        seqs = [[b + 2 for b in t.encode("utf-8", errors="replace")] + [self.eos_id] for t in texts]
        return _pad_and_truncate(seqs, max_length=self.max_length, pad_id=self.pad_id, eos_id=self.eos_id,
                                 clipped=clipped)

    def decode(self, ids: list[int] | Tensor) -> str:
        data = bytes(i - 2 for i in _as_list(ids) if i >= 2)
        return data.decode("utf-8", errors="replace")  # a cut may split a multi-byte character

    def fingerprint(self) -> str:
        return "bytes"


class SentencePieceTokenizer:
    """A sentencepiece model (ours: BPE, lower-cased, byte fallback; pad 0, eos 1, unk 2)."""

    kind = "sentencepiece"
    pad_id, eos_id = 0, 1

    def __init__(self, model_path: str | Path, *, max_length: int = MAX_TEXT_TOKENS):
        path = Path(model_path)
        if not os.path.lexists(path):
            raise PartiError(f"sentencepiece model {path} not found; train one with train_sentencepiece")
        proto = read_bytes(path, limit=1 << 28, what="sentencepiece model")  # a regular file: no FIFO, no /dev/zero
        self._init(proto, max_length=max_length, what=str(path))

    @classmethod
    def from_proto(cls, proto: bytes, *, max_length: int = MAX_TEXT_TOKENS) -> SentencePieceTokenizer:
        """Build from the serialized model (as `train_sentencepiece` writes it), without a file."""
        self = cls.__new__(cls)
        self._init(proto, max_length=max_length, what="sentencepiece model")
        return self

    def _init(self, proto: bytes, *, max_length: int, what: str) -> None:
        import sentencepiece as spm

        _check_max_length(max_length)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise PartiError(f"{what} is not a readable sentencepiece model ({e}); retrain it") from None
        if self.sp.pad_id() != self.pad_id or self.sp.eos_id() != self.eos_id:
            raise PartiError(f"{what} must have pad id 0 and eos id 1 (got {self.sp.pad_id()}, {self.sp.eos_id()}); "
                             "train it with train_sentencepiece")
        self.proto, self.max_length = proto, max_length
        self.vocab_size = self.sp.get_piece_size()

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """ids (B, L) long and mask (B, L) bool, padded to the longest prompt, each ending in eos."""
        _check_texts(texts)
        texts, clipped = _clip_all(list(texts))
        seqs = [ids + [self.eos_id] for ids in self.sp.encode(texts)]  # "" -> [eos]
        return _pad_and_truncate(seqs, max_length=self.max_length, pad_id=self.pad_id, eos_id=self.eos_id,
                                 clipped=clipped)

    def decode(self, ids: list[int] | Tensor) -> str:
        return self.sp.decode([i for i in _as_list(ids) if i not in (self.pad_id, self.eos_id)])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()[:16]


def _as_list(ids: list[int] | Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def _train_spm_proto(captions: Iterable[str], *, vocab_size: int, phrases: bool = False) -> bytes:
    """Train a BPE sentencepiece model in memory on `captions`; same captions -> same bytes.

    BPE, not T5's unigram: on a small caption vocabulary (the synthetic faces' 44 words) unigram keeps
    few pieces and splits most words into letters ("red" -> "_", "re", "d"; 34 tokens a caption against
    BPE's 17), which costs the text encoder and the cross-attention twice the tokens.

    phrases=True lets a piece span words ("▁no▁hat", "▁light▁skin"): frequent phrases become one token
    (10 tokens a synthetic caption instead of 17), and so does a negation, which a one-layer encoder
    otherwise has to bind to the next word ("glasses and no hat" vs "no glasses and a hat").
    """
    import sentencepiece as spm

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 3 < vocab_size <= 1_000_000:
        raise PartiError(f"vocab_size must be an integer in [4, 1000000] (pad, eos and unk take 3), got {vocab_size!r}")
    lines = [c for c in captions if isinstance(c, str) and c.strip()]
    if not lines:
        raise PartiError("train_sentencepiece needs non-empty captions; check the dataset's caption files")
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # T5's layout; no bos
            byte_fallback=True,  # emoji and rare characters become bytes instead of <unk>
            character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf",  # NFKC + lower-case
            hard_vocab_limit=False,  # a small caption set may support fewer pieces than asked: fine
            split_by_whitespace=not phrases, minloglevel=2)
    except RuntimeError as e:  # sentencepiece's messages: "INTERNAL: file.cc(827) [check] reason"
        lines = (str(e).split("] ", 1)[-1].strip() or str(e).strip()).splitlines()
        reason = lines[0] if lines else type(e).__name__
        if "all_chars_count" in str(e):  # every caption is empty once normalised (zero-width characters, ...)
            raise PartiError("train_sentencepiece needs non-empty captions; these hold no characters once "
                             "normalised: check the dataset's caption files") from None
        raise PartiError(f"could not train sentencepiece with vocab_size={vocab_size}: {reason}") from None
    return buf.getvalue()


def train_sentencepiece(captions: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1000,
                        phrases: bool = False) -> Path:
    """Train on `captions` and write out_dir/spm.model; returns its path. Vocab may end up smaller.
    phrases=True: pieces may span words (see `_train_spm_proto`)."""
    proto = _train_spm_proto(captions, vocab_size=vocab_size, phrases=phrases)
    path = Path(out_dir) / SPM_NAME
    _write_bytes(path, proto)
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic write: a reader never sees half a file."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ----------------------------------------------------------------------------------------------------
# trainable encoder


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    tokenizer: str = "bytes"  # "bytes" | "sentencepiece"
    vocab_size: int = ByteTokenizer.vocab_size  # must equal the tokenizer's vocabulary
    d_model: int = 256
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 1024
    max_length: int = MAX_TEXT_TOKENS
    dropout: float = 0.0


    # field -> (low, high) inclusive; a float range given as (low, high, "open") excludes `high` (parti.validate).
    BOUNDS: ClassVar[dict[str, tuple]] = {
        "vocab_size": (3, 1_000_000), "d_model": (1, 16384), "num_layers": (1, 256), "num_heads": (1, 256),
        "d_ff": (1, 65536), "max_length": (2, 8192), "dropout": (0.0, 1.0, "open"),
    }

    def __post_init__(self):
        if self.tokenizer not in ("bytes", "sentencepiece"):
            raise PartiError(f"text encoder tokenizer must be 'bytes' or 'sentencepiece', got {self.tokenizer!r}")
        check_model_config(type(self), dataclasses.asdict(self), what="text encoder config")

    @staticmethod
    def relations(v: dict[str, Any], *, what: str) -> int:
        """Check the fields' relations in `v` (defaults where missing); return the estimated parameter count."""
        width, heads, layers, d_ff, vocab = values_of(v, TextEncoderConfig, "d_model", "num_heads", "num_layers",
                                                      "d_ff", "vocab_size")
        divides(what, "num_heads", heads, "d_model", width)
        return vocab * width + layers * (4 * width * width + 3 * width * d_ff)  # gated-GELU: two input projections


TEXT_ENCODER_PRESETS: dict[str, TextEncoderConfig] = {
    "tiny": TextEncoderConfig(d_model=64, num_layers=1, num_heads=2, d_ff=128),  # CPU tests
    "small": TextEncoderConfig(d_model=256, num_layers=2, num_heads=4, d_ff=1024),  # FFHQ default
    "base": TextEncoderConfig(d_model=512, num_layers=4, num_heads=8, d_ff=2048),
}


class TrainableTextEncoder(nn.Module):
    """A randomly initialised T5-style encoder (relative positions, gated-GELU), trained with the generator."""

    trainable = True

    def __init__(self, config: TextEncoderConfig, *, tokenizer: ByteTokenizer | SentencePieceTokenizer | None = None):
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        if tokenizer is None:
            if config.tokenizer != "bytes":
                raise PartiError("a sentencepiece text encoder needs its tokenizer; train one with train_sentencepiece")
            tokenizer = ByteTokenizer(max_length=config.max_length)
        if tokenizer.kind != config.tokenizer or tokenizer.vocab_size != config.vocab_size:
            raise PartiError(f"tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} tokens) does not match the config "
                             f"({config.tokenizer}, vocab_size {config.vocab_size}); set vocab_size to match")
        if tokenizer.max_length != config.max_length:
            raise PartiError(f"tokenizer max_length {tokenizer.max_length} != config max_length {config.max_length}")
        self.config, self.tokenizer = config, tokenizer
        self.dim, self.max_length = config.d_model, config.max_length
        t5 = T5Config(vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_model // config.num_heads,
                      d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
                      dropout_rate=config.dropout, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_id,
                      eos_token_id=tokenizer.eos_id, is_encoder_decoder=False, use_cache=False)
        self.t5 = T5EncoderModel(t5)  # random init, nothing downloaded

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids (B, L) long, mask (B, L) bool -> states (B, L, D), zero at padding."""
        states = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids, mask) on this module's device; cache these for training instead of the strings."""
        ids, mask = self.tokenizer(texts)
        device = self.t5.shared.weight.device
        return ids.to(device), mask.to(device)

    def encode_ids(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Same result as `encode` from already tokenized prompts: (states (B, L, D), mask (B, L))."""
        device = self.t5.shared.weight.device
        ids, mask = ids.to(device), mask.to(device=device, dtype=torch.bool)
        return self(ids, mask), mask

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        # Gradients flow (this encoder trains); wrap in torch.no_grad() at inference.
        return self.encode_ids(*self.tokenize(texts))

    def identity(self) -> dict[str, Any]:
        weights = fingerprint_state(self.state_dict())
        fp = hashlib.sha256(f"{weights}:{self.tokenizer.fingerprint()}".encode()).hexdigest()[:16]
        return {"kind": "trainable", "name": f"trainable-{self.config.tokenizer}", "fingerprint": fp,
                "dim": self.dim, "max_length": self.max_length}


def save_text_encoder(encoder: TrainableTextEncoder, folder: str | Path) -> Path:
    """Write folder/{spm.model (sentencepiece only), model.safetensors, config.json}; config last."""
    folder = Path(folder)
    tok = encoder.tokenizer
    if isinstance(tok, SentencePieceTokenizer):
        _write_bytes(folder / SPM_NAME, tok.proto)
    return save_model(folder, KIND, encoder.config, encoder, extra={"tokenizer_fingerprint": tok.fingerprint()})


def load_text_encoder(folder: str | Path, *, device: str | torch.device = "cpu") -> TrainableTextEncoder:
    """Load what `save_text_encoder` wrote, strictly: unknown keys, missing files or mismatches are errors."""
    folder = Path(folder)
    data = check_folder(folder, KIND)  # unknown top-level keys and a non-object "config" are refused there
    config = config_from_dict(TextEncoderConfig, data["config"], what=f"{folder}/config.json")
    if config.tokenizer == "sentencepiece":
        tok = SentencePieceTokenizer(folder / SPM_NAME, max_length=config.max_length)
    else:
        tok = ByteTokenizer(max_length=config.max_length)
    if data.get("tokenizer_fingerprint") != tok.fingerprint():
        raise PartiError(f"{folder}: the tokenizer does not match the one the encoder was saved with; "
                         f"restore the original {SPM_NAME}")
    encoder = load_model_weights(folder, lambda: TrainableTextEncoder(config, tokenizer=tok),
                                 fingerprint=data.get("fingerprint"))
    return encoder.to(device)


# ----------------------------------------------------------------------------------------------------
# one entry point


def build_text_encoder(spec: str = "trainable", *, captions: Iterable[str] | None = None,
                       out_dir: str | Path | None = None, config: TextEncoderConfig | None = None,
                       max_length: int | None = None, phrases: bool = False,
                       device: str | torch.device = "cpu") -> TextEncoder:
    """"trainable" -> a fresh TrainableTextEncoder; anything else ("t5-large", hub name, folder) -> load_t5.

    Trainable: with `config=None` the "small" preset is used, with a sentencepiece tokenizer trained on
    `captions` when given (written to out_dir/spm.model when `out_dir` is given), else bytes. A given
    sentencepiece `config` trains on `captions` with its vocab_size; the config then records the vocabulary
    actually learned. `max_length` defaults to MAX_TEXT_TOKENS or the config's. phrases=True: sentencepiece pieces may
    span words (see `_train_spm_proto`).
    """
    if spec != "trainable":
        return load_t5(spec, max_length=MAX_TEXT_TOKENS if max_length is None else max_length, device=device)
    if config is None:
        kind = "sentencepiece" if captions is not None else "bytes"
        config = dataclasses.replace(TEXT_ENCODER_PRESETS["small"], tokenizer=kind,
                                     vocab_size=1000 if kind == "sentencepiece" else ByteTokenizer.vocab_size,
                                     max_length=MAX_TEXT_TOKENS if max_length is None else max_length)
    elif max_length is not None and max_length != config.max_length:
        raise PartiError(f"max_length {max_length} contradicts config.max_length {config.max_length}; give one")
    if config.tokenizer == "bytes":
        return TrainableTextEncoder(config, tokenizer=ByteTokenizer(max_length=config.max_length)).to(device)
    if captions is None:
        raise PartiError("a sentencepiece text encoder is trained on the dataset's captions; pass captions")
    proto = _train_spm_proto(captions, vocab_size=config.vocab_size, phrases=phrases)
    if out_dir is not None:
        _write_bytes(Path(out_dir) / SPM_NAME, proto)
    tok = SentencePieceTokenizer.from_proto(proto, max_length=config.max_length)
    config = dataclasses.replace(config, vocab_size=tok.vocab_size)
    return TrainableTextEncoder(config, tokenizer=tok).to(device)
