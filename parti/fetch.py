"""Getting FFHQ's 128x128 thumbnails onto local disk once: from a Hub mirror, a zip, or a folder.

The thumbnails are 70,000 PNGs in `00000/00000.png` .. `69000/69999.png` (NVlabs' thumbnails128x128
layout; `parti.data` takes the first 60,000 as train, the last 10,000 as val). Reading 70,000 small files
through a Drive mount is slow, so training reads a local copy; `fetch_ffhq_thumbnails` makes it:

    source=None        the Hub mirror FFHQ_MIRROR (one 2.1 GB zip, downloaded into the Hub cache)
    source=FILE.zip    a zip holding that layout (e.g. on Google Drive: copied once, then extracted)
    source=FOLDER      a folder holding that layout (e.g. on Google Drive: copied file by file)

A folder it finished is marked (`.parti_complete`) and returned at once next time. Extraction writes into a
temporary sibling and renames it into place, so a disconnect mid-way leaves nothing half-made behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from parti.errors import PartiError

log = logging.getLogger(__name__)

# The mirror: a dataset repo holding NVlabs' thumbnails128x128 folder as one zip, beside FFHQ's LICENSE.txt.
FFHQ_MIRROR = {"repo_id": "nuwandaa/ffhq128", "filename": "thumbnails128x128.zip", "bytes": 2_114_632_904}
FFHQ_COUNT = 70_000
MARKER = ".parti_complete"
# A thumbnail inside any wrapping folder: "thumbnails128x128/12000/12345.png" -> "12000/12345.png".
_MEMBER = re.compile(r"(?:^|/)(\d{5}/\d{5}\.png)$")


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
    if source is not None and Path(source).expanduser().is_dir():
        return _copy_folder(Path(source).expanduser(), dest, progress=progress)
    if source is None:
        zip_path = _download_mirror(dest.parent, progress=progress)
    else:
        zip_path = Path(source).expanduser()
        if not zip_path.is_file():
            raise PartiError(f"{source} is neither a zip file nor a folder; give the thumbnails zip or folder")
    if keep_copy is not None:
        kept = Path(keep_copy).expanduser() / zip_path.name
        if not kept.exists():
            kept.parent.mkdir(parents=True, exist_ok=True)
            log.info("keeping a copy of %s in %s for the next runtime", zip_path.name, kept.parent)
            shutil.copyfile(zip_path, kept)
    return _extract(zip_path, dest, progress=progress)


def _check_space(folder: Path, needed: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PartiError(f"{what} needs {needed / 1e9:.1f} GB in {folder}, only {free / 1e9:.1f} GB are free; "
                         f"free disk space or choose another destination")


def _download_mirror(parent: Path, *, progress: bool) -> Path:
    """The mirror's zip through huggingface_hub: downloaded once into its cache (offline: served from it)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    size = FFHQ_MIRROR["bytes"]
    log.info("FFHQ thumbnails: %.1f GB zip from the Hub dataset %s (once: later runs use the cache)", size / 1e9,
             FFHQ_MIRROR["repo_id"])
    try:
        return Path(hf_hub_download(FFHQ_MIRROR["repo_id"], FFHQ_MIRROR["filename"], repo_type="dataset"))
    except LocalEntryNotFoundError:
        raise PartiError(f"the FFHQ thumbnails are not in the Hub cache and the Hub cannot be reached; go online, "
                         f"or pass source= a copy of {FFHQ_MIRROR['filename']} or of the thumbnails folder") from None
    except OSError as e:  # a full disk or a broken connection mid-download
        raise PartiError(f"downloading the FFHQ thumbnails failed ({e}); free disk space or try again") from None


def _extract(zip_path: Path, dest: Path, *, progress: bool) -> Path:
    """The zip's thumbnails (and LICENSE.txt) into `dest`, wherever the zip nests them."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PartiError(f"{zip_path} is not a readable zip ({e}); download it again") from None
    with archive:
        members = [(info, m.group(1)) for info in archive.infolist() if (m := _MEMBER.search(info.filename))]
        if not members:
            raise PartiError(f"{zip_path} holds no thumbnails in the NNNNN/NNNNN.png layout; is it FFHQ's "
                             f"thumbnails128x128?")
        _check_space(dest.parent, sum(info.file_size for info, _ in members), "extracting the thumbnails")
        licence = [info for info in archive.infolist() if info.filename.endswith("LICENSE.txt")]
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for info, name in tqdm(members, desc="extracting FFHQ thumbnails", unit="file", disable=not progress):
            target = tmp / name  # `name` matched NNNNN/NNNNN.png: it cannot leave `tmp`
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
        if licence:
            (tmp / "LICENSE.txt").write_bytes(archive.read(licence[0]))
    return _finish(tmp, dest, len(members))


def _copy_folder(source: Path, dest: Path, *, progress: bool) -> Path:
    files = sorted(p for p in source.rglob("*.png") if _MEMBER.search(p.relative_to(source).as_posix()))
    if not files:
        raise PartiError(f"{source} holds no thumbnails in the NNNNN/NNNNN.png layout")
    _check_space(dest.parent, sum(p.stat().st_size for p in files), "copying the thumbnails")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in tqdm(files, desc="copying FFHQ thumbnails", unit="file", disable=not progress):
        target = tmp / _MEMBER.search(path.relative_to(source).as_posix()).group(1)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if (source / "LICENSE.txt").is_file():
        shutil.copyfile(source / "LICENSE.txt", tmp / "LICENSE.txt")
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
