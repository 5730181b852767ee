"""Image sources behind one interface: `open_source(spec)` -> an ImageSource of {"image", "caption", "index"}.

spec is "synthetic" (parti.synthetic faces), a folder of images, "hf:NAME" (a hub dataset), a local
.parquet file or folder of them, or an imagefolder-style folder with metadata.csv/jsonl/parquet.
Tables are read with pyarrow where they lie (`ParquetRows`: one row group's needed columns at a time), never
copied: no Arrow or `datasets` cache is written, so a 16 GB dataset needs its 16 GB once, not twice.
Every item's image is a float32 (3, S, S) tensor in [-1, 1]. An unreadable image never stops an epoch:
the item comes back as None (warned once, counted in `source.skipped`) and `collate` drops it.
The order training reads items in is `parti.batches`' (seeded per epoch, resumable at any batch).
Split rules (documented in docs/synthetic.md): folders hold out their last 10% as val (FFHQ's 70,000:
the last 10,000); tables without a val split hold out every 20th row.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
import stat
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from parti.errors import PartiError
from parti.hub import dataset_snapshot
from parti.synthetic import DEFAULT_LENGTH, VAL_LENGTH, SyntheticFaces
from parti.text import MAX_TEXT_BYTES, clip_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
FFHQ_SIZE, FFHQ_TRAIN = 70_000, 60_000  # FFHQ's official split: images 00000-59999 train, the rest val
VAL_EVERY = 20  # tables without a val split: rows 19, 39, 59, ... (5%) are val, in streaming mode too
VAL_SPLIT_NAMES = ("validation", "val", "valid", "test")
# Caption columns looked for, in this order, when none is given: the captioned FFHQ's, then common names.
CAPTION_COLUMNS = ("image_caption", "caption", "text", "captions", "prompt", "sentence")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "pixel_values")
# Words in a column's name that say it holds a condition (a ControlNet input), not the picture to learn: such a
# column is never taken as the image column unless named with --image-column.
CONDITION_WORDS = ("conditioning", "condition", "control", "controlnet", "mask", "masks", "depth", "edge", "edges",
                   "canny", "pose", "openpose", "seg", "segmentation", "sketch", "scribble", "hed", "lineart",
                   "normal", "normals", "hint")
SYNTHETIC_LENGTHS = {"train": DEFAULT_LENGTH, "val": VAL_LENGTH}
# Decoded row groups a table keeps per process, in Arrow bytes: a Hub shard's group of 100 512px images with
# captions is ~40 MB, so a few groups; DataLoader workers each keep their own.
TABLE_CACHE_BYTES = 256 << 20


class UnreadableImageWarning(UserWarning):
    """An image file or table cell that could not be decoded; the item is skipped."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit and float scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 16-bit range [0, 65535] -> [0, 255]
        elif img.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def to_tensor(img: Image.Image, size: int, *, flip: bool = False) -> torch.Tensor:
    """PIL image of any size and mode -> float32 (3, size, size) in [-1, 1].

    The shorter side is resized to `size` (LANCZOS down, BICUBIC up) and the centre square kept;
    both happen in one resize of the centre crop box. `flip` mirrors left-right.
    """
    img = _to_rgb(img)
    w, h = img.size
    if (w, h) != (size, size):
        side = min(w, h)
        crop = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        down = side > size
        img = img.resize((size, size), Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC,
                         box=crop, reducing_gap=3.0 if down else None)
    # numpy, not torch, for the arithmetic: no intra-op thread pool per item (and in each worker)
    x = (np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(2, 0, 1)  # (3, H, W)
    return torch.from_numpy(np.ascontiguousarray(x[:, :, ::-1] if flip else x))


class _Unreadable(Exception):
    """Decoding one stored image (or its caption file) failed: the item is skipped, not the run."""


def _open_image(value: Any) -> Image.Image:
    """A file path, bytes, {"bytes", "path"} table cell or PIL image -> decoded RGB image."""
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, Image.Image):
            return _to_rgb(value)
        if isinstance(value, (bytes, bytearray)):
            value = io.BytesIO(value)
        elif not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"not an image: {type(value).__name__}")
        elif not stat.S_ISREG(os.stat(value).st_mode):  # a FIFO would hang the reader, a device never end
            raise ValueError("not a regular file")
        with Image.open(value) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... on bad files
        raise _Unreadable(str(err) or type(err).__name__) from err


class ImageSource(Dataset):
    """Base of all sources. Subclasses implement `_load(index) -> (RGB image, caption, extra fields)`.

    `source[i]` or `source[(i, flip)]` gives {"image": (3, S, S) float, "caption": str | None,
    "index": i, **extra}, or None when the image cannot be read.
    """

    def __init__(self, *, name: str, split: str, image_size: int, has_captions: bool):
        self.name, self.split, self.image_size, self.has_captions = name, split, image_size, has_captions
        self.skipped = 0  # distinct unreadable items met by this process (DataLoader workers count their own)
        self._warned: set[int] = set()

    def _load(self, index: int) -> tuple[Image.Image, str | None, dict]:
        raise NotImplementedError

    def _item(self, index: int, flip: bool, load: Callable[[], tuple]) -> dict | None:
        try:
            img, caption, extra = load()
            image = to_tensor(img, self.image_size, flip=flip)
        except _Unreadable as err:  # a bad file skips the item, never the epoch; other errors are bugs
            if index not in self._warned:
                self._warned.add(index)
                self.skipped += 1
                warnings.warn(f"skipping unreadable image {self._describe(index)}: {err}", UnreadableImageWarning,
                              stacklevel=2)
            return None
        return {"image": image, "caption": caption, "index": index, **extra}

    def _describe(self, index: int) -> str:
        return f"{self.name} item {index}"

    def __getitem__(self, key: int | tuple[int, bool]) -> dict | None:
        index, flip = key if isinstance(key, tuple) else (key, False)  # samplers from make_loader pass flips
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self._item(index, flip, lambda: self._load(index))

    def _check_readable(self) -> None:
        """An empty source (no item decodes) is a user error, found now rather than as an endless epoch."""
        for index in range(len(self)):
            try:
                self._load(index)
                return
            except _Unreadable:
                continue
        raise PartiError(f"{self.name} ({self.split}) has no readable images among its {len(self)} items")

    def __repr__(self) -> str:
        size = f"{len(self)} items"
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, {size}, {self.image_size}px)"


class FolderSource(ImageSource):
    """Image files under a folder (recursive, sorted); a sidecar `NAME.txt` is the caption of `NAME.png`."""

    def __init__(self, files: list[Path], captions: set[Path], *, name: str, split: str, image_size: int):
        super().__init__(name=name, split=split, image_size=image_size, has_captions=bool(captions))
        self.files, self._captions = files, captions

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[Image.Image, str | None, dict]:
        path = self.files[index]
        txt = path.with_suffix(".txt")
        try:
            caption = _read_caption_file(txt) if txt in self._captions else None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise _Unreadable(f"caption file {txt}: {err}") from err
        return _open_image(path), caption, {}

    def _describe(self, index: int) -> str:
        return str(self.files[index])


class TableSource(ImageSource):
    """Rows of a table (`ArrowRows`: parquet shards or an imagefolder's metadata); `rows` maps item -> table row.

    A cell that names a file is read only when the file lies under one of `roots` (the dataset's folder,
    or the hub cache for hf: datasets): a table is input, and a column of absolute paths must
    not turn training into a reader of any local file.
    """

    def __init__(self, table: Any, rows: np.ndarray, *, image_column: str, caption_column: str | None, name: str,
                 split: str, image_size: int, roots: tuple[Path, ...] = ()):
        super().__init__(name=name, split=split, image_size=image_size, has_captions=caption_column is not None)
        self.table, self.rows = table, rows
        self.image_column, self.caption_column = image_column, caption_column
        # Compared lexically (no symlinks followed: a dataset may link its images in), as given and resolved.
        self.roots = tuple(dict.fromkeys(Path(f(str(r))) for r in roots for f in (os.path.abspath, os.path.realpath)))

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, index: int) -> tuple[Image.Image, str | None, dict]:
        row = self.table[int(self.rows[index])]
        return _open_image(self._confined(row[self.image_column])), _caption(row, self.caption_column), {}

    def _confined(self, value: Any) -> Any:
        """`value` unchanged when it holds bytes or a path inside `roots`; a path elsewhere is a PartiError."""
        path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
        if not isinstance(path, (str, os.PathLike)):
            return value
        base = self.roots[0] if self.roots else Path.cwd()
        resolved = Path(os.path.normpath(base / Path(path).expanduser()))  # an absolute path replaces the base
        if not any(resolved == r or r in resolved.parents for r in self.roots):
            raise PartiError(f"{self.name}: column {self.image_column!r} names the file {path}, outside the "
                             f"dataset's folder; parti reads only images inside it (store bytes, or paths "
                             f"relative to the dataset)")
        return {"bytes": None, "path": str(resolved)} if isinstance(value, dict) else str(resolved)


class SyntheticSource(ImageSource):
    """parti.synthetic faces rendered at the source's size; items also carry their "attributes"."""

    def __init__(self, faces: Any, *, split: str, image_size: int):
        super().__init__(name="synthetic", split=split, image_size=image_size, has_captions=True)
        self.faces = faces

    def __len__(self) -> int:
        return len(self.faces)

    def _load(self, index: int) -> tuple[Image.Image, str | None, dict]:
        return _load_face(self.faces, index)


def _read_caption_file(txt: Path) -> str:
    """A sidecar caption, at most MAX_TEXT_BYTES of it read (a 50 MB file costs no more), stripped."""
    if not stat.S_ISREG(os.stat(txt).st_mode):  # a FIFO named NAME.txt would hang the reader
        raise ValueError("not a regular file")
    with open(txt, "rb") as f:
        head = f.read(MAX_TEXT_BYTES)
    return codecs.getincrementaldecoder("utf-8")().decode(head, final=False).strip()  # a cut character dropped


def _caption(row: dict, column: str | None) -> str | None:
    """The row's caption: a string (the first of a list of them), cut to MAX_TEXT_BYTES; anything else in a
    caption column (a struct, a number) is refused rather than trained on as its repr."""
    if column is None or row[column] is None:
        return None
    value = row[column]
    if isinstance(value, (list, tuple)):  # several captions: the first
        value = value[0] if value else None
        if value is None:
            return None
    if not isinstance(value, str):
        raise PartiError(f"caption column {column!r} holds {type(value).__name__} values, not text; pass "
                         f"--caption-column with a column of strings (or --caption-column none)")
    return clip_text(value)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT/SIGTERM. A Ctrl-C, `timeout`, SLURM or a container
    stop signals the whole process group; a worker that died of it would crash the main process's next
    batch with a traceback before it could save its stop checkpoint. The main process stops the workers
    (and they exit on their own if it dies)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- open_source -------------------------------------------------------------------------------

def open_source(spec: str, *, split: str = "train", image_size: int = 128, image_column: str | None = None,
                caption_column: str | None = None, synthetic_length: int | None = None,
                seed: int = 0, holdout: bool = False) -> ImageSource:
    """Open `spec` ("synthetic", a folder, "hf:NAME", a parquet file/folder, an imagefolder) as a source.

    "hf:NAME" downloads the dataset's parquet shards once into the Hugging Face cache (their size said
    first; offline, the cache serves them) and reads them as a local copy in the hub layout would be read.
    Columns are found without flags (`find_columns`); `caption_column="none"` reads a table as images only.
    For "synthetic", `synthetic_length=None` means DEFAULT_LENGTH train / VAL_LENGTH val faces (parti.synthetic).
    """
    if split not in ("train", "val"):
        raise PartiError(f"unknown split {split!r}; use 'train' or 'val'")
    if not isinstance(spec, str) or not spec.strip() or spec.startswith("hf:") and not spec[3:].strip():
        raise PartiError(f"--data {spec!r} names no data (an unset variable?); pass 'synthetic', a folder of "
                         f"images, a .parquet file or folder, or hf:user/name")
    if image_size < 8:
        raise PartiError(f"image_size must be >= 8, got {image_size}")
    common = {"split": split, "image_size": image_size}
    if holdout and spec != "synthetic":
        raise PartiError(f"--holdout holds out (hair, background) pairs of the synthetic faces; it needs --data "
                         f"synthetic, not {spec!r}")
    if spec == "synthetic":
        given = [f for f, v in (("--image-column", image_column), ("--caption-column", caption_column)) if v]
        if given:
            raise PartiError(f"{' and '.join(given)} name columns of a table; the synthetic faces have none: "
                             f"drop {'them' if len(given) > 1 else 'it'} or pass a table with --data")
        return _open_synthetic(synthetic_length, seed, holdout, common)
    if spec.startswith("hf:"):
        local = Path(spec[3:]).expanduser()  # hf:FOLDER reads a local copy in the hub layout
        folder = local if _exists(local, spec) and local.is_dir() else dataset_snapshot(spec[3:])
        return _open_table(_parquet_splits(folder, spec), spec, image_column, caption_column, common,
                           roots=(folder, *_hub_roots()))
    path = Path(spec).expanduser()
    if not _exists(path, spec):
        raise PartiError(f"no such file or folder {spec!r}; pass 'synthetic', a folder of images, a .parquet "
                         "file or folder, or hf:NAME")
    metadata: list[Path] = []
    if path.is_file():
        if path.suffix != ".parquet":
            raise PartiError(f"{spec!r} is a file but not .parquet; pass a .parquet file or a folder of images")
        splits = {"train": [path]}
    else:
        images, texts, parquets, metadata = _walk(path)
        if not (metadata or parquets):
            return _open_folder(images, texts, spec, common)
        # imagefolder: captions and other columns come from the metadata files; else parquet shards
        splits = _metadata_splits(path, metadata) if metadata else _parquet_splits(path, spec)
    root = path if path.is_dir() else path.parent
    return _open_table(splits, spec, image_column, caption_column, common, roots=(root,),
                       imagefolder=bool(metadata))


def _exists(path: Path, spec: str) -> bool:
    """Whether `path` exists; one we may not look at is said as such, not as missing."""
    try:
        os.stat(path)
    except PermissionError:
        raise PartiError(f"could not read {spec!r}: permission denied; check its permissions and its folders'") from None
    except OSError:
        return False
    return True


def _hub_roots() -> tuple[Path, ...]:
    """Where files of a hub dataset live once downloaded: the hub cache (huggingface_hub's, which honours
    HF_HUB_CACHE and HF_HOME). The `datasets` cache is no root: nothing parti reads is ever written there."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE),)


def _split_of(folder: Path, file: Path) -> str:
    """The split a file of a dataset belongs to, as the Hub names them: by its name
    (`data/train-00000-of-00032-<hash>.parquet`) or a folder named for the split (`test/metadata.jsonl`);
    a file named for no split is train."""
    rel = file.relative_to(folder).as_posix().lower()
    return next((s for s in ("train", *VAL_SPLIT_NAMES) if rel.split("/")[-1].startswith(s + "-")
                 or f"/{s}/" in f"/{rel}"), "train")


def _parquet_splits(folder: Path, spec: str) -> dict[str, list[Path]]:
    """A folder's parquet shards by split (`_split_of`), sorted, symlinks included (the Hub cache's snapshots are
    links to blobs)."""
    splits: dict[str, list[Path]] = {}
    for shard in sorted(folder.rglob("*.parquet")):
        splits.setdefault(_split_of(folder, shard), []).append(shard)
    if not splits:
        raise PartiError(f"{spec!r} holds no parquet shards; give a folder of images, parquet files, or hf:NAME")
    return splits


def _metadata_splits(folder: Path, metadata: list[Path]) -> dict[str, list[Path]]:
    """An imagefolder's metadata files by split (`_split_of`), sorted by path."""
    splits: dict[str, list[Path]] = {}
    for file in sorted(metadata, key=lambda p: p.relative_to(folder).as_posix()):
        splits.setdefault(_split_of(folder, file), []).append(file)
    return splits


def _walk(root: Path) -> tuple[list[Path], set[Path], list[Path], list[Path]]:
    """One recursive listing: image files (sorted), .txt files, .parquet files, metadata files."""
    images, texts, parquets, metadata = [], set(), [], []

    def unreadable(err: OSError) -> None:  # os.walk would skip the folder without a word
        raise PartiError(f"could not read {err.filename}: {err.strerror or err}; check its permissions")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints, .cache, ...
        for f in files:
            if f.startswith("."):
                continue
            p, ext = Path(folder) / f, os.path.splitext(f)[1].lower()
            if f in METADATA_FILES:
                metadata.append(p)
            elif ext in IMAGE_EXTENSIONS:
                images.append(p)
            elif ext == ".txt":
                texts.add(p)
            elif ext == ".parquet":
                parquets.append(p)
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, texts, parquets, metadata


def folder_train_count(n: int) -> int:
    """How many of a folder's n sorted images are train: FFHQ's 60,000 of 70,000, else all but the last 10%."""
    return FFHQ_TRAIN if n == FFHQ_SIZE else n - (max(1, n // 10) if n >= 2 else 0)


def _open_folder(images: list[Path], texts: set[Path], spec: str, common: dict) -> FolderSource:
    n = len(images)
    if n == 0:
        raise PartiError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {spec!r}")
    n_train = folder_train_count(n)
    files = images[:n_train] if common["split"] == "train" else images[n_train:]
    if not files:
        raise PartiError(f"{spec!r} has {n} image(s), too few for a val split (the last 10%); add images")
    captions = {t for t in (f.with_suffix(".txt") for f in files) if t in texts}
    source = FolderSource(files, captions, name=spec, **common)
    source._check_readable()
    return source


class _EveryNth:
    """Row filter of a derived split: val keeps rows i % VAL_EVERY == VAL_EVERY - 1, train the others."""

    def __init__(self, val: bool):
        self.val = val

    def __call__(self, i: int) -> bool:
        return (i % VAL_EVERY == VAL_EVERY - 1) == self.val

    def mask(self, n: int) -> np.ndarray:
        return (np.arange(n) % VAL_EVERY == VAL_EVERY - 1) == self.val


def _pick_split(tables: dict[str, Any], split: str, spec: str) -> tuple[Any, _EveryNth | None]:
    """(table's files, row filter or None): a named val split if there is one, else every VAL_EVERY-th row."""
    names = list(tables)
    val_name = next((v for v in VAL_SPLIT_NAMES if v in names), None)
    if split == "val" and val_name is not None:
        return tables[val_name], None
    base = "train" if "train" in names else (names[0] if len(names) == 1 else None)
    if base is None:
        raise PartiError(f"{spec!r} has splits {names} and none is 'train'; use a dataset with a train split")
    if val_name is not None:
        return tables[base], None
    return tables[base], _EveryNth(val=split == "val")


def is_condition_name(column: str) -> bool:
    """Whether a column's name says it holds a condition (`conditioning_image`, `mask`, `depth_map`, ...)."""
    words = [w for w in re.split(r"[^a-z0-9]+", column.lower()) if w]
    return any(w in CONDITION_WORDS or w.startswith(("conditioning", "control")) for w in words)


def find_columns(columns: list[str], *, images: list[str], texts: list[str], image_column: str | None,
                 caption_column: str | None, spec: str) -> tuple[str, str | None]:
    """(image column, caption column or None) of a table, chosen on purpose and logged. Given names must exist.
    Otherwise the image column is the first of IMAGE_COLUMNS present, or the table's only image-typed column
    when its name does not say it is a condition (`is_condition_name`: a ControlNet table without `image` must
    not train on its `conditioning_image`); the caption column is the first of CAPTION_COLUMNS present, or the
    only text column (several unnamed ones are ambiguous: ask). `images` and `texts` are the columns typed as
    images and as strings."""
    how = "given"
    if image_column is None:
        how, image_column = "named like an image", next((c for c in IMAGE_COLUMNS if c in columns), None)
        if image_column is None and len(images) == 1 and not is_condition_name(images[0]):
            how, image_column = "the only image column", images[0]
        if image_column is None:
            conditions = [c for c in images if is_condition_name(c)]
            said = (f"; {conditions} {'is' if len(conditions) == 1 else 'are'} named like a condition (a ControlNet "
                    f"input), not the picture to learn") if conditions else ""
            raise PartiError(f"{spec!r} has no image column named like one ({', '.join(IMAGE_COLUMNS)}) among "
                             f"{columns}{said}; pass --image-column")
    elif image_column not in columns:
        raise PartiError(f"column {image_column!r} not in dataset; columns are {columns}; pass --image-column")
    caption, caption_how = _find_caption(columns, texts, caption_column, spec)
    log.info("%s: images from column %r (%s); captions from %s", spec, image_column, how,
             f"column {caption!r} ({caption_how})" if caption else "no column (images only)")
    return image_column, caption


def _find_caption(columns: list[str], texts: list[str], caption_column: str | None,
                  spec: str) -> tuple[str | None, str]:
    """(caption column or None, how it was chosen): see `find_columns`."""
    if caption_column == "none":
        return None, "none asked"
    if caption_column is not None:
        if caption_column not in columns:
            raise PartiError(f"column {caption_column!r} not in dataset; columns are {columns}; pass --caption-column")
        return caption_column, "given"
    found = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if found is not None:
        return found, "named like a caption"
    if len(texts) == 1:
        return texts[0], "the only text column"
    if texts:  # several text columns, none with a caption's name: ask rather than guess
        raise PartiError(f"{spec!r} has text columns {texts} and none is named like a caption; pass "
                         "--caption-column (or --caption-column none for images only)")
    return None, "no text column"


# ---- tables ------------------------------------------------------------------------------------

class ArrowRows:
    """Random access by row to a table stored in row groups: `rows[i]` -> {column: Python value} of the
    selected columns (`select`; all until then).

    Subclasses give each group's row count and read one group's columns (`_read`). Row i is found by binary
    search over the groups' first rows: (group, offset in it). Decoded groups live in an LRU bounded in bytes:
    at most `cache_bytes` of Arrow memory, the group just read kept whatever its size. A pass in row order
    (encoding a dataset) decodes each group once; a shuffled pass over a table larger than the cache decodes
    about one group per item, so shuffled training suits tables that fit the cache.
    """

    def __init__(self, schema: pa.Schema, sizes: list[int], *, cache_bytes: int = TABLE_CACHE_BYTES):
        self.schema, self.features = schema, _hf_features(schema)
        self.columns = list(schema.names)
        self.starts = np.cumsum([0, *sizes])  # (groups + 1,): each group's first row, then the row count
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()  # group -> its selected columns, newest last
        self._cached_bytes = 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def select(self, columns: list[str]) -> None:
        self.columns = list(columns)
        self._cache.clear()
        self._cached_bytes = 0

    def locate(self, row: int) -> tuple[int, int]:
        """Row -> (group, offset): the last group starting at or before it (empty groups share a start)."""
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        return group, row - int(self.starts[group])

    def __getitem__(self, row: int) -> dict[str, Any]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        group, offset = self.locate(row)
        table = self._group(group)
        return {c: table.column(c)[offset].as_py() for c in self.columns}

    def _group(self, group: int) -> pa.Table:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        table = self._cache[group] = self._read(group, self.columns)
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:  # oldest first; the newest stays
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def _read(self, group: int, columns: list[str]) -> pa.Table:
        raise NotImplementedError

    def __getstate__(self) -> dict:  # a worker started by spawn gets no decoded groups (nor open files)
        return {**self.__dict__, "_cache": OrderedDict(), "_cached_bytes": 0}


class ParquetRows(ArrowRows):
    """The rows of parquet shards, in order: a group is one row group of one shard, read with only the
    selected columns. Footers are read when opened (a damaged one is a PartiError naming the file); files are
    opened once per process, so DataLoader workers (forked with this object) share no file position."""

    def __init__(self, files: list[Path], *, spec: str, cache_bytes: int = TABLE_CACHE_BYTES):
        self.files, self.spec = [Path(f) for f in files], spec
        self._handles: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()
        self._where: list[tuple[int, int]] = []  # group -> (shard, row group in it)
        sizes = []
        for shard in range(len(self.files)):
            meta = self._file(shard).metadata
            for g in range(meta.num_row_groups):
                self._where.append((shard, g))
                sizes.append(meta.row_group(g).num_rows)
        super().__init__(self._file(0).schema_arrow, sizes, cache_bytes=cache_bytes)

    def select(self, columns: list[str]) -> None:
        for shard, path in enumerate(self.files):
            missing = [c for c in columns if c not in self._file(shard).schema_arrow.names]
            if missing:
                raise PartiError(f"{self.spec!r}: the shard {path} has no column {missing[0]!r}, which "
                                 f"{self.files[0].name} has; a dataset's shards must share their columns")
        super().select(columns)

    def _file(self, shard: int) -> pq.ParquetFile:
        if self._pid != os.getpid():  # a forked worker: its own handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            path = self.files[shard]
            try:
                self._handles[shard] = pq.ParquetFile(path)
            except (OSError, ValueError, pa.ArrowException) as err:
                raise PartiError(f"{self.spec!r}: could not read the parquet file {path} ({_first_line(err)}); "
                                 f"it is damaged or not parquet: download it again or remove it") from None
        return self._handles[shard]

    def _read(self, group: int, columns: list[str]) -> pa.Table:
        shard, g = self._where[group]
        try:
            return self._file(shard).read_row_group(g, columns=columns, use_threads=False)
        except (OSError, ValueError, pa.ArrowException) as err:  # a damaged page: its rows are skipped
            raise _Unreadable(f"row group {g} of {self.files[shard]}: {_first_line(err)}") from err

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_handles": {}}


class MemoryRows(ArrowRows):
    """An Arrow table already in memory (an imagefolder's metadata) as one group."""

    def __init__(self, table: pa.Table, *, images: list[str]):
        super().__init__(table.schema, [table.num_rows])
        self.table = table
        self.features = {**self.features, **{c: {"_type": "Image"} for c in images}}

    def _read(self, group: int, columns: list[str]) -> pa.Table:
        return self.table.select(columns)


def _first_line(err: BaseException) -> str:
    return (str(err) or repr(err)).splitlines()[0]


def _hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The Hugging Face features `datasets` keeps in a parquet file's schema metadata (b"huggingface":
    {"info": {"features": {column: feature}}}), or {} when there are none or they do not parse."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    return features if isinstance(features, dict) else {}


def _is_image(kind: pa.DataType, feature: Any) -> bool:
    """An image column: a feature of _type Image, or a struct with `bytes` and `path` fields (how one is stored)."""
    if isinstance(feature, dict) and feature.get("_type") == "Image":
        return True
    return pa.types.is_struct(kind) and {"bytes", "path"} <= {kind.field(i).name for i in range(kind.num_fields)}


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_text(kind: pa.DataType) -> bool:
    """A string column, or a list of strings (several captions a row: the first is used)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    return _is_string(kind)


def _kind(kind: pa.DataType) -> str:
    """A column's type in a message: int64, struct, list, ..."""
    if pa.types.is_struct(kind):
        return "struct"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return "list"
    return str(kind)


def _read_metadata(path: Path) -> pa.Table:
    """One imagefolder metadata file (csv, jsonl or parquet) as an Arrow table; a bad one is a PartiError."""
    try:
        if path.name.endswith(".csv"):
            return pa_csv.read_csv(path)
        if path.name.endswith(".jsonl"):
            return pa_json.read_json(path)
        return pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise PartiError(f"could not read {path}: {_first_line(err)}; fix or remove it") from None


def _metadata_rows(files: list[Path]) -> MemoryRows:
    """An imagefolder's rows (as `datasets`' imagefolder defines them): the rows of its metadata files, whose
    `file_name` column (or `NAME_file_name`) names an image relative to the metadata file's folder; it becomes
    the image column "image" (or NAME) of paths. Images no metadata row names are not rows."""
    tables, images = [], set()
    for path in files:
        table = _read_metadata(path)
        named = [c for c in table.column_names if c == "file_name" or c.endswith("_file_name")]
        if not named:
            raise PartiError(f"{path} has no file_name column (its columns are {table.column_names}); an "
                             f"imagefolder's metadata names each row's image in 'file_name'")
        folder = os.path.abspath(path.parent)  # lexical, like TableSource's roots
        for c in named:
            paths = [None if v is None else os.path.join(folder, str(v)) for v in table.column(c).to_pylist()]
            image = c[: -len("_file_name")] or "image"  # "file_name" is shorter than the suffix: ""
            table = table.set_column(table.column_names.index(c), image, pa.array(paths, pa.string()))
            images.add(image)
        tables.append(table)
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (ValueError, pa.ArrowException) as err:
        raise PartiError(f"the metadata files {[str(f) for f in files]} do not share their columns' types "
                         f"({_first_line(err)}); make them agree") from None
    return MemoryRows(table, images=sorted(images))


def _open_table(splits: dict[str, list[Path]], spec: str, image_column: str | None, caption_column: str | None,
                common: dict, *, roots: tuple[Path, ...], imagefolder: bool = False) -> ImageSource:
    """A TableSource over one split of parquet shards (or an imagefolder's metadata files), columns found."""
    files, keep = _pick_split(splits, common["split"], spec)
    table = _metadata_rows(files) if imagefolder else ParquetRows(files, spec=spec)
    kinds = {f.name: f.type for f in table.schema}
    images = [c for c, k in kinds.items() if _is_image(k, table.features.get(c))]
    image_column, caption_column = find_columns(
        list(kinds), images=images, texts=[c for c, k in kinds.items() if _is_string(k) and c not in images],
        image_column=image_column, caption_column=caption_column, spec=spec)
    if caption_column is not None and not _is_text(kinds[caption_column]):
        raise PartiError(f"{spec!r}: caption column {caption_column!r} holds {_kind(kinds[caption_column])} values, "
                         f"not text; captions must be strings: pass --caption-column with a text column (or "
                         f"--caption-column none)")
    table.select([c for c in (image_column, caption_column) if c])  # only these are ever read
    all_rows = np.arange(len(table))
    kept = all_rows if keep is None else all_rows[keep.mask(len(table))]
    if len(kept) == 0:
        raise PartiError(f"{spec!r} has no rows in its {common['split']} split ({len(table)} rows in all)")
    source = TableSource(table, kept, image_column=image_column, caption_column=caption_column, name=spec,
                         roots=roots, **common)
    source._check_readable()
    return source


def _open_synthetic(length: int | None, seed: int, holdout: bool, common: dict) -> ImageSource:
    split, size = common["split"], common["image_size"]
    faces = SyntheticFaces(size=size, length=SYNTHETIC_LENGTHS[split] if length is None else length, seed=seed,
                           split=split, holdout=holdout)
    return SyntheticSource(faces, **common)


def _load_face(faces: Any, index: int) -> tuple[Image.Image, str, dict]:
    item = faces[index]
    return item["image"], item["caption"], {"attributes": item["attributes"]}


# ---- loading -----------------------------------------------------------------------------------

def open_split(cfg: Any, split: str, image_size: int) -> ImageSource:
    """Split `split` of a training config's data (`cfg` has the data fields of `parti.loop.TrainConfig`: data,
    image_column, caption_column, synthetic_length, seed, holdout); the length applies to the train split."""
    return open_source(cfg.data, split=split, image_size=image_size, image_column=cfg.image_column,
                       caption_column=cfg.caption_column,
                       synthetic_length=cfg.synthetic_length if split == "train" else None,
                       seed=cfg.seed, holdout=cfg.holdout)


def val_batch(source, n: int) -> torch.Tensor:
    """The first n readable validation images, (n, 3, S, S): a fixed set for curves and grids."""
    images = []
    for i in range(min(len(source), 4 * n)):
        item = source[i]
        if item is not None:
            images.append(item["image"])
        if len(images) == n:
            break
    if not images:
        raise PartiError("the validation split holds no readable images")
    return torch.stack(images)


def collate(batch: list[dict | None]) -> dict | None:
    """Drop unreadable items (None) and stack the rest: image (B, 3, S, S), index (B,), lists otherwise.

    "skipped" counts the dropped items (worker processes keep their own `source.skipped`). A batch
    whose items were all unreadable collates to None; training loops skip it.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out: dict[str, Any] = {"image": torch.stack([b["image"] for b in items]),
                           "index": torch.tensor([b["index"] for b in items]),
                           "caption": [b["caption"] for b in items], "skipped": len(batch) - len(items)}
    for key in items[0]:
        if key not in out:
            out[key] = [b[key] for b in items]
    return out
