"""Getting FFHQ's 128x128 thumbnails onto local disk once: from a Hub mirror, a zip, or a folder.

The thumbnails are 70,000 PNGs in `00000/00000.png` .. `69000/69999.png` (NVlabs' thumbnails128x128
layout; `parti.data` takes the first 60,000 as train, the last 10,000 as val). Reading 70,000 small files
through a Drive mount is slow, so training reads a local copy; `fetch_ffhq_thumbnails` makes it:

    source=None        the Hub mirror FFHQ_MIRROR (one 2.1 GB zip, downloaded into the Hub cache)
    source=FILE.zip    a zip holding that layout (e.g. on Google Drive: copied once, then extracted)
    source=FOLDER      a folder holding that layout (e.g. on Google Drive: copied file by file)

A folder it finished is marked (`.parti_complete`) and returned at once next time. Extraction writes into a
temporary sibling and renames it into place, so a disconnect mid-way leaves nothing half-made behind; the
zip's copy kept on Drive is written the same way, so a kill mid-copy leaves no truncated zip for later runs.
Nothing read is trusted: each zip member is bounded in size and compression ratio (a zip bomb is refused
before it is inflated, and a header that lies is caught while copying), a corrupt member is a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from parti.errors import PartiError
from parti.files import check_writable, fsync_dir

log = logging.getLogger(__name__)

# The mirror: a dataset repo holding NVlabs' thumbnails128x128 folder as one zip, beside FFHQ's LICENSE.txt.
FFHQ_MIRROR = {"repo_id": "nuwandaa/ffhq128", "filename": "thumbnails128x128.zip", "bytes": 2_114_632_904}
FFHQ_COUNT = 70_000
MARKER = ".parti_complete"
LICENCE_NAME = "LICENSE.txt"
MAX_LICENCE_BYTES = 1 << 20
# A thumbnail inside any wrapping folder: "thumbnails128x128/12000/12345.png" -> "12000/12345.png".
_MEMBER = re.compile(r"(?:^|/)(\d{5}/\d{5}\.png)$")
# A 128x128 thumbnail is ~30 KB and PNG barely compresses further: a member above either bound is not one.
MAX_MEMBER_BYTES = 4 << 20
MAX_MEMBER_RATIO = 50  # inflated / stored bytes


def fetch_ffhq_thumbnails(dest: str | Path = "data/ffhq128", *, source: str | Path | None = None,
                          keep_copy: str | Path | None = None, progress: bool = True) -> Path:
    """The local folder of FFHQ thumbnails, fetched first if needed; see the module docstring.

    keep_copy: a folder (e.g. on Drive) to copy the zip into, so the next runtime extracts from there
    instead of downloading again.
    """
    dest = Path(dest).expanduser()
    if (dest / MARKER).is_file():
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PartiError(f"{dest} exists and is not a finished thumbnails folder; remove it or choose another "
                         f"destination")
    check_writable(dest, what="the thumbnails' destination")  # before a 2 GB download, not after it
    if keep_copy is not None:
        keep = Path(keep_copy).expanduser()
        if keep.exists() and not keep.is_dir():
            raise PartiError(f"keep_copy {keep} is a file; give a folder to keep the zip in")
        check_writable(keep, what="keep_copy")
    if source is not None and Path(source).expanduser().is_dir():
        return _copy_folder(Path(source).expanduser(), dest, progress=progress)
    if source is None:
        zip_path = _download_mirror(dest.parent, progress=progress)
        licence = _mirror_licence()
    else:
        zip_path = Path(source).expanduser()
        if not zip_path.is_file():
            raise PartiError(f"{source} is neither a zip file nor a folder; give the thumbnails zip or folder")
        licence = zip_path.with_name(LICENCE_NAME)  # kept beside the zip by keep_copy
    if keep_copy is not None:
        _keep_copy(zip_path, Path(keep_copy).expanduser() / zip_path.name)
        if licence is not None and _is_licence(licence):
            _keep_copy(licence, Path(keep_copy).expanduser() / LICENCE_NAME)
    return _extract(zip_path, dest, progress=progress, licence=licence)


def _is_licence(path: Path) -> bool:
    """A regular file (the Hub cache's snapshot links followed) small enough to be a licence text."""
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= MAX_LICENCE_BYTES


def _mirror_licence() -> Path | None:
    """The mirror's LICENSE.txt (FFHQ's terms, 1.6 kB, beside the zip in the repo), downloaded once into the Hub
    cache like the zip; None, with a warning, when it cannot be had: the thumbnails are still usable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(FFHQ_MIRROR["repo_id"], LICENCE_NAME, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - offline and not cached, or the repo changed: say so, go on
        log.warning("could not fetch the mirror's %s (%s); FFHQ's terms: CC BY-NC-SA 4.0, "
                    "github.com/NVlabs/ffhq-dataset", LICENCE_NAME, type(e).__name__)
        return None


def _keep_copy(zip_path: Path, kept: Path) -> None:
    """Copy the zip to `kept` through a temporary sibling renamed into place once whole: a kill mid-copy (a
    runtime that disconnects while writing to Drive) leaves no truncated zip for the next runtime to pick up."""
    if kept.exists():
        return
    kept.parent.mkdir(parents=True, exist_ok=True)
    log.info("keeping a copy of %s in %s for the next runtime", zip_path.name, kept.parent)
    partial = kept.with_name(f".{kept.name}.partial")
    try:
        shutil.copyfile(zip_path, partial)
        if partial.stat().st_size != zip_path.stat().st_size:
            raise OSError(f"the copy holds {partial.stat().st_size} of {zip_path.stat().st_size} bytes")
        os.replace(partial, kept)
        fsync_dir(kept.parent)
    except OSError as e:
        partial.unlink(missing_ok=True)
        log.warning("could not keep a copy of %s in %s (%s); the next runtime downloads it again", zip_path.name,
                    kept.parent, getattr(e, "strerror", None) or e)


def _check_space(folder: Path, needed: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PartiError(f"{what} needs {needed / 1e9:.1f} GB in {folder}, only {free / 1e9:.1f} GB are free; "
                         f"free disk space or choose another destination")


def _download_mirror(parent: Path, *, progress: bool) -> Path:
    """The mirror's zip through huggingface_hub: downloaded once into its cache (offline: served from it)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached = try_to_load_from_cache(FFHQ_MIRROR["repo_id"], FFHQ_MIRROR["filename"], repo_type="dataset")
    if isinstance(cached, str):
        log.info("FFHQ thumbnails: the zip of the Hub dataset %s, from the Hub cache (no download)",
                 FFHQ_MIRROR["repo_id"])
    else:
        log.info("FFHQ thumbnails: %.1f GB zip to download from the Hub dataset %s (once: later runs use the cache)",
                 FFHQ_MIRROR["bytes"] / 1e9, FFHQ_MIRROR["repo_id"])
    try:
        return Path(hf_hub_download(FFHQ_MIRROR["repo_id"], FFHQ_MIRROR["filename"], repo_type="dataset"))
    except LocalEntryNotFoundError:
        raise PartiError(f"the FFHQ thumbnails are not in the Hub cache and the Hub cannot be reached; go online, "
                         f"or pass source= a copy of {FFHQ_MIRROR['filename']} or of the thumbnails folder") from None
    except OSError as e:  # a full disk or a broken connection mid-download
        raise PartiError(f"downloading the FFHQ thumbnails failed ({e}); free disk space or try again") from None


def _extract(zip_path: Path, dest: Path, *, progress: bool, licence: Path | None = None) -> Path:
    """The zip's thumbnails and LICENSE.txt into `dest`, wherever the zip nests them; a zip without a licence
    gets `licence` (the mirror's, beside the zip in its repo) when that is a plain file."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PartiError(f"{zip_path} is not a readable zip ({e}); delete it and fetch again (the Hub mirror is "
                         f"downloaded again), or give another copy") from None
    with archive:
        members = [(info, m.group(1)) for info in archive.infolist() if (m := _MEMBER.search(info.filename))]
        if not members:
            raise PartiError(f"{zip_path} holds no thumbnails in the NNNNN/NNNNN.png layout; is it FFHQ's "
                             f"thumbnails128x128?")
        _check_space(dest.parent, sum(info.file_size for info, _ in members), "extracting the thumbnails")
        extra, licence = licence, [info for info in archive.infolist() if info.filename.endswith(LICENCE_NAME)][:1]
        for info in [i for i, _ in members] + licence:
            _check_member(zip_path, info)  # all of them before a byte is inflated
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for info, name in tqdm(members, desc="extracting FFHQ thumbnails", unit="file", disable=not progress):
            target = tmp / name  # `name` matched NNNNN/NNNNN.png: it cannot leave `tmp`
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_member(zip_path, archive, info, target)
        if licence:
            _copy_member(zip_path, archive, licence[0], tmp / LICENCE_NAME)
        elif extra is not None and _is_licence(extra):
            shutil.copyfile(extra, tmp / LICENCE_NAME)
    return _finish(tmp, dest, len(members))


def _check_member(zip_path: Path, info: zipfile.ZipInfo) -> None:
    """A member's header: at most MAX_MEMBER_BYTES inflated, at most MAX_MEMBER_RATIO times its stored size."""
    if info.file_size > MAX_MEMBER_BYTES or info.file_size > MAX_MEMBER_RATIO * max(info.compress_size, 1):
        raise PartiError(f"{zip_path}: member {info.filename} inflates to {info.file_size:,} bytes from "
                         f"{info.compress_size:,} (a thumbnail is ~30 KB, barely compressed); this is not FFHQ's "
                         f"thumbnails zip: delete it and fetch again")


def _copy_member(zip_path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    """Inflate one member into `target`, stopping at MAX_MEMBER_BYTES whatever its header says; a member that
    cannot be read (bad CRC, truncated, an unknown compression) is a one-line error."""
    written = 0
    try:
        with archive.open(info) as src, open(target, "wb") as out:
            while block := src.read(1 << 16):
                written += len(block)
                if written > MAX_MEMBER_BYTES:
                    raise PartiError(f"{zip_path}: member {info.filename} inflates past {MAX_MEMBER_BYTES:,} bytes, "
                                     f"more than its header says; this is not FFHQ's thumbnails zip: delete it and "
                                     f"fetch again")
                out.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise PartiError(f"{zip_path}: member {info.filename} is corrupt ({e}); delete the zip and fetch again "
                         f"(the Hub mirror is downloaded again)") from None
    except OSError as e:  # a full disk, or the zip unreadable mid-way (a Drive mount that went away)
        raise PartiError(f"extracting {info.filename} from {zip_path} failed ({e.strerror or e}); free disk space "
                         f"or check the zip's disk, then fetch again") from None


def _copy_folder(source: Path, dest: Path, *, progress: bool) -> Path:
    files = sorted(p for p in source.rglob("*.png") if _MEMBER.search(p.relative_to(source).as_posix()))
    if not files:
        raise PartiError(f"{source} holds no thumbnails in the NNNNN/NNNNN.png layout")
    for path in files:  # a FIFO would hang the copy, /dev/zero never end it
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MEMBER_BYTES:
            raise PartiError(f"{path} is not a thumbnail (not a regular file of at most {MAX_MEMBER_BYTES:,} "
                             f"bytes); remove it from {source}")
    _check_space(dest.parent, sum(p.stat().st_size for p in files), "copying the thumbnails")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in tqdm(files, desc="copying FFHQ thumbnails", unit="file", disable=not progress):
        target = tmp / _MEMBER.search(path.relative_to(source).as_posix()).group(1)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if _is_licence(source / LICENCE_NAME):
        shutil.copyfile(source / LICENCE_NAME, tmp / LICENCE_NAME)
    return _finish(tmp, dest, len(files))


def _finish(tmp: Path, dest: Path, count: int) -> Path:
    if count != FFHQ_COUNT:
        log.warning("%d thumbnails, not FFHQ's %d: the split is then the last 10%% for validation", count,
                    FFHQ_COUNT)
    (tmp / MARKER).write_text(json.dumps({"images": count}) + "\n")
    if dest.exists():
        dest.rmdir()  # empty: checked before any work
    tmp.rename(dest)
    log.info("%d FFHQ thumbnails in %s", count, dest)
    return dest
