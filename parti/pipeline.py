"""Prompts -> images: the tokenizer, text encoder and generator a checkpoint folder holds, wired up.

A generator run folder is self-contained:
  config.json + model.safetensors   the generator (records the tokenizer fingerprint and text encoder)
  tokenizer/                        a copy of the tokenizer it was trained with
  text_encoder/                     the trainable text encoder (or config.json names the frozen T5)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from parti import text
from parti.compiled import use_compile
from parti.device import SAMPLING_DTYPES, default_device, sampling_dtype
from parti.errors import PartiError
from parti.generator import Generator, load_generator
from parti.hub import is_local_path, resolve_checkpoint
from parti.quantize import load_int8
from parti.sampling import SamplingParams, generate
from parti.settings import check_settings, setting
from parti.speculative import generate_speculative, sjd_window
from parti.tokenizer import VQTokenizer, load_tokenizer


@dataclass
class PipelineOutput:
    images: torch.Tensor  # (P * N, 3, S, S) in [-1, 1], prompt-major
    codes: torch.Tensor | None  # (P * N, g, g) when asked for
    prompts: list[str]  # the prompt of each image


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PartiError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise PartiError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


MAX_IMAGES_PER_CALL = 10_000  # 1.8 GiB of fp32 images at 128 px: a FID sample is made in a few calls


class Pipeline:
    """compile: decode through the compiled step of `parti.compiled` (True, False or "auto": CUDA, and
    CPUs where it measured faster); compiled once per process and batch shape, eager where unavailable."""

    def __init__(self, *, tokenizer: VQTokenizer, generator: Generator, text_encoder, device: torch.device,
                 compile: bool | str = "auto"):
        use_compile(compile, torch.device(device))  # a bad value fails here, not at the first prompt
        self.tokenizer, self.generator, self.text_encoder, self.device = tokenizer, generator, text_encoder, device
        self.compile = compile

    def _check_size(self, n: int) -> None:
        """The images of one call are held together: refuse a call whose result would not fit comfortably."""
        size = self.tokenizer.config.image_size
        need = n * 3 * size * size * 4  # fp32 (n, 3, S, S)
        if n > MAX_IMAGES_PER_CALL:
            raise PartiError(f"num_images_per_prompt x prompts = {n} images ({need / 2**30:.1f} GiB at {size} px) is "
                             f"more than one call makes ({MAX_IMAGES_PER_CALL}); call in parts, with other seeds")

    @torch.no_grad()
    def __call__(self, prompts: list[str] | str, sampling: SamplingParams = SamplingParams(), *,
                 num_images_per_prompt: int = 1, seed: int = 0, batch_size: int = 64,
                 return_codes: bool = False) -> PipelineOutput:
        if not isinstance(prompts, (str, list, tuple)):  # None, a number, a dict, a generator: say so, no TypeError
            raise PartiError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}; "
                             f'call pipe(["a prompt", ...])')
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PartiError("no prompts given; pass at least one prompt")
        odd = [p for p in prompts if not isinstance(p, str)]
        if odd:
            raise PartiError(f"prompts must be strings, got a {type(odd[0]).__name__} among them; convert them to str")
        if not isinstance(return_codes, bool):
            raise PartiError(f"return_codes must be True or False, got {return_codes!r}")
        if not isinstance(sampling, SamplingParams):
            raise PartiError(f"sampling must be a parti.SamplingParams, got {type(sampling).__name__}")
        per_prompt = _positive_int("num_images_per_prompt", num_images_per_prompt)
        batch_size = _positive_int("batch_size", batch_size)
        rows = [p for p in prompts for _ in range(per_prompt)]
        self._check_size(len(rows))
        rng = torch.Generator(device=self.device).manual_seed(_check_seed(seed))
        # Unset, the window is the device's measured choice for eager decoding: not where compiling was asked for.
        auto_plain = sampling.sjd_window is None and use_compile(self.compile, torch.device(self.device))
        codes = []
        for i in tqdm(range(0, len(rows), batch_size), desc="sampling", unit="batch",
                      disable=len(rows) <= batch_size):
            chunk = rows[i:i + batch_size]
            states, mask = self.text_encoder.encode(chunk)
            ctx, ctx_mask = self.generator.encode_condition(states.to(self.device), mask.to(self.device))
            # Speculative Jacobi decoding where the window is over one token: the same distribution, another
            # random stream.
            if sjd_window(sampling, self.generator, len(chunk)) > 1 and not auto_plain:
                codes.append(generate_speculative(self.generator, ctx, ctx_mask, params=sampling, generator=rng).codes)
            else:
                codes.append(generate(self.generator, ctx, ctx_mask, params=sampling, generator=rng,
                                      compile=self.compile))
        g = self.tokenizer.config.grid_size
        codes = torch.cat(codes).reshape(-1, g, g)
        images = torch.cat([self.tokenizer.decode(codes[i:i + batch_size]) for i in range(0, len(codes), batch_size)])
        return PipelineOutput(images=images.clamp(-1, 1), codes=codes if return_codes else None, prompts=rows)


def load_text_encoder_for(folder: Path, data: dict, *, device, text_encoder_path: str | None = None):
    """The text encoder a generator folder's config.json (`data`) records: its own text_encoder/ folder when
    trained jointly; a frozen T5 from `text_encoder_path`, else from where training loaded it (a hub name or a
    local folder), else by its hub name. A frozen T5 must have the fingerprint the generator was trained with."""
    record = data.get("text_encoder") or {}
    if text_encoder_path is not None and not Path(text_encoder_path).expanduser().is_dir():
        raise PartiError(f"--text-encoder-path {text_encoder_path} does not exist; give the folder of the T5 the "
                         f"generator was trained with")
    if record.get("kind") == "trainable":
        if text_encoder_path is not None:
            raise PartiError(f"{folder} was trained with its own text encoder ({folder}/text_encoder); "
                             f"--text-encoder-path is for generators trained with a frozen T5: drop it")
        encoder = text.load_text_encoder(folder / "text_encoder", device=device).eval()
        made = encoder.identity().get("fingerprint")
        if record.get("fingerprint") not in (None, made):
            raise PartiError(f"{folder}/text_encoder is not the text encoder the generator was trained with "
                             f"({made} != {record.get('fingerprint')}); use the run's own text_encoder/ folder")
        return encoder
    source = data.get("text_encoder_source") or record.get("source")
    if text_encoder_path is None and source and is_local_path(source) and not Path(source).expanduser().is_dir():
        raise PartiError(f"{folder} was trained with the T5 in folder {source}, which is not here; pass "
                         f"--text-encoder-path (text_encoder_path=) with that T5's folder")
    name = text_encoder_path or source or record.get("name")
    encoder = text.load_t5(name, max_length=record.get("max_length", text.MAX_TEXT_TOKENS), device=device)
    if encoder.identity().get("fingerprint") != record.get("fingerprint"):
        raise PartiError(f"T5 {name!r} is not the one the generator was trained with (its fingerprint differs); "
                         f"pass --text-encoder-path with the original's folder")
    return encoder


def as_sampling_dtype(generator: Generator, dtype: torch.dtype) -> Generator:
    """Cast the generator's blocks (so its KV cache) to `dtype`, keeping the output head fp32: logits are
    computed in fp32 anyway, and an fp32 head spares a per-step cast of its (dim x codes) weight."""
    generator = generator.to(dtype)
    generator.head.float()
    return generator


def load_pipeline(folder: str | Path, *, device: str | torch.device | None = None,
                  text_encoder_path: str | None = None, dtype: str = "auto",
                  compile: bool | str = "auto", revision: str | None = None) -> Pipeline:
    """Everything needed to go from prompts to images, from a generator folder alone.

    dtype: the generator's weights for sampling ("auto", "fp32", "bf16", "int8"; see `sampling_dtype`). Logits
    are fp32 either way; the tokenizer and text encoder stay fp32. compile: see `Pipeline`.
    """
    folder = resolve_checkpoint(folder, revision=revision)  # a Hub repo id 'user/name[@rev]' -> its cached folder
    device = default_device(device)
    weights = sampling_dtype(dtype, device)
    generator, data = load_generator(folder, device=device)
    generator = as_sampling_dtype(generator, weights)
    if dtype == "int8":  # int8 decoder linears, refused when its logits stray from fp32's
        generator = load_int8(generator)
    tokenizer = load_tokenizer(folder / "tokenizer", device=device)
    if tokenizer.fingerprint() != data.get("tokenizer_fingerprint"):
        raise PartiError(f"{folder}/tokenizer is not the tokenizer the generator was trained with "
                         f"({tokenizer.fingerprint()} != {data.get('tokenizer_fingerprint')})")
    encoder = load_text_encoder_for(folder, data, device=device,
                                    text_encoder_path=text_encoder_path)
    return Pipeline(tokenizer=tokenizer, generator=generator, text_encoder=encoder, device=device,
                    compile=compile)


COMPILE_MODES = {"auto": "auto", "on": True, "off": False}  # LoadOptions.compile -> load_pipeline(compile=)


@dataclass
class LoadOptions:
    """How a command loads a generator folder (`parti sample`, `parti serve`): the arguments of
    `load_pipeline`, declared once; `compile` is spelled for the command line (COMPILE_MODES)."""

    checkpoint: str | None = setting(None, "generator run folder, or Hub repo id user/name[@revision]", required=True)
    revision: str | None = setting(None, "Hub revision (branch, tag or commit) of a repo id --checkpoint (default: "
                                   "its @revision, else main)")
    device: str | None = setting(None, "cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    dtype: str = setting("auto", "generator weights while sampling (auto: bf16 on GPUs that have it, else fp32; "
                         "int8: CPU, the decoder's linears int8, refused when its logits stray from fp32's)",
                         choices=SAMPLING_DTYPES)
    compile: str = setting("auto", "decode through the compiled step (auto: on GPUs; on a CPU, 'on' compiles once "
                           "per batch shape, tens of seconds, then samples faster)", choices=tuple(COMPILE_MODES))
    text_encoder_path: str | None = setting(None, "local copy of the frozen T5 the generator was trained with")

    def __post_init__(self):
        check_settings(self)


@dataclass
class SampleConfig:
    """`parti sample`: a grid of `num_images` images for each prompt, from the generator `load` names."""

    load: LoadOptions
    prompts: tuple[str, ...] = setting((), "a prompt (repeat for several)", flag="--prompt")
    num_images: int = setting(4, "images per prompt")  # bounded by the pipeline (MAX_IMAGES_PER_CALL)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = setting(0, "sampling seed")
    out: str = setting("images/samples.png", "the grid's image file (.png, .jpg, .webp)")

    def __post_init__(self):
        check_settings(self)
        if not self.prompts:
            raise PartiError('no prompts given; pass --prompt "..." (repeatable)')
