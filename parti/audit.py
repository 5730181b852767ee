"""Memorisation audit: does the generator reproduce its training images?

An AR image model trained for many epochs on a few tens of thousands of images can copy some of them
(Kowalczuk et al., ICML 2025, extract hundreds of training images from VAR). The audit asks one question a
reader can check by eye: are generated images closer to a training image than held-out real images are?

- Generate `num_images` images, half from training captions, half from held-out captions.
- Take as many held-out real images (the first of the val split) as the reference.
- Every image compared goes through the tokenizer (encode -> decode): a training image is rebuilt from its
  cached codes, a held-out one from its own codes, so no side is sharper than the other.
- Find each image's nearest training image by Euclidean distance of FID Inception pool features (2048-d)
  among the searched training images: a seeded random `train_limit` of them, plus, with a code cache and
  `shortlist` k > 0, for every generated and every held-out image the k training images whose codes agree with
  its own on most positions (all cached codes are compared: integer equality, cheap). Both sides get the
  same search, so neither gets more chances of a close match.
- threshold = the smallest nearest-train distance of any held-out real image. A generated image "below" it
  is closer to a training image than any held-out real image is; share_below = the fraction of generated
  images below it, over all prompts and over each caption half.
- If generated images were as novel as held-out ones (the N + M distances exchangeable), k or more of N
  would fall below all M held-out ones with probability p = C(N, k) / C(N + M, k) (the k smallest are then
  all generated): 1/2 for one of 64 against 64, 0.7% for seven (a share of 11%). The verdict is
  "memorisation suspected" when p < SUSPECT_P (0.005) over all prompts or over the training-caption half: a
  false alarm rate of at most 1% for a model that copies nothing. Generated images are usually blurrier than
  real ones, hence farther from everything: the test leans towards "no memorisation found". When a held-out
  image equals a searched training image (threshold 0: data with duplicates, or a tiny space of images
  like the synthetic faces' 2,304), nothing can fall below and the verdict is "inconclusive".

`memorisation_audit` runs it and returns flat "audit.*" results plus the closest pairs;
`audit_grid_path`/`check_audit_grid`/`write_audit_grid` place the grid of closest pairs beside the results
JSON, through the output guard.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from parti.cache import CodeCache, is_cache
from parti.checkpoint import CACHE_DIR, CONFIG_NAME, EVAL_NAME
from parti.data import collate, open_source
from parti.errors import PartiError
from parti.files import atomic_write, read_json
from parti.plots import reconstruction_grid
from parti.runs import EXIF_SOFTWARE, IMAGE_MARK, check_output
from parti.sampling import SamplingParams

SUSPECT_P = 0.005  # per test, two tests (all prompts, training captions): a 1% false alarm rate at most
QUANTILES = (0.0, 0.05, 0.25, 0.5)  # of nearest-train distances, reported for generated and held-out images
GRID_PAIRS = 8  # closest pairs shown in the grid
CODE_CHUNK = 2048  # cached code rows compared at once: (Q, CODE_CHUNK, T) booleans


# ---- the training images -----------------------------------------------------------------------------------

@dataclass
class TrainingPool:
    """The training split: cached codes (n, T) with captions, or (no cache) the data source itself."""

    size: int
    codes: torch.Tensor | None = None  # (n, T) long, from the run's code cache
    captions: list[str] | None = None  # the cache's, one per code row
    source: Any = None  # an ImageSource of the train split when there is no cache
    origin: str = ""

    def caption(self, i: int) -> str:
        if self.captions is not None:
            return self.captions[i]
        item = self.source[i]
        return (item or {}).get("caption") or ""

    def images(self, indices: list[int], tokenizer) -> torch.Tensor:
        """(len(indices), 3, S, S) tokenizer reconstructions of those training images."""
        dev = next(tokenizer.parameters()).device
        if self.codes is not None:
            return tokenizer.decode(self.codes[indices].to(dev)).clamp(-1, 1)
        batch = collate([self.source[i] for i in indices])
        if batch is None or len(batch["image"]) != len(indices):
            raise PartiError(f"some training images of the {self.origin} are unreadable; fix the data, or drop "
                             f"--audit")
        return tokenizer.decode(tokenizer.encode(batch["image"].to(dev))).clamp(-1, 1)


def training_pool(checkpoint: str | Path, *, image_size: int, data_seed: int = 0) -> TrainingPool:
    """The generator's training images: the code cache its config.json names (`data`) or CHECKPOINT/cache,
    else the train split of that data, read again."""
    checkpoint = Path(checkpoint)
    data = str(read_json(checkpoint / CONFIG_NAME).get("data") or "")
    for cache in ([Path(data)] if data else []) + [checkpoint / CACHE_DIR]:
        if is_cache(cache):
            split = CodeCache(cache, "train", verify="size")
            codes = torch.from_numpy(np.concatenate([np.asarray(c) for c in split.codes]).astype(np.int64))
            return TrainingPool(size=len(codes), codes=codes, captions=list(split.captions),
                                origin=f"code cache {cache}")
    if not data:
        raise PartiError(f"{checkpoint / CONFIG_NAME} names no training data and the run has no {CACHE_DIR}/; "
                         f"drop --audit")
    source = open_source(data, split="train", image_size=image_size, seed=data_seed)
    return TrainingPool(size=len(source), source=source, origin=f"train split of {data}")


# ---- search -----------------------------------------------------------------------------------------------

def token_shortlist(query: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """query (Q, T), codes (n, T) long -> (Q, min(k, n)) indices of the rows of `codes` that agree with each
    query on the most positions (ties: lower index first). Chunked: memory is Q x CODE_CHUNK x T booleans."""
    k = min(k, len(codes))
    best = torch.full((len(query), 0), -1, dtype=torch.long)
    best_idx = torch.zeros((len(query), 0), dtype=torch.long)
    query = query.cpu()
    for start in range(0, len(codes), CODE_CHUNK):
        agree = (query[:, None, :] == codes[None, start:start + CODE_CHUNK].cpu()).sum(-1)  # (Q, chunk)
        idx = torch.arange(start, start + agree.shape[1]).expand_as(agree)
        score, pos = torch.cat([best, agree], 1).topk(k, dim=1, sorted=True)  # topk is stable in practice
        best, best_idx = score, torch.cat([best_idx, idx], 1).gather(1, pos)
    return best_idx


def nearest(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query (Q, D), keys (K, D) -> (distance (Q,), index (Q,)) of each query's nearest key (Euclidean, fp64)."""
    # Without the matmul shortcut: an exact copy is at distance 0, not 1e-8 (the "inconclusive" test needs it).
    dist = torch.cdist(query.double().cpu(), keys.double().cpu(), compute_mode="donot_use_mm_for_euclid_dist")
    d, i = dist.min(dim=1)
    return d, i


def _features(inc, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([inc(images[i:i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)])


# ---- the arithmetic -----------------------------------------------------------------------------------------

def chance_below(k: int, n: int, m: int) -> float:
    """P(at least k of n generated distances fall below all m held-out ones) if the n + m images were equally
    novel (exchangeable): the k smallest of the n + m distances are then all generated ones, C(n, k) / C(n + m, k)."""
    return math.comb(n, k) / math.comb(n + m, k) if k <= n else 0.0


def audit_scores(generated: torch.Tensor, held_out: torch.Tensor, *, train_prompt: torch.Tensor) -> dict[str, Any]:
    """The audit's figures from nearest-train distances: generated (N,), held_out (M,), train_prompt (N,) bool
    (True: generated from a training caption). See the module docstring for the threshold and the verdict."""
    if len(held_out) < 1 or len(generated) < 1 or len(train_prompt) != len(generated):
        raise PartiError(f"the audit needs generated and held-out distances, one prompt kind per generated image; "
                         f"got {len(generated)}, {len(held_out)} and {len(train_prompt)}")
    generated, held_out, train_prompt = generated.double(), held_out.double(), train_prompt.bool()
    threshold = float(held_out.min())
    below = generated < threshold  # closer to a training image than any held-out image is
    out: dict[str, Any] = {"audit.threshold": threshold}
    for name, dist in (("generated", generated), ("held_out", held_out)):
        for q in QUANTILES:
            out[f"audit.{name}_distance.q{round(100 * q):02d}"] = float(torch.quantile(dist, q))
    for name, rows in (("all", torch.ones_like(train_prompt)), ("train_captions", train_prompt),
                       ("held_out_captions", ~train_prompt)):
        k, n = int(below[rows].sum()), int(rows.sum())
        out[f"audit.share_below.{name}"] = k / n if n else 0.0
        out[f"audit.p_value.{name}"] = chance_below(k, n, len(held_out))
    tested = min(out["audit.p_value.all"], out["audit.p_value.train_captions"])
    if threshold <= 0:  # a held-out image equals a training one: nothing can be closer, the test says nothing
        out["audit.verdict"] = "inconclusive: a held-out image is identical to a training image"
    else:
        out["audit.verdict"] = "memorisation suspected" if tested < SUSPECT_P else "no memorisation found"
    return out


# ---- the audit ------------------------------------------------------------------------------------------------

@dataclass
class AuditImages:
    """What the audit compares: images (B, 3, S, S), codes (B, T), whether each came from a training caption."""

    images: torch.Tensor
    codes: torch.Tensor
    train_prompt: torch.Tensor


def _held_out(pipe, source, count: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `count` readable held-out images as tokenizer reconstructions (B, 3, S, S), their codes, captions."""
    loader = DataLoader(Subset(source, list(range(min(count, len(source))))), batch_size=batch_size,
                        collate_fn=collate)
    images, codes, captions = [], [], []
    for batch in loader:
        if batch is None:
            continue
        c = pipe.tokenizer.encode(batch["image"].to(pipe.device)).flatten(1)  # (B, T)
        images.append(pipe.tokenizer.decode(c).clamp(-1, 1).cpu())
        codes.append(c.cpu())
        captions.extend(x or "" for x in batch["caption"])
    if not images:
        raise PartiError("the val split holds no readable images for the memorisation audit; check the data source")
    return torch.cat(images), torch.cat(codes), captions


def _generate(pipe, pool: TrainingPool, subset: list[int], held_captions: list[str], *, num_images: int,
              sampling: SamplingParams, seed: int, batch_size: int) -> AuditImages:
    """num_images // 2 images from captions of searched training images, the rest from held-out captions."""
    rng = random.Random(f"audit:{seed}")
    n_train = num_images // 2
    train_caps = [pool.caption(i) for i in rng.sample(subset, min(n_train, len(subset)))]
    held = [held_captions[i % len(held_captions)] for i in range(num_images - len(train_caps))]
    out = pipe(train_caps + held, sampling, seed=seed, batch_size=batch_size, return_codes=True)
    flags = torch.tensor([True] * len(train_caps) + [False] * len(held))
    return AuditImages(images=out.images.cpu(), codes=out.codes.flatten(1).cpu(), train_prompt=flags)


def memorisation_audit(pipe, source, pool: TrainingPool, inc, *, num_images: int = 64, train_limit: int = 2000,
                       shortlist: int = 4, sampling: SamplingParams = SamplingParams(), seed: int = 0,
                       batch_size: int = 32
                       ) -> tuple[dict[str, Any], torch.Tensor]:
    """Run the audit (module docstring) -> (audit.* results, (2, P, 3, S, S): the P closest generated images and
    their nearest training images, closest first).

    pipe: a `parti.pipeline.Pipeline` (tokenizer, device, __call__ with return_codes); source: the val split;
    pool: `training_pool(...)`; inc: the FID Inception (or any (B, 3, H, W) -> (B, D) extractor).
    Memory: the features of the searched training images (2048 fp64 each), never their pixels."""
    if pool.size == 0:
        raise PartiError(f"the {pool.origin} holds no training images to search")
    held_images, held_codes, held_captions = _held_out(pipe, source, num_images, batch_size)
    subset = sorted(random.Random(f"audit-subset:{seed}").sample(range(pool.size), min(train_limit, pool.size)))
    gen = _generate(pipe, pool, subset, held_captions, num_images=num_images, sampling=sampling, seed=seed,
                    batch_size=batch_size)
    searched = set(subset)
    coded = shortlist > 0 and pool.codes is not None
    if coded:  # both sides' code neighbours: the same search for each
        searched.update(token_shortlist(torch.cat([gen.codes, held_codes]), pool.codes, shortlist).flatten().tolist())
    order = sorted(searched)
    train_feats = torch.cat([inc(pool.images(order[i:i + batch_size], pipe.tokenizer)).double().cpu()
                             for i in range(0, len(order), batch_size)])  # (L, D)
    gen_d, gen_i = nearest(_features(inc, gen.images, batch_size), train_feats)
    held_d, _ = nearest(_features(inc, held_images, batch_size), train_feats)
    results = audit_scores(gen_d, held_d, train_prompt=gen.train_prompt)
    results.update({"audit.generated": len(gen_d), "audit.held_out": len(held_d), "audit.train_images": pool.size,
                    "audit.train_images_searched": pool.size if coded else len(order),
                    "audit.train_images_featurised": len(order)})
    closest = gen_d.argsort()[:GRID_PAIRS]
    nearest_train = pool.images([order[int(i)] for i in gen_i[closest]], pipe.tokenizer).cpu()
    return results, torch.stack([gen.images[closest], nearest_train])


# ---- the grid of closest pairs ------------------------------------------------------------------------------

def audit_grid_path(results_path: str | Path) -> Path:
    """The grid of closest pairs beside a results JSON: eval.json -> eval_audit.png."""
    results_path = Path(results_path)
    return results_path.with_name(f"{results_path.stem}_audit.png")


AUDIT_GRID_NAME = audit_grid_path(EVAL_NAME).name  # its one name inside a run folder


def _not_our_grid(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            ours = img.getexif().get(EXIF_SOFTWARE) == IMAGE_MARK
    except Exception:  # noqa: BLE001 - an unreadable file is not ours either
        ours = False
    return None if ours else "is not an image parti wrote"


def check_audit_grid(path: str | Path) -> Path:
    """The output guard on the grid's path, before any work: in a run folder only as AUDIT_GRID_NAME, and over no
    file but a picture parti wrote."""
    return check_output(path, slots=(AUDIT_GRID_NAME,), replaces=_not_our_grid)


def write_audit_grid(pairs: torch.Tensor, path: str | Path) -> Path:
    """Save (2, P, 3, S, S) pairs as a PNG: generated images on top, their nearest training images below."""
    from PIL import Image

    path = check_audit_grid(path)
    image = reconstruction_grid(pairs[0], pairs[1], nrow=GRID_PAIRS,
                                title="top: generated (closest first); below: nearest training image")
    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = IMAGE_MARK  # ours: a later evaluation may replace it
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", exif=exif))
    return path
