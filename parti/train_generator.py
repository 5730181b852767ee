"""Stage-2 training: `train_generator(GeneratorTrainConfig) -> run folder`.

Reads a code cache (made first with `parti encode`, or here into OUT/cache when --data is a dataset),
trains the generator (and the trainable text encoder jointly, as the Parti paper does) with
cross-entropy on the codes, condition dropout for classifier-free guidance, warmup + cosine LR,
grad clip 4.0 and optional EMA. `GeneratorStage` is this stage's step body; `parti.loop.fit` runs it.
The run folder's top level is the exported generator; with tokenizer/ (and text_encoder/) beside it,
`parti.load_pipeline(OUT)` needs nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from parti import text as text_mod
from parti.cache import (
    MANIFEST,
    CodeCache,
    cache_inputs,
    collate_codes,
    encode_dataset,
    is_cache,
    read_manifest,
    stale_inputs,
)
from parti.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    SAMPLES_DIR,
    TEXT_ENCODER_DIR,
    TOKENIZER_DIR,
    atomic_export,
    config_from_dict,
    grid_name,
)
from parti.distributed import on_main, replicas_agree
from parti.errors import PartiError, say
from parti.generator import GENERATOR_PRESETS, Generator, GeneratorConfig, build_generator, save_generator
from parti.loop import Stage, TrainConfig, fit
from parti.optim import EMA, NonFiniteGuard, flatten_optimizer, make_adamw, restore_optimizer
from parti.pipeline import Pipeline
from parti.plots import sample_grid
from parti.prompts import sample_prompts
from parti.runs import run_progress
from parti.sampling import SamplingParams
from parti.settings import setting
from parti.state import load_module
from parti.tokenizer import load_tokenizer, save_tokenizer
from parti.validate import check_model_config

log = logging.getLogger(__name__)


@dataclass
class GeneratorTrainConfig(TrainConfig):
    """Stage 2's settings: the shared training settings and these."""

    tokenizer: str = setting("checkpoints/tokenizer", "the tokenizer's folder (stage 1's run folder)")
    preset: str = setting("tiny", "generator size (parti.GENERATOR_PRESETS)", choices=tuple(GENERATOR_PRESETS))
    out: str = setting("checkpoints/generator")
    text_encoder: str = setting("trainable", "trainable (trained jointly, as in the Parti paper), or a frozen T5: "
                                "t5-small | t5-base | t5-large | a hub name | a local folder")
    text_preset: str = setting("small", "the trainable text encoder's size",
                               choices=tuple(text_mod.TEXT_ENCODER_PRESETS))
    text_tokenizer: str = setting("sentencepiece", "the trainable encoder's tokenizer: a SentencePiece vocabulary "
                                  "learned from the captions, or bytes", choices=("sentencepiece", "bytes"))
    vocab_size: int = setting(1000, "SentencePiece vocabulary size", minimum=8, maximum=1 << 20)
    phrase_pieces: bool = setting(False, "SentencePiece pieces may span words ('no hat' one token): fewer tokens "
                                  "a caption, and negations a one-layer encoder reads (the demo's captions)")
    grad_clip: float = setting(4.0)  # Parti's value
    # Bounded by GeneratorConfig.BOUNDS (checked in __post_init__), the one home of the model's ranges.
    cond_drop_prob: float = setting(0.1, "share of captions dropped, for classifier-free guidance, in [0, 1)")
    ema_decay: float = setting(0.0, "EMA of the weights, exported instead of them (e.g. 0.999); 0: off",
                               minimum=0, maximum=0.999999)
    guidance_scale: float = setting(3.0, "classifier-free guidance of the periodic sample grids", minimum=0,
                                    maximum=100)
    val_batches: int = setting(4, "validation batches for the validation loss", minimum=1, maximum=100000)
    allow_unfinished_tokenizer: bool = setting(False, "train on a tokenizer whose training stopped before its last "
                                               "step (refused otherwise)")

    def __post_init__(self):
        if self.preset not in GENERATOR_PRESETS:
            raise PartiError(f"unknown generator preset {self.preset!r}; choose one of {sorted(GENERATOR_PRESETS)}")
        super().__post_init__()
        check_model_config(GeneratorConfig, {"cond_drop_prob": self.cond_drop_prob},
                           what="cond_drop_prob (--cond-drop-prob)")


class Objective(nn.Module):
    """Generator (+ trainable text encoder): one module so DDP sees every trained parameter."""

    def __init__(self, generator: Generator, text_encoder: nn.Module | None):
        super().__init__()
        self.generator, self.text_encoder = generator, text_encoder

    def forward(self, codes, ids, ids_mask, drop) -> torch.Tensor:
        """codes (B, T) long; ids (B, L) token ids, or (B, L, D) frozen-T5 states; mask (B, L); drop (B,)
        bool or None -> the mean cross-entropy of the codes (a 0-d tensor)."""
        if self.text_encoder is not None:
            ids_mask = ids_mask.bool()
            ids = self.text_encoder(ids, ids_mask)
        ctx, mask = self.generator.encode_condition(ids, ids_mask, drop=drop)
        logits = self.generator(codes, ctx, mask)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        # A batch with no dropped row leaves the null context unused; DDP needs every parameter in the
        # graph on every rank, so it always gets a (zero) gradient. Adds exactly 0 to the loss.
        return loss + 0.0 * self.generator.null_context.sum()


def _text_inputs(batch, encoder, device):
    """Token ids for the trainable encoder, or cached frozen-T5 states, with their masks."""
    if encoder is not None:
        ids, mask = encoder.tokenizer(batch["caption"])
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return batch["text"].to(device, non_blocking=True).float(), batch["text_mask"].to(device, non_blocking=True)


def _trainable_text_encoder(cfg: GeneratorTrainConfig, captions: list[str], device, state):
    """Rebuilt from the training checkpoint when resuming (its config and its sentencepiece model live
    there; the weights load with the rest), else with sentencepiece trained on the captions once."""
    if state is not None and "text_encoder_config" in state[1]:
        tensors, meta = state
        config = config_from_dict(text_mod.TextEncoderConfig, meta["text_encoder_config"], what="checkpoint")
        if config.tokenizer == "sentencepiece":
            proto = tensors["text_tokenizer.proto"].numpy().tobytes()
            tok = text_mod.SentencePieceTokenizer.from_proto(proto, max_length=config.max_length)
        else:
            tok = text_mod.ByteTokenizer(max_length=config.max_length)
        return text_mod.TrainableTextEncoder(config, tokenizer=tok).to(device)
    preset = text_mod.TEXT_ENCODER_PRESETS[cfg.text_preset]
    if cfg.text_tokenizer == "bytes":
        config = dataclasses.replace(preset, tokenizer="bytes", vocab_size=text_mod.ByteTokenizer.vocab_size)
    else:
        config = dataclasses.replace(preset, tokenizer="sentencepiece", vocab_size=cfg.vocab_size)
    return text_mod.build_text_encoder("trainable", captions=captions, config=config, phrases=cfg.phrase_pieces,
                                       device=device)


def _open_cache(cfg: GeneratorTrainConfig, acc, tokenizer, frozen_t5) -> tuple[CodeCache, CodeCache]:
    """The code cache: given as --data, or made here once (main process) from the dataset into OUT/cache."""
    cache_dir = Path(cfg.data) if is_cache(cfg.data) else Path(cfg.out) / "cache"
    if is_cache(cache_dir) and cache_dir != Path(cfg.data):
        text_identity = frozen_t5.identity() if frozen_t5 is not None else None
        on_main(acc, lambda: _check_own_cache(cache_dir, cfg, tokenizer_fingerprint=tokenizer.fingerprint(),
                                              text_identity=text_identity))  # main alone drops a stale manifest
    if not is_cache(cache_dir):
        on_main(acc, lambda: encode_dataset(
            data=cfg.data, tokenizer=cfg.tokenizer, tokenizer_model=tokenizer, require_captions=True,
            out=cache_dir, text_encoder=frozen_t5, device=acc.device,
            synthetic_length=cfg.synthetic_length, seed=cfg.seed, holdout=cfg.holdout,
            num_workers=cfg.num_workers or None,  # 0, the cache loader's default, lets the encode decode in workers
            image_column=cfg.image_column, caption_column=cfg.caption_column, progress=cfg.progress))
    acc.wait_for_everyone()
    sets = CodeCache(cache_dir, "train"), CodeCache(cache_dir, "val")
    for ds in sets:
        ds.check(tokenizer_fingerprint=tokenizer.fingerprint(),
                 text_identity=frozen_t5.identity() if frozen_t5 is not None else None, holdout=cfg.holdout,
                 grid_size=tokenizer.config.grid_size, num_codes=tokenizer.config.codebook_size)
        if frozen_t5 is not None and not ds.has_text:
            raise PartiError(f"cache {cache_dir} holds no T5 states; re-run `parti encode --text-encoder "
                             f"{cfg.text_encoder}`")
    return sets


def _check_own_cache(cache_dir: Path, cfg: GeneratorTrainConfig, *, tokenizer_fingerprint: str,
                     text_identity: dict | None) -> None:
    """OUT/cache is reused only when it was made from every input this run asks for (data, columns, synthetic
    length and seed, holdout, caption bound: `cache_inputs`; the tokenizer; a frozen T5). A stale one (a run
    killed and started again with other settings) is rebuilt when no checkpoint was trained on it: its
    manifest goes, and the caller encodes afresh; with checkpoints it is refused, in one line. One that cannot
    tell what made it (damaged, or from an older parti) is encoded again from this run's inputs."""
    try:
        made = read_manifest(cache_dir)
    except PartiError as e:  # damaged, or from an older parti: what it holds is unknown, so it is made afresh
        log.warning("%s; encoding it again from this run's inputs", e)
        (cache_dir / MANIFEST).unlink(missing_ok=True)
        return
    stale = stale_inputs(made, cache_inputs(data=cfg.data, image_column=cfg.image_column,
                                            caption_column=cfg.caption_column, synthetic_length=cfg.synthetic_length,
                                            seed=cfg.seed, holdout=cfg.holdout))
    stale += [f"{k}: {made.get(k)!r} -> {v!r}" for k, v in (("tokenizer_fingerprint", tokenizer_fingerprint),
                                                           ("text_encoder", text_identity)) if made.get(k) != v]
    if not stale:
        return
    if any((Path(cfg.out) / CHECKPOINTS_DIR).glob("step_*")):
        raise PartiError(f"{cache_dir} was encoded from other inputs than this run's ({'; '.join(stale[:3])}), and "
                         f"the run's checkpoints were trained on it; resume with the settings it was made with, or "
                         f"choose another --out")
    log.warning("%s was encoded from other inputs than this run's (%s) and nothing was trained on it yet: "
                "encoding it again", cache_dir, "; ".join(stale[:3]))
    (cache_dir / MANIFEST).unlink(missing_ok=True)


class GeneratorStage(Stage):
    """The generator and (when trainable) the text encoder as one `Objective`, with optional EMA."""

    name = "generator"
    inputs = (*Stage.inputs, "text_preset", "text_tokenizer", "vocab_size", "phrase_pieces")
    val_metric = "val_loss"  # of the EMA weights when on: the export holds the best by it

    @classmethod
    def reads(cls, cfg) -> tuple[str, ...]:
        return (cfg.tokenizer,) if Path(cfg.tokenizer).expanduser().exists() else ()

    @classmethod
    def check_inputs(cls, cfg) -> None:
        """A tokenizer whose run stopped early (a disconnect, the stop button) is refused unless asked for:
        stage 2 encodes every image with it, and a generator trained on it cannot move to the finished one."""
        progress = run_progress(Path(cfg.tokenizer).expanduser())
        if progress is None or progress["finished"]:
            return
        where = f"step {progress['step']} of {progress['steps']}"
        if cfg.allow_unfinished_tokenizer:
            log.warning("training on tokenizer %s from an unfinished run (%s), as asked", cfg.tokenizer, where)
            return
        raise PartiError(say(
            cli=f"--tokenizer {cfg.tokenizer} is from a training that stopped at {where}: finish it first (run "
                f"`parti train-tokenizer` again with --resume and the same --out), or pass "
                f"--allow-unfinished-tokenizer to train on it as it is",
            notebook=f"the tokenizer in {cfg.tokenizer} stopped at {where}: run the stage-1 cell again to finish "
                     f"it, or add allow_unfinished_tokenizer=True to the generator's settings to use it as it is"))

    def __init__(self, cfg: GeneratorTrainConfig, acc, state):
        self.cfg, self.acc = cfg, acc
        self.tokenizer = load_tokenizer(cfg.tokenizer, device=acc.device)
        trained_with = state[1].get("tokenizer_fingerprint") if state is not None else None
        if trained_with not in (None, self.tokenizer.fingerprint()):
            raise PartiError(f"{cfg.out} was trained with tokenizer {trained_with}, but --tokenizer {cfg.tokenizer} "
                             f"is {self.tokenizer.fingerprint()}; resume with the tokenizer the run started with")
        frozen_t5 = None if cfg.text_encoder == "trainable" else text_mod.load_t5(cfg.text_encoder, device=acc.device)
        self.train_set, self.val_set = _open_cache(cfg, acc, self.tokenizer, frozen_t5)
        self.collate, self.flip_prob = collate_codes, 0.0
        self.encoder = frozen_t5 or _trainable_text_encoder(cfg, self.train_set.captions, acc.device, state)
        self.trainable = self.encoder if getattr(self.encoder, "trainable", False) else None
        self.generator = build_generator(cfg.preset, num_codes=self.tokenizer.config.codebook_size,
                                         grid_size=self.tokenizer.config.grid_size, text_dim=self.encoder.dim,
                                         cond_drop_prob=cfg.cond_drop_prob)
        self.objective = self.model = Objective(self.generator, self.trainable).to(acc.device)
        self.model_config = dataclasses.asdict(self.generator.config)
        self.optimizer = make_adamw(self.objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.generator, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.guard = NonFiniteGuard()
        self.guards = [self.guard]
        self.grad_norm = torch.tensor(float("nan"))
        self.export_record = {"tokenizer_fingerprint": self.tokenizer.fingerprint(),
                              "text_encoder": self.encoder.identity(), "text_encoder_source": cfg.text_encoder,
                              "data": cfg.data}

    def restore(self, tensors, meta) -> None:
        load_module(self.objective, tensors, "obj", what="generator and text encoder weights")
        restore_optimizer(self.optimizer, tensors, meta["opt"], "opt")
        if self.ema is not None:
            self.ema.load(tensors, "ema")

    def prepare(self) -> None:
        self.model, self.optimizer = self.acc.prepare(self.objective, self.optimizer)

    def train_step(self, batch, step: int) -> int:
        acc = self.acc
        codes = batch["codes"].to(acc.device, non_blocking=True)  # (B, T) long
        ids, mask = _text_inputs(batch, self.trainable, acc.device)
        # Condition dropout drawn for the global batch, this rank taking its slice: N processes at
        # batch B drop the same rows as one process at batch N*B.
        b, rank, world = codes.shape[0], acc.process_index, acc.num_processes
        drop = (torch.rand(b * world, device=acc.device) < self.cfg.cond_drop_prob)[rank * b:(rank + 1) * b]
        with acc.autocast():
            loss = self.model(codes, ids, mask, drop)
        # No host read here: a non-finite loss makes fused AdamW and the EMA skip the step on the device.
        if self.guard.step(loss, acc, self.optimizer):
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.generator, skip=self.guard.bad)
        self.loss = loss
        return b

    def log_row(self) -> dict:
        return {"loss": float(self.acc.reduce(self.loss.detach(), reduction="mean")),
                "grad_norm": float(self.grad_norm)}

    def postfix(self, row) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}"}

    def _exported_generator(self) -> Generator:
        """The generator `export` writes now: a copy holding the EMA weights when on, else the one trained."""
        if self.ema is None:
            return self.generator
        generator = copy.deepcopy(self.generator)  # not build_generator: no fresh init, no RNG draws
        generator.load_state_dict(self.ema.shadow)
        return generator

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation loss and the sample grid of the weights the export would hold (EMA when on)."""
        cfg, acc, val_set = self.cfg, self.acc, self.val_set
        generator = self._exported_generator()
        objective = self.objective if generator is self.generator else Objective(generator, self.trainable)
        losses = []
        for b in range(min(cfg.val_batches, max(1, len(val_set) // cfg.batch_size))):
            batch = collate_codes([val_set[i] for i in range(b * cfg.batch_size,
                                                              min(len(val_set), (b + 1) * cfg.batch_size))])
            ids, mask = _text_inputs(batch, self.trainable, acc.device)
            with acc.autocast():
                losses.append(float(objective(batch["codes"].to(acc.device), ids, mask, None)))
        if acc.is_main_process:
            prompts = list(sample_prompts(cfg.data))
            pipe = Pipeline(tokenizer=self.tokenizer, generator=generator, text_encoder=self.encoder,
                            device=acc.device)
            result = pipe(prompts, SamplingParams(guidance_scale=cfg.guidance_scale), num_images_per_prompt=4, seed=0)
            sample_grid(result.images.float().cpu(), prompts, images_per_prompt=4,
                        path=Path(cfg.out) / SAMPLES_DIR / grid_name(step))
        val = sum(losses) / len(losses)
        return {"val_loss": val, "val_perplexity": float(torch.exp(torch.tensor(val)))}

    def training_state(self):
        tensors = {f"obj.{k}": v for k, v in self.objective.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer(self.optimizer, "opt")
        tensors.update(opt_t)
        meta = {"opt": opt_meta, "tokenizer_fingerprint": self.tokenizer.fingerprint()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        if self.trainable is not None:  # a resumed run rebuilds the text encoder from here alone
            meta["text_encoder_config"] = dataclasses.asdict(self.trainable.config)
            if isinstance(self.trainable.tokenizer, text_mod.SentencePieceTokenizer):
                tensors["text_tokenizer.proto"] = torch.frombuffer(bytearray(self.trainable.tokenizer.proto),
                                                                   dtype=torch.uint8)
        return tensors, meta

    def in_sync(self) -> bool:
        return replicas_agree(self.acc, self.objective)

    def export_weights(self) -> dict[str, torch.Tensor]:
        weights = {f"generator.{k}": v for k, v in (self.ema.shadow if self.ema is not None
                                                   else self.generator.state_dict()).items()}
        if self.trainable is not None:
            weights.update({f"text_encoder.{k}": v for k, v in self.trainable.state_dict().items()})
        return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}

    def export(self, weights=None, best=None) -> None:
        """Top level of the run: the generator (EMA weights when on), its tokenizer and text encoder; `weights`
        (from `export_weights`: the best evaluation's) instead of the current ones, `best` in config.json."""
        out, encoder = Path(self.cfg.out), self.trainable
        record = {**self.export_record, **({"best": best} if best is not None else {})}
        if weights is None:
            generator = self._exported_generator()
        else:  # copies: the weights trained go on unchanged

            def part(prefix: str) -> dict[str, torch.Tensor]:
                return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

            generator = copy.deepcopy(self.generator)
            generator.load_state_dict(part("generator."))
            if encoder is not None:
                encoder = copy.deepcopy(self.trainable)
                encoder.load_state_dict(part("text_encoder."))
        with atomic_export(out) as stage:  # generator, tokenizer and text encoder appear together or not at all
            if encoder is not None:
                text_mod.save_text_encoder(encoder, stage / TEXT_ENCODER_DIR)
                record["text_encoder"] = encoder.identity()
            if not (out / TOKENIZER_DIR / CONFIG_NAME).exists():
                save_tokenizer(self.tokenizer, stage / TOKENIZER_DIR)
            save_generator(generator, stage, extra=record)

    def trained_modules(self):
        return [self.objective]


def train_generator(cfg: GeneratorTrainConfig) -> Path:
    """Train the generator as `cfg` says; returns the run folder."""
    return fit(GeneratorStage, cfg)
