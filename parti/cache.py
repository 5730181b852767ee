"""The code cache: a frozen tokenizer (and frozen T5) run once over a dataset, stored on disk.

Stage 2 trains from here and never runs a frozen network per step (LlamaGen `extract_codes`).
Layout of a cache folder, one subfolder per split:

  manifest.json                      what made it: tokenizer fingerprint, text encoder identity, sizes
  train/codes_00000.npy              (n, T) uint16 image codes, memory-mappable
  train/captions_00000.jsonl         one caption per line (JSON strings)
  train/text_00000.npy               (n, L_shard, D) float16 T5 states   [only with a frozen T5]
  train/text_len_00000.npy           (n,) int32 number of real tokens      [only with a frozen T5]

`.npy` files are read with allow_pickle=False; a cache whose tokenizer or T5 differs is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from parti import data as data_mod
from parti.checkpoint import read_json, write_json
from parti.errors import PartiError
from parti.tokenizer import VQTokenizer, load_tokenizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    tmp.replace(path)


@torch.no_grad()
def encode_dataset(*, data: str, tokenizer: str | Path, out: str | Path, text_encoder=None,
                   splits: tuple[str, ...] = ("train", "val"), batch_size: int = 64, shard_size: int = 10000,
                   device: str | torch.device | None = None, synthetic_length: int = 20000, seed: int = 0,
                   holdout: bool = False, image_column: str | None = None, caption_column: str | None = None,
                   max_items: int | None = None, num_workers: int = 0, progress: bool = True) -> Path:
    """Encode `data` with the tokenizer folder `tokenizer` (and a frozen `text_encoder`) into `out`.

    holdout: synthetic faces without the held-out (hair, background) pairs (recorded in the manifest).
    num_workers: DataLoader processes that decode/render images while the tokenizer runs.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok: VQTokenizer = load_tokenizer(tokenizer, device=device)
    if tok.config.codebook_size > 65536:
        raise PartiError("codebooks above 65536 codes do not fit the uint16 cache")
    if text_encoder is not None and getattr(text_encoder, "trainable", False):
        text_encoder = None  # a trainable encoder runs inside training; only captions are cached
    out = Path(out)
    manifest: dict[str, Any] = {
        "kind": "code_cache", "data": data, "tokenizer": str(tokenizer), "tokenizer_fingerprint": tok.fingerprint(),
        "image_size": tok.config.image_size, "grid_size": tok.config.grid_size,
        "num_codes": tok.config.codebook_size,
        "text_encoder": text_encoder.identity() if text_encoder is not None else None,
        "text_dim": getattr(text_encoder, "dim", None), "holdout": holdout, "splits": {},
    }
    for split in splits:
        source = data_mod.open_source(data, split=split, image_size=tok.config.image_size, image_column=image_column,
                                      caption_column=caption_column, seed=seed, holdout=holdout,
                                      synthetic_length=synthetic_length if split == "train" else None)
        n_items = len(source) if max_items is None else min(len(source), max_items)
        indices = list(range(n_items))
        loader = DataLoader(torch.utils.data.Subset(source, indices), batch_size=batch_size,
                            collate_fn=data_mod.collate, num_workers=num_workers,
                            worker_init_fn=data_mod.ignore_stop_signals)
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        shards, codes_buf, caps_buf, text_buf, len_buf, count = [], [], [], [], [], 0

        def flush() -> None:
            if not codes_buf:
                return
            k = len(shards)
            _save_npy(folder / f"codes_{k:05d}.npy", np.concatenate(codes_buf).astype(np.uint16))
            (folder / f"captions_{k:05d}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps_buf))
            entry = {"index": k, "n": sum(len(c) for c in codes_buf)}
            if text_buf:
                width = max(t.shape[1] for t in text_buf)
                padded = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in text_buf]
                _save_npy(folder / f"text_{k:05d}.npy", np.concatenate(padded).astype(np.float16))
                _save_npy(folder / f"text_len_{k:05d}.npy", np.concatenate(len_buf).astype(np.int32))
            shards.append(entry)
            codes_buf.clear(), caps_buf.clear(), text_buf.clear(), len_buf.clear()

        for batch in tqdm(loader, desc=f"encode {split}", disable=not progress):
            if batch is None:
                continue
            codes = tok.encode(batch["image"].to(device)).flatten(1).cpu().numpy()
            captions = [c if c is not None else "" for c in batch["caption"]]
            codes_buf.append(codes)
            caps_buf.extend(captions)
            if text_encoder is not None:
                states, mask = text_encoder.encode(captions)
                lengths = mask.sum(1)
                text_buf.append(states[:, :int(lengths.max())].float().cpu().numpy())
                len_buf.append(lengths.cpu().numpy())
            count += len(codes)
            if sum(len(c) for c in codes_buf) >= shard_size:
                flush()
        flush()
        if count == 0:
            raise PartiError(f"no readable images in the {split} split of {data}")
        manifest["splits"][split] = {"count": count, "shards": shards, "skipped": getattr(source, "skipped", 0)}
        log.info("encoded %d %s images into %s", count, split, folder)
    write_json(out / MANIFEST, manifest)  # last: a cache without a manifest is incomplete
    return out


def is_cache(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class CodeCache(Dataset):
    """One split of a cache: items {"codes": (T,) long, "caption": str[, "text": (L, D) fp16]}."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.root = Path(folder)
        if not is_cache(self.root):
            raise PartiError(f"{self.root} is not a code cache (no {MANIFEST}); create one with `parti encode`")
        self.manifest = read_json(self.root / MANIFEST)
        if split not in self.manifest["splits"]:
            raise PartiError(f"cache {self.root} has no {split!r} split; it has {sorted(self.manifest['splits'])}")
        folder = self.root / split
        self.codes, self.captions, self.text, self.text_len = [], [], [], []
        for shard in self.manifest["splits"][split]["shards"]:
            k = shard["index"]
            self.codes.append(np.load(folder / f"codes_{k:05d}.npy", mmap_mode="r", allow_pickle=False))
            lines = (folder / f"captions_{k:05d}.jsonl").read_text().splitlines()
            self.captions.extend(json.loads(line) for line in lines)
            if self.has_text:
                self.text.append(np.load(folder / f"text_{k:05d}.npy", mmap_mode="r", allow_pickle=False))
                self.text_len.append(np.load(folder / f"text_len_{k:05d}.npy", allow_pickle=False))
        self.offsets = np.cumsum([0] + [len(c) for c in self.codes])

    @property
    def has_text(self) -> bool:
        return self.manifest.get("text_encoder") is not None

    def check(self, *, tokenizer_fingerprint: str, text_identity: dict | None, holdout: bool | None = None) -> None:
        """Refuse the cache if it was made by another tokenizer or T5 than the ones given, or (holdout not
        None) with the held-out synthetic pairs left in when they should be out, or the other way round."""
        made_holdout = bool(self.manifest.get("holdout", False))
        if holdout is not None and made_holdout != holdout:
            raise PartiError(f"cache {self.root} was encoded {'with' if made_holdout else 'without'} --holdout, but "
                             f"this run asks {'for' if holdout else 'not for'} it; re-run `parti encode` "
                             f"{'with' if holdout else 'without'} --holdout or drop the flag here")
        made = self.manifest["tokenizer_fingerprint"]
        if made != tokenizer_fingerprint:
            raise PartiError(f"cache {self.root} was made with tokenizer {made}, not {tokenizer_fingerprint}; "
                             f"re-run `parti encode` with this tokenizer")
        if text_identity is not None and self.manifest.get("text_encoder") != text_identity:
            raise PartiError(f"cache {self.root} holds text states of {self.manifest.get('text_encoder')}, "
                             f"not {text_identity}; re-run `parti encode --text-encoder ...`")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        item = {"codes": torch.from_numpy(self.codes[s][j].astype(np.int64)), "caption": self.captions[i]}
        if self.has_text:
            n = int(self.text_len[s][j])
            item["text"] = torch.from_numpy(np.array(self.text[s][j, :n]))
        return item


def collate_codes(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"codes": torch.stack([it["codes"] for it in items]), "caption": [it["caption"] for it in items]}
    if "text" in items[0]:
        width = max(it["text"].shape[0] for it in items)
        text = torch.zeros(len(items), width, items[0]["text"].shape[1], dtype=torch.float16)
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for b, it in enumerate(items):
            text[b, :it["text"].shape[0]] = it["text"]
            mask[b, :it["text"].shape[0]] = True
        batch["text"], batch["text_mask"] = text, mask
    return batch

