"""Evaluation: is the tokenizer faithful, and do the generated images follow the text?

- `evaluate_tokenizer`: PSNR, SSIM, LPIPS (VGG), rFID and codebook usage/perplexity on held-out images;
- `evaluate_generator`: validation loss/perplexity (teacher-forced), FID against held-out images, CLIP
  score, and on the synthetic faces `attribute_accuracy`;
- `attribute_accuracy`: generate for prompts built from attributes, read the attributes back from the
  pixels (`parti.synthetic.read_attributes`), score the ones each prompt names; cheap enough on CPU.

Results are flat dicts with dotted keys ("attribute_accuracy.hair_color"); a metric whose network cannot
be loaded is None with a one-line reason under "errors", and the other metrics still run.
`format_table` renders a result for the terminal, `write_results` saves it as JSON (atomically).
The maths lives in `parti.metrics`, the FID network in `parti.inception`, LPIPS in `parti.losses`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from parti import synthetic
from parti.audit import audit_grid_path, check_audit_grid, memorisation_audit, training_pool, write_audit_grid
from parti.cache import cache_inputs, held_out_source
from parti.checkpoint import CACHE_DIR, EVAL_NAME, EVAL_TOKENIZER_NAME
from parti.data import collate, open_source
from parti.device import default_device
from parti.errors import PartiError
from parti.files import read_json, write_json
from parti.inception import load_fid_inception
from parti.losses import LPIPS
from parti.metrics import (clip_similarity, codebook_stats, fid_from_features, load_clip, perplexity_from_loss, psnr, ssim)
from parti.pipeline import load_pipeline
from parti.plots import to_uint8
from parti.prompts import eval_prompts
from parti.runs import check_output
from parti.sampling import SamplingParams
from parti.settings import check_settings, setting
from parti.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # ViT-B/32: the CLIP-score convention of most papers
PHRASINGS = ("describe", "captions")


def _attempt(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the PartiError's message recorded under errors[name] (the run goes on)."""
    try:
        return fn()
    except PartiError as err:
        errors[name] = " ".join(str(err).split())  # one line
        log.info("%s unavailable: %s", name, errors[name])
        return None


def _check_count(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise PartiError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class EvalConfig:
    """What both evaluations share: a checkpoint, the held-out split they score and the metric networks."""

    checkpoint: str | None = setting(None, "the folder to evaluate", required=True)
    data: str | None = setting(None, "synthetic, a folder, hf:NAME or a dataset path (its val split)", required=True)
    num_images: int = setting(1000, "held-out images to score", minimum=2, maximum=10**7)
    batch_size: int = setting(32, "images per batch", minimum=1, maximum=1 << 16)
    device: str | None = setting(None, "cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    inception: str | None = setting(None, "FID Inception weights (pt_inception-2015-12-05-6726825d.pth); default: "
                                    "the cache, else one download")
    download: bool = setting(True, "download missing metric weights (off: those metrics read n/a)")
    data_seed: int = setting(0, "dataset seed (the synthetic faces)", minimum=0)
    image_column: str | None = setting(None, "table data: the image column")
    caption_column: str | None = setting(None, "table data: the caption column")
    out: str | None = setting(None, "JSON file for the results (default: in the checkpoint folder)")

    def __post_init__(self):
        check_settings(self)


@dataclass
class TokenizerEvalConfig(EvalConfig):
    """What `evaluate_tokenizer` scores: the first `num_images` readable images of `data`'s val split."""

    checkpoint: str | None = setting(None, "tokenizer folder (or a generator folder: its tokenizer/)", required=True)
    out: str | None = setting(None, f"JSON file for the results (default: CHECKPOINT/{EVAL_TOKENIZER_NAME})")
    vgg_weights: str | None = setting(None, "VGG16 weights for LPIPS (vgg16-397923af.pth or .safetensors)")


@dataclass
class GeneratorEvalConfig(EvalConfig):
    """What `evaluate_generator` scores: validation loss on `num_images` held-out items, FID and CLIP score of
    as many generated images, and on the synthetic faces attribute accuracy."""

    checkpoint: str | None = setting(None, "generator run folder", required=True)
    out: str | None = setting(None, f"JSON file for the results (default: CHECKPOINT/{EVAL_NAME})")
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int = setting(0, "sampling (and attribute-prompt) seed", minimum=0)
    fixed_prompts: bool = setting(False, "generate from parti.prompts' fixed evaluation list instead of the "
                                  "held-out captions")
    attribute_prompts: int = setting(200, "synthetic: attribute-accuracy prompts (0: skip)", minimum=0,
                                     maximum=10**6)
    phrasing: str = setting("describe", "attribute prompts: one sentence naming every attribute, or the training "
                            "captions' styles", choices=PHRASINGS)
    holdout: bool = setting(False, "synthetic: also score prompts whose (hair, background) pair was held out")
    clip: str | None = setting(None, f"CLIP hub name or local folder (default {DEFAULT_CLIP})")
    text_encoder_path: str | None = setting(None, "local copy of the frozen T5 the generator used")
    audit: bool = setting(False, "memorisation audit: are generated images closer to a training image than held-out "
                          "ones are (parti.audit; needs the FID Inception; minutes on a CPU)")
    audit_images: int = setting(64, "audit: images generated (half from training captions) and held-out images "
                                "compared", minimum=2, maximum=10**5)
    audit_train_limit: int = setting(2000, "audit: training images featurised at most (a seeded random subset), "
                                     "besides the shortlists", minimum=1, maximum=10**7)
    audit_shortlist: int = setting(4, "audit with a code cache: also featurise each image's k training images of "
                                   "most agreeing codes, searched over all cached codes (0: off)", minimum=0,
                                   maximum=1000)


# ---- metric networks, loaded explicitly (nothing loads at import) --------------------------------

def _load_inception(inception: Any, *, allow_download: bool, device: torch.device):
    """A path (or None: cache, then download) -> the FID Inception; an already built extractor passes through."""
    if inception is None or isinstance(inception, (str, Path)):
        return load_fid_inception(path=inception, allow_download=allow_download).to(device)
    return inception


def _load_clip(clip: Any, *, allow_download: bool, device: torch.device) -> tuple[Any, Any]:
    """A hub name or local folder (None: ViT-B/32) -> (CLIPModel, tokenizer); a (model, tokenizer) passes through."""
    if isinstance(clip, tuple):
        return clip
    name = str(clip or DEFAULT_CLIP)
    if not allow_download and not Path(name).expanduser().exists():
        from huggingface_hub import snapshot_download

        try:  # downloads off: only a copy already in the transformers cache will do
            name = snapshot_download(name, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - every failure here means "not cached"
            raise PartiError(f"CLIP {name!r} is not in the local cache and downloading is off; save CLIPModel and "
                             f"CLIPTokenizer (.save_pretrained) into one folder and pass it with --clip PATH") from err
    return load_clip(name, device=device)


def _load_lpips(vgg_weights: str | None, *, allow_download: bool, device: torch.device):
    return LPIPS.build(vgg_weights=vgg_weights, pretrained=True, allow_download=allow_download).to(device)


def _val_batches(source, *, num_images: int, batch_size: int):
    """The first `num_images` items of a held-out split, in order, batched; unreadable items are dropped."""
    n = min(num_images, len(source))
    loader = DataLoader(Subset(source, list(range(n))), batch_size=batch_size, collate_fn=collate)
    return (batch for batch in loader if batch is not None)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance of two feature sets (N1, D), (N2, D), exactly as `metrics.fid_from_features`.

    With fewer images than feature dimensions (N1 + N2 < D: any FID under ~2,000 images) both
    covariances and the mean difference live in the span of the N1 + N2 feature vectors, so the
    features are first written in an orthonormal basis of that span (QR, float64). Traces, the mean
    distance and the non-zero eigenvalues of S1 S2 are unchanged, and the 2048 x 2048 matrix square root
    (about a minute on two CPU cores) becomes an (N1 + N2)-sized one.
    """
    real, fake = real.double().cpu(), fake.double().cpu()
    if real.ndim == fake.ndim == 2 and real.shape[1] == fake.shape[1] and len(real) + len(fake) < real.shape[1]:
        basis, _ = torch.linalg.qr(torch.cat([real, fake]).T)  # (D, N1 + N2), orthonormal columns
        real, fake = real @ basis, fake @ basis
    return fid_from_features(real, fake)


def _fid(real: list[torch.Tensor], fake: list[torch.Tensor]) -> float:
    return fid(torch.cat(real), torch.cat(fake))


# ---- tokenizer --------------------------------------------------------------------------------------

def _tokenizer_folder(checkpoint: str | Path) -> Path:
    """A tokenizer folder, or a generator folder (then its tokenizer/ copy is evaluated)."""
    folder = Path(checkpoint)
    if (folder / "config.json").is_file() and (folder / "tokenizer" / "config.json").is_file():
        if read_json(folder / "config.json").get("kind") == "generator":
            return folder / "tokenizer"
    return folder


@torch.no_grad()
def evaluate_tokenizer(cfg: TokenizerEvalConfig, *, inception: Any = None) -> dict[str, Any]:
    """Reconstruct the first `cfg.num_images` held-out images and compare them with the originals.

    inception: a built feature extractor (tests) instead of `cfg.inception`'s weights.
    """
    checkpoint, data, num_images, batch_size = cfg.checkpoint, cfg.data, cfg.num_images, cfg.batch_size
    allow_download, inception = cfg.download, inception or cfg.inception
    t0, dev = time.time(), default_device(cfg.device)
    tokenizer = load_tokenizer(_tokenizer_folder(checkpoint), device=dev)
    source = open_source(data, split="val", image_size=tokenizer.config.image_size, seed=cfg.data_seed,
                         image_column=cfg.image_column, caption_column=cfg.caption_column)
    errors: dict[str, str] = {}
    lpips = _attempt(errors, "lpips", lambda: _load_lpips(cfg.vgg_weights, allow_download=allow_download,
                                                           device=dev))
    inc = _attempt(errors, "rfid", lambda: _load_inception(inception, allow_download=allow_download, device=dev))

    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
    real_feats, rec_feats, codes = [], [], []
    for batch in _val_batches(source, num_images=num_images, batch_size=batch_size):
        x = batch["image"].to(dev)  # (B, 3, S, S) in [-1, 1]
        c = tokenizer.encode(x)  # (B, g, g)
        rec = tokenizer.decode(c).clamp(-1, 1)
        codes.append(c.cpu())
        scores["psnr"].append(psnr(rec, x).cpu())
        scores["ssim"].append(ssim(rec, x).cpu())
        if lpips is not None:
            scores["lpips"].append(lpips(rec, x).float().cpu())
        if inc is not None:
            real_feats.append(inc(x).double().cpu())
            rec_feats.append(inc(rec).double().cpu())
    if not codes:
        raise PartiError(f"the val split of {data} holds no readable images; check the data source")
    stats = codebook_stats(torch.cat(codes), tokenizer.config.codebook_size)
    results: dict[str, Any] = {
        "num_images": sum(len(c) for c in codes),
        "psnr": float(torch.cat(scores["psnr"]).mean()),
        "ssim": float(torch.cat(scores["ssim"]).mean()),
        "lpips": float(torch.cat(scores["lpips"]).mean()) if scores["lpips"] else None,
        "rfid": _attempt(errors, "rfid", lambda: _fid(real_feats, rec_feats)) if inc is not None else None,
        "codebook_usage": stats["usage"],
        "codebook_perplexity": stats["perplexity"],
        "codebook_size": tokenizer.config.codebook_size,
    }
    results["seconds"] = round(time.time() - t0, 1)
    results["errors"] = errors
    results["settings"] = {"checkpoint": str(checkpoint), "data": data, "split": "val", "data_seed": cfg.data_seed,
                           "image_size": tokenizer.config.image_size, "device": str(dev)}
    return results


# ---- attribute accuracy (synthetic faces) ------------------------------------------------------------

def attribute_prompts(*, num_prompts: int, seed: int = 0, holdout: bool = False) -> list[dict]:
    """Deterministic attribute combinations, each attribute uniform.

    holdout=False: any combination. holdout=True: never a (hair_color, background_color) pair in
    HOLDOUT_COMBINATIONS (the pairs a holdout-trained model has not seen), as SyntheticFaces redraws them.
    """
    rng = random.Random(f"attribute-prompts:{seed}")
    combos = []
    while len(combos) < num_prompts:
        attrs = synthetic.sample_attributes(rng)
        if not (holdout and (attrs["hair_color"], attrs["background_color"]) in synthetic.HOLDOUT_COMBINATIONS):
            combos.append(attrs)
    return combos


def holdout_attribute_prompts(*, num_prompts: int, seed: int = 0) -> list[dict]:
    """Combinations whose (hair_color, background_color) is held out, cycling through HOLDOUT_COMBINATIONS."""
    rng = random.Random(f"holdout-prompts:{seed}")
    combos = []
    for i in range(num_prompts):
        attrs = synthetic.sample_attributes(rng)
        attrs["hair_color"], attrs["background_color"] = synthetic.HOLDOUT_COMBINATIONS[
            i % len(synthetic.HOLDOUT_COMBINATIONS)]
        combos.append(attrs)
    return combos


def _phrase(combos: list[dict], phrasing: str, seed: int) -> list[str]:
    """phrasing: one of PHRASINGS, or "heldout" (phrasings no training caption uses)."""
    if phrasing == "describe":  # names all seven attributes
        return [synthetic.describe(a) for a in combos]
    if phrasing == "heldout":  # an accessory named before hair and background; some attributes left unnamed
        rng = random.Random(f"heldout-captions:{seed}")
        return [synthetic.heldout_caption(a, rng) for a in combos]
    rng = random.Random(f"captions:{seed}")  # the training phrasings; some name only a few attributes
    return [synthetic.make_caption(a, rng) for a in combos]


def score_attributes(images: torch.Tensor, prompts: Sequence[str], *, prefix: str = "attribute_accuracy"
                     ) -> dict[str, Any]:
    """Read each image's attributes and score those its prompt names (parse_prompt); one image per prompt.

    -> {prefix.<name>: share correct, prefix.overall: over all scored (image, attribute) pairs,
        prefix.num_images: n}; attributes no prompt names are absent.
    Unasked-for features, an error rate: prefix.unasked_<glasses|hat> is the share of the images whose
    prompt does not name that feature that show it (the captions name every worn one), and prefix.unasked
    the share of all such (image, feature) pairs; absent when every prompt names both.
    """
    if len(prompts) != images.shape[0]:
        raise PartiError(f"need one prompt per image, got {len(prompts)} prompts for {images.shape[0]} images")
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    unasked: dict[str, list[bool]] = {"glasses": [], "hat": []}  # drawn?, per image not asking for it
    for pixels, prompt in zip(to_uint8(images), prompts):
        read, named = synthetic.read_attributes(pixels), synthetic.parse_prompt(prompt)
        for name, wanted in named.items():
            total[name] = total.get(name, 0) + 1
            correct[name] = correct.get(name, 0) + int(read[name] == wanted)
        for name, drawn in unasked.items():
            if name not in named:
                drawn.append(bool(read[name]))
    out: dict[str, Any] = {f"{prefix}.{name}": correct[name] / total[name]
                           for name in synthetic.ATTRIBUTES if name in total}
    out[f"{prefix}.overall"] = sum(correct.values()) / max(1, sum(total.values()))
    out[f"{prefix}.num_images"] = len(prompts)
    out.update({f"{prefix}.unasked_{name}": sum(drawn) / len(drawn) for name, drawn in unasked.items() if drawn})
    pairs = [d for drawn in unasked.values() for d in drawn]
    if pairs:
        out[f"{prefix}.unasked"] = sum(pairs) / len(pairs)
    return out


def _chance(prompts: Sequence[str]) -> dict[str, float]:
    """chance.<name> (uniform guessing) for every attribute the prompts name; chance.overall over all pairs."""
    named = [name for p in prompts for name in synthetic.parse_prompt(p)]
    out = {f"chance.{name}": synthetic.chance_level(name) for name in synthetic.ATTRIBUTES if name in named}
    out["chance.overall"] = sum(synthetic.chance_level(n) for n in named) / max(1, len(named))
    return out


@torch.no_grad()
def attribute_accuracy(pipeline, sampling: SamplingParams = SamplingParams(), *, num_prompts: int = 48,
                       images_per_prompt: int = 1, seed: int = 0, holdout: bool = False, batch_size: int = 64,
                       phrasing: str = "describe", heldout_phrasing: bool = True) -> dict[str, Any]:
    """How often generated faces show the attributes their prompt names, beside chance level.

    pipeline: anything called like `parti.pipeline.Pipeline` whose output has `.images` (prompt-major).
    holdout: also generate `num_prompts` prompts whose (hair, background) pair is held out from training
    (reported as holdout_attribute_accuracy.*); the ordinary prompts then avoid those pairs.
    phrasing: "describe" (one canonical sentence naming all attributes) or "captions" (the training
    captions' phrasings; only the attributes each names are scored).
    heldout_phrasing: also `num_prompts` prompts (pairs as the ordinary ones) in phrasings no training caption
    uses (parti.synthetic.heldout_caption), reported as heldout_phrasing_attribute_accuracy.*, with the
    unasked-for glasses and hats their images show (.unasked*).
    Cost: one pipeline call over num_prompts * images_per_prompt images per prompt set (up to three).
    """
    _check_count("num_prompts", num_prompts, 1)
    _check_count("images_per_prompt", images_per_prompt, 1)
    if phrasing not in PHRASINGS:
        raise PartiError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    combos = attribute_prompts(num_prompts=num_prompts, seed=seed, holdout=holdout)
    sets = {"attribute_accuracy": _phrase(combos, phrasing, seed)}  # prefix -> prompts, in generation order
    if holdout:
        sets["holdout_attribute_accuracy"] = _phrase(holdout_attribute_prompts(num_prompts=num_prompts, seed=seed),
                                                     phrasing, seed)
    if heldout_phrasing:
        sets["heldout_phrasing_attribute_accuracy"] = _phrase(combos, "heldout", seed)
    prompts = [p for group in sets.values() for p in group]
    out = pipeline(prompts, sampling, num_images_per_prompt=images_per_prompt, seed=seed, batch_size=batch_size)
    rows = [p for p in prompts for _ in range(images_per_prompt)]  # prompt-major, as the pipeline
    images = out.images
    if images.shape[0] != len(rows):
        raise PartiError(f"the pipeline returned {images.shape[0]} images for {len(rows)} requested")
    results: dict[str, Any] = {}
    start = 0
    for prefix, group in sets.items():
        end = start + len(group) * images_per_prompt
        results.update(score_attributes(images[start:end], rows[start:end], prefix=prefix))
        start = end
    results.update(_chance(rows[:len(sets["attribute_accuracy"]) * images_per_prompt]))
    return results


# ---- generator ----------------------------------------------------------------------------------------

def _val_loss(pipe, batches: list[tuple[torch.Tensor, list[str]]]) -> tuple[float, int]:
    """Mean teacher-forced cross-entropy (nats per code) of held-out codes given their captions."""
    total, tokens = 0.0, 0
    for codes, captions in batches:
        states, mask = pipe.text_encoder.encode(captions)
        ctx, ctx_mask = pipe.generator.encode_condition(states.to(pipe.device), mask.to(pipe.device))
        logits = pipe.generator(codes, ctx, ctx_mask)  # (B, T, K) fp32
        total += float(F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="sum"))
        tokens += codes.numel()
    return total / tokens, tokens


@torch.no_grad()
def evaluate_generator(cfg: GeneratorEvalConfig, *, prompts: Sequence[str] | None = None, inception: Any = None,
                       clip: Any = None) -> dict[str, Any]:
    """Score a generator folder against the first `cfg.num_images` held-out items of `cfg.data`.

    prompts: what FID/CLIP images are generated from, cycled to num_images; None: the held-out captions
    (or `parti.prompts.eval_prompts(data)` when the data has none, or with `cfg.fixed_prompts`).
    inception/clip: built networks (tests) instead of `cfg.inception`/`cfg.clip`.
    """
    if cfg.holdout and not cfg.data.startswith("synthetic"):
        raise PartiError("--holdout scores held-out combinations of the synthetic faces; use --data synthetic")
    t0 = time.time()
    grid = check_audit_grid(audit_grid_path(results_out(cfg, EVAL_NAME))) if cfg.audit else None  # before work
    # fp32 weights: validation loss and metrics must not depend on the device's sampling dtype.
    pipe = load_pipeline(cfg.checkpoint, device=default_device(cfg.device), text_encoder_path=cfg.text_encoder_path,
                         dtype="fp32")
    dev, size = pipe.device, pipe.tokenizer.config.image_size
    source = _held_out(cfg, size)
    errors: dict[str, str] = {}
    inc = _attempt(errors, "fid", lambda: _load_inception(inception or cfg.inception, allow_download=cfg.download,
                                                           device=dev))
    clip_pair = _attempt(errors, "clip_score", lambda: _load_clip(clip or cfg.clip, allow_download=cfg.download,
                                                                  device=dev))
    captions, real_feats, val_loss, val_tokens = _held_out_pass(pipe, source, cfg, inc)
    results: dict[str, Any] = {"num_images": len(captions), "val_loss": val_loss,
                               "val_perplexity": perplexity_from_loss(val_loss), "val_tokens": val_tokens,
                               "fid": None, "clip_score": None}
    prompt_source = "given"
    if prompts is None and cfg.fixed_prompts:
        prompts = list(eval_prompts(cfg.data))
    if prompts is None:
        prompt_source = "held-out captions" if all(captions) else "parti.prompts.eval_prompts"
        prompts = captions if all(captions) else list(eval_prompts(cfg.data))
    if not prompts:
        raise PartiError("no prompts to generate from; pass prompts or use data with captions")
    rows = [prompts[i % len(prompts)] for i in range(len(captions))]
    results.update(_generated_pass(pipe, rows, cfg, inc, clip_pair, real_feats, errors))
    if grid is not None:
        results.update(_audit(pipe, source, cfg, inc, grid, errors))
    if cfg.data.startswith("synthetic") and cfg.attribute_prompts > 0:
        results.update(attribute_accuracy(pipe, cfg.sampling, num_prompts=cfg.attribute_prompts, images_per_prompt=1,
                                          seed=cfg.seed, holdout=cfg.holdout, batch_size=cfg.batch_size,
                                          phrasing=cfg.phrasing))
    results["seconds"] = round(time.time() - t0, 1)
    results["errors"] = errors
    results["settings"] = {"checkpoint": str(cfg.checkpoint), "data": cfg.data, "split": "val", "seed": cfg.seed,
                           "data_seed": cfg.data_seed, **dataclasses.asdict(cfg.sampling), "holdout": cfg.holdout,
                           "phrasing": cfg.phrasing, "prompts": prompt_source, "image_size": size, "device": str(dev),
                           "clip": "given" if isinstance(clip, tuple) else str(cfg.clip or DEFAULT_CLIP)}
    return results


def _held_out(cfg: GeneratorEvalConfig, size: int):
    """The held-out split: from the run's code cache (or --data given as a cache) when it keeps the images and
    captions of this data (no download, no decoding), else from the data itself."""
    inputs = cache_inputs(data=cfg.data, image_column=cfg.image_column, caption_column=cfg.caption_column,
                          seed=cfg.data_seed)
    source = held_out_source((cfg.data, Path(cfg.checkpoint) / CACHE_DIR), data=cfg.data, inputs=inputs,
                             image_size=size, num_images=cfg.num_images)
    if source is not None:
        return source
    return open_source(cfg.data, split="val", image_size=size, seed=cfg.data_seed, image_column=cfg.image_column,
                       caption_column=cfg.caption_column)


def _held_out_pass(pipe, source, cfg: GeneratorEvalConfig, inc) -> tuple[list, list, float, int]:
    """One pass over the held-out split: codes for the validation loss, Inception features of the reals.
    Returns (captions, real features, validation loss in nats per code, codes scored)."""
    coded, real_feats, captions = [], [], []
    for batch in _val_batches(source, num_images=cfg.num_images, batch_size=cfg.batch_size):
        x = batch["image"].to(pipe.device)
        caps = [c if c is not None else "" for c in batch["caption"]]  # as the code cache stores them
        coded.append((pipe.tokenizer.encode(x).flatten(1), caps))  # (B, T) codes
        captions.extend(batch["caption"])
        if inc is not None:
            real_feats.append(inc(x).double().cpu())
    if not coded:
        raise PartiError(f"the val split of {cfg.data} holds no readable images; check the data source")
    val_loss, val_tokens = _val_loss(pipe, coded)
    return captions, real_feats, val_loss, val_tokens


def _generated_pass(pipe, rows: list[str], cfg: GeneratorEvalConfig, inc, clip_pair, real_feats,
                    errors: dict[str, str]) -> dict[str, Any]:
    """Generated images for FID and CLIP, a batch at a time: only features and similarities are kept."""
    if inc is None and clip_pair is None:
        return {"num_generated": 0}
    fake_feats, sims, out = [], [], {"num_generated": len(rows)}
    for k, i in enumerate(range(0, len(rows), cfg.batch_size)):
        chunk = rows[i:i + cfg.batch_size]
        images = pipe(chunk, cfg.sampling, seed=cfg.seed * 1_000_003 + k, batch_size=cfg.batch_size).images
        if inc is not None:
            fake_feats.append(inc(images).double().cpu())
        if clip_pair is not None:
            sims.append(clip_similarity(images, chunk, model=clip_pair[0], processor=clip_pair[1]))
    if inc is not None:
        out["fid"] = _attempt(errors, "fid", lambda: _fid(real_feats, fake_feats))
    if clip_pair is not None:
        out["clip_score"] = float(torch.cat(sims).mean())
    return out


def _audit(pipe, source, cfg: GeneratorEvalConfig, inc, grid: Path, errors: dict[str, str]) -> dict[str, Any]:
    """The memorisation audit (`parti.audit`), its grid of closest pairs written to `grid`; {} when it cannot run."""
    if inc is None:
        errors["audit"] = "the memorisation audit compares FID Inception features; it needs them (see fid)"
        return {}

    def run() -> dict[str, Any]:
        pool = training_pool(cfg.checkpoint, image_size=pipe.tokenizer.config.image_size, data_seed=cfg.data_seed)
        found, pairs = memorisation_audit(pipe, source, pool, inc, num_images=cfg.audit_images,
                                          train_limit=cfg.audit_train_limit, shortlist=cfg.audit_shortlist,
                                          sampling=cfg.sampling, seed=cfg.seed, batch_size=cfg.batch_size)
        found["audit.grid"] = write_audit_grid(pairs, grid).name  # beside the results JSON
        return found

    return _attempt(errors, "audit", run) or {}


# ---- output ---------------------------------------------------------------------------------------------

def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):  # the audit's verdict and grid file
        return value
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if "accuracy." in key and not key.endswith(".num_images"):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def format_table(results: dict[str, Any]) -> str:
    """A readable two/three-column table: metric, value, chance level where one applies; then errors."""
    rows = [("metric", "value", "chance")]
    for key, value in results.items():
        if key in ("errors", "settings") or key.startswith("chance.") or isinstance(value, dict):
            continue
        chance = ""
        if "accuracy." in key and not key.endswith(".num_images"):
            level = results.get("chance." + key.split(".", 1)[1])
            chance = f"{100 * level:.1f}%" if level is not None else ""
        rows.append((key, _format_value(key, value), chance))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v:>10}  {c:>7}".rstrip() for k, v, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    for name, message in (results.get("errors") or {}).items():
        lines.append(f"{name}: unavailable: {message}")
    return "\n".join(lines)


def _results_reason(path: Path) -> str | None:
    """None when `path` holds results `write_results` wrote (a "settings" object naming the checkpoint, an
    "errors" object), else why writing over it is refused."""
    try:
        data = read_json(path)
    except PartiError:
        return "is not a results file parti wrote"
    settings = data.get("settings")
    ours = isinstance(settings, dict) and "checkpoint" in settings and isinstance(data.get("errors"), dict)
    return None if ours else "is not a results file parti wrote"


def results_out(cfg: EvalConfig, default_name: str) -> Path:
    """Where an evaluation's results go (`cfg.out`, else CHECKPOINT/`default_name`), checked before any work by
    the output guard (`parti.runs.check_output`): inside a model or run folder only as its `default_name`,
    never over a file but results parti wrote, never where nothing can be written."""
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint) / default_name
    return check_output(out, slots=(default_name,), replaces=_results_reason)


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write `results` as JSON (atomic: a crash never leaves half a file), through the output guard: inside a
    model or run folder only as eval.json or eval_tokenizer.json, and over no file but earlier results."""
    path = check_output(path, slots=(EVAL_NAME, EVAL_TOKENIZER_NAME), replaces=_results_reason)
    write_json(path, results)
    return path
