"""Prompts -> images: the tokenizer, text encoder and generator a checkpoint folder holds, wired up.

A generator run folder is self-contained:
  config.json + model.safetensors   the generator (records the tokenizer fingerprint and text encoder)
  tokenizer/                        a copy of the tokenizer it was trained with
  text_encoder/                     the trainable text encoder (or config.json names the frozen T5)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from parti.errors import PartiError
from parti.generator import Generator, load_generator
from parti.hub import resolve_checkpoint
from parti.sampling import SamplingParams, generate
from parti.tokenizer import VQTokenizer, load_tokenizer


@dataclass
class PipelineOutput:
    images: torch.Tensor  # (P * N, 3, S, S) in [-1, 1], prompt-major
    codes: torch.Tensor | None  # (P * N, g, g) when asked for
    prompts: list[str]  # the prompt of each image


class Pipeline:
    def __init__(self, *, tokenizer: VQTokenizer, generator: Generator, text_encoder, device: torch.device):
        self.tokenizer, self.generator, self.text_encoder, self.device = tokenizer, generator, text_encoder, device

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, sampling: SamplingParams = SamplingParams(), *,
                 num_images_per_prompt: int = 1, seed: int = 0, batch_size: int = 64,
                 return_codes: bool = False) -> PipelineOutput:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PartiError("no prompts given; pass at least one prompt")
        if num_images_per_prompt < 1:
            raise PartiError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        params = sampling
        rows = [p for p in prompts for _ in range(num_images_per_prompt)]
        rng = torch.Generator(device=self.device).manual_seed(seed)
        codes = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            states, mask = self.text_encoder.encode(chunk)
            ctx, ctx_mask = self.generator.encode_condition(states.to(self.device), mask.to(self.device))
            codes.append(generate(self.generator, ctx, ctx_mask, params=params, generator=rng))
        g = self.tokenizer.config.grid_size
        codes = torch.cat(codes).reshape(-1, g, g)
        images = torch.cat([self.tokenizer.decode(codes[i:i + batch_size]) for i in range(0, len(codes), batch_size)])
        return PipelineOutput(images=images.clamp(-1, 1), codes=codes if return_codes else None, prompts=rows)


def load_text_encoder_for(folder: Path, record: dict, *, device, text_encoder_path: str | None = None):
    from parti import text

    if record.get("kind") == "trainable":
        encoder = text.load_text_encoder(folder / "text_encoder", device=device).eval()
        made = encoder.identity().get("fingerprint")
        if record.get("fingerprint") not in (None, made):
            raise PartiError(f"{folder}/text_encoder is not the text encoder the generator was trained with "
                             f"({made} != {record.get('fingerprint')}); use the run's own text_encoder/ folder")
        return encoder
    name = text_encoder_path or record.get("source") or record.get("name")
    encoder = text.load_t5(name, max_length=record.get("max_length", 128), device=device)
    if text_encoder_path is None and encoder.identity().get("fingerprint") != record.get("fingerprint"):
        raise PartiError(f"T5 {name!r} differs from the one the generator was trained with; pass the original")
    return encoder


SAMPLING_DTYPES = ("auto", "fp32", "bf16")


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """The generator's weight (and so KV cache) dtype for sampling. auto: bf16 on a CUDA device that has
    it, else fp32. bf16 halves the bytes each decoding step reads (weights and cache), which bound
    sampling at small batches; on CPUs with AMX it is also faster arithmetic (docs/benchmarks.md)."""
    if name not in SAMPLING_DTYPES:
        raise PartiError(f"dtype must be one of {', '.join(SAMPLING_DTYPES)}; got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def as_sampling_dtype(generator: Generator, dtype: torch.dtype) -> Generator:
    """Cast the generator's blocks (so its KV cache) to `dtype`, keeping the output head fp32: logits are
    computed in fp32 anyway, and an fp32 head spares a per-step cast of its (dim x codes) weight."""
    generator = generator.to(dtype)
    generator.head.float()
    return generator


def load_pipeline(folder: str | Path, *, device: str | torch.device | None = None,
                  text_encoder_path: str | None = None, dtype: str = "auto", revision: str | None = None) -> Pipeline:
    """Everything needed to go from prompts to images, from a generator folder alone.

    dtype: the generator's weights for sampling ("auto", "fp32", "bf16"; see `sampling_dtype`). Logits
    are fp32 either way; the tokenizer and text encoder stay fp32.
    """
    folder = resolve_checkpoint(folder, revision=revision)  # a Hub repo id 'user/name[@rev]' -> its cached folder
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = sampling_dtype(dtype, device)
    generator, data = load_generator(folder, device=device)
    generator = as_sampling_dtype(generator, weights)
    tokenizer = load_tokenizer(folder / "tokenizer", device=device)
    if tokenizer.fingerprint() != data.get("tokenizer_fingerprint"):
        raise PartiError(f"{folder}/tokenizer is not the tokenizer the generator was trained with "
                         f"({tokenizer.fingerprint()} != {data.get('tokenizer_fingerprint')})")
    encoder = load_text_encoder_for(folder, data.get("text_encoder") or {}, device=device,
                                    text_encoder_path=text_encoder_path)
    return Pipeline(tokenizer=tokenizer, generator=generator, text_encoder=encoder, device=device)


def check_tokenizer(generator_folder: str | Path, tokenizer: VQTokenizer) -> None:
    """Refuse to pair a generator with a tokenizer other than its own."""
    _, data = load_generator(generator_folder)
    if data.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        raise PartiError(f"generator {generator_folder} was trained with tokenizer {data.get('tokenizer_fingerprint')}, "
                         f"not {tokenizer.fingerprint()}; use its own tokenizer/ folder")
