"""A Hugging Face Hub cache laid out as huggingface_hub lays it out, for offline tests of Hub loading."""

import hashlib
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blob_name(rel: str, data: bytes) -> str:
    """LFS files are stored under their sha256, regular git files under their git blob sha1."""
    if rel.endswith((".safetensors", ".bin", ".model", ".parquet", ".zip")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT,
                 ref: str = "main", repo_type: str = "model") -> Path:
    """Lay out {models,datasets}--user--name/{blobs, refs/<ref>, snapshots/<commit>} as snapshot_download
    leaves it."""
    repo = cache / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / _blob_name(rel, data)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as file_download._create_symlink
    return snapshot
