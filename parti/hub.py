"""Hub lookups: "is this a local path or a Hub id?", and a repo id resolved to a local snapshot folder.

Loading: `resolve_checkpoint("user/name@rev")` downloads the model files once into huggingface_hub's cache
(`snapshot_download(allow_patterns=MODEL_FILES)`) and returns the snapshot folder, which the strict folder
loaders then read; offline (HF_HUB_OFFLINE=1) the cache serves it. Only the files of parti's folder
format are ever fetched or read (config.json, model.safetensors, spm.model): a pickle or a .py file in the
repo is neither downloaded nor opened. A local folder that exists always wins over a repo id.

`is_local_path` is the one rule for telling a path from a Hub name, used for checkpoints, T5, CLIP and
datasets alike. Pushing a folder lives in parti.push. huggingface_hub is imported only when a repo id is
looked up.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from parti import __version__
from parti.checkpoint import MODEL_FILES
from parti.errors import PartiError

log = logging.getLogger(__name__)

# The Hub's rules for each half of user/name: letters, digits, '-', '_', '.', not at either end.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
MAX_REVISION = 255  # git refs and commit hashes fit; a longer one is no revision (and no file name in the cache)


def _shown(text: str) -> str:
    """`text` for a message: a very long one is cut, so the error stays one readable line."""
    return repr(text) if len(text) <= 100 else f"{text[:60]!r}... ({len(text):,} characters)"


def parse_repo_id(name: str, *, revision: str | None = None) -> tuple[str, str | None]:
    """'user/name' or 'user/name@rev' -> (repo id, revision); bad characters are a PartiError, before any lookup."""
    repo, at, rev = name.partition("@")
    if at and revision is not None and revision != rev:
        raise PartiError(f"{_shown(name)} names revision {_shown(rev)} but revision={_shown(revision)} was also "
                         f"given; give one")
    rev = rev if at else revision
    parts = repo.split("/")
    bad = (len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or "--" in repo or ".." in repo
           or len(repo) > 96)
    if bad:
        raise PartiError(f"{_shown(name)} is neither an existing folder nor a Hub repo id (user/name[@revision]: "
                         f"letters, digits, '-', '_' and '.')")
    if rev is not None and (len(rev) > MAX_REVISION or not _REVISION.fullmatch(rev) or ".." in rev):
        raise PartiError(f"{_shown(name)}: revision {_shown(rev)} is not a branch, tag or commit name (at most "
                         f"{MAX_REVISION} characters: letters, digits, '.', '_', '-', '/')")
    return repo, rev


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` means a local path, never a Hub lookup: a Path object, a path that exists,
    or a form only a path has (absolute, ./ or ~, a backslash, a trailing /, more than one / before @).
    Hub names are 'name' or 'user/name', optionally '@revision'. The one rule for checkpoints, T5, CLIP and
    datasets."""
    if isinstance(name_or_path, os.PathLike):
        return True
    name = str(name_or_path)
    repo = name.partition("@")[0]
    return (name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or repo.count("/") > 1
            or os.path.exists(os.path.expanduser(name)))  # False, not an error, for a name too long to be a path


def resolve_checkpoint(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as it is, or a Hub repo id ('user/name', 'user/name@rev') -> its cached snapshot folder."""
    path = Path(name_or_path).expanduser()
    # parti's model repos are always user/name: a bare name is a (missing) local folder, reported by the loader.
    if is_local_path(name_or_path) or "/" not in str(name_or_path).partition("@")[0]:
        if revision is not None:
            log.warning("%s is a local folder: revision=%r applies to Hub repo ids and is not used", path, revision)
        return path  # a missing path is reported by the folder loader, with its usual message
    repo_id, rev = parse_repo_id(str(name_or_path), revision=revision)
    return download(repo_id, revision=rev)


def download(repo_id: str, *, revision: str | None = None) -> Path:
    """The model files of `repo_id` into huggingface_hub's cache (once); returns the snapshot folder."""
    return _snapshot(repo_id, revision=revision, repo_type="model", patterns=list(MODEL_FILES))


def dataset_snapshot(repo_id: str, *, revision: str | None = None,
                     patterns: tuple[str, ...] = ("*.parquet", "**/*.parquet", "README.md")) -> Path:
    """A Hub dataset's parquet shards in huggingface_hub's cache, downloaded once (resumable, and served from
    the cache offline); their total size is logged, and checked against the free disk, before it starts."""
    from huggingface_hub import constants

    repo_id, rev = parse_repo_id(repo_id, revision=revision)
    if not constants.HF_HUB_OFFLINE:
        _announce_download(repo_id, rev, patterns)
    return _snapshot(repo_id, revision=rev, repo_type="dataset", patterns=list(patterns))


def _announce_download(repo_id: str, revision: str | None, patterns: tuple[str, ...]) -> None:
    """Log what a dataset download will take and refuse one that cannot fit. Files already in the cache (an
    earlier, interrupted download) count for nothing: only what is still to download must fit."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants, errors, try_to_load_from_cache

    try:
        info = HfApi().dataset_info(repo_id, revision=revision, files_metadata=True)
    except errors.HfHubHTTPError:
        return  # _snapshot reports the failure with its own message
    wanted = [f for f in info.siblings or [] if any(fnmatch(f.rfilename, p) for p in patterns)]
    cached = [f for f in wanted if isinstance(try_to_load_from_cache(repo_id, f.rfilename, revision=info.sha,
                                                                      repo_type="dataset"), str)]
    total = sum(f.size or 0 for f in wanted) - sum(f.size or 0 for f in cached)
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    log.info("dataset %s: %.1f GB of parquet shards to download into %s (%d of %d files already there; once: "
             "later runs read the cache)", repo_id, total / 1e9, cache, len(cached), len(wanted))
    if total > free:
        raise PartiError(f"dataset {repo_id} needs {total / 1e9:.1f} GB and {cache} has {free / 1e9:.1f} GB free; "
                         f"free disk space or set HF_HOME to a larger disk")


def _snapshot(repo_id: str, *, revision: str | None, repo_type: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, errors, snapshot_download

    label = repo_id + (f"@{revision}" if revision else "")
    offline = constants.HF_HUB_OFFLINE
    try:
        path = snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns,
                                 local_files_only=offline, library_name="parti", library_version=__version__)
    except errors.LocalEntryNotFoundError:
        why = "the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise PartiError(f"{label} is no local folder, and Hub repo {label} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) while {why}; go online once to download it, or give an "
                         f"existing folder") from None
    except errors.RevisionNotFoundError:
        raise PartiError(f"Hub repo {repo_id} has no revision {revision!r}; give a branch, tag or commit it has") from None
    except errors.RepositoryNotFoundError:
        raise PartiError(f"{label} is no local folder, and Hub repo {label} was not found (a private repo "
                         f"needs `hf auth login` first)") from None
    except errors.HfHubHTTPError as e:
        raise PartiError(f"the Hub refused {label}: {str(e).splitlines()[0]}") from None
    return Path(path)
