"""Checkpoints on the Hugging Face Hub: a repo id resolves to a local folder, and a run folder is pushed.

Loading: `resolve_checkpoint("user/name@rev")` downloads the model files once into huggingface_hub's cache
(`snapshot_download(allow_patterns=MODEL_FILES)`) and returns the snapshot folder, which the strict folder
loaders then read; offline (HF_HUB_OFFLINE=1) the cache serves it. Only the files of parti's folder
format are ever fetched or read (config.json, model.safetensors, spm.model): a pickle or a .py file in the
repo is neither downloaded nor opened. A local folder that exists always wins over a repo id.

Pushing: `prepare_upload(checkpoint, folder)` builds the exact folder that would be uploaded (model files,
a sample grid, a README.md model card); `push_to_hub` uploads it with one `HfApi().upload_folder` call.
huggingface_hub is imported only when a repo id is looked up or a folder pushed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from parti.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_json
from parti.errors import PartiError
from parti.text import SPM_NAME

log = logging.getLogger(__name__)

# Every file a generator (or tokenizer) folder loads from; the download's allow-list and the upload's content.
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"tokenizer/{CONFIG_NAME}", f"tokenizer/{WEIGHTS_NAME}",
               f"text_encoder/{CONFIG_NAME}", f"text_encoder/{WEIGHTS_NAME}", f"text_encoder/{SPM_NAME}")
SAMPLE_NAME = "samples.png"  # the run's latest sample grid, shown in the model card
CARD_NAME = "README.md"
# The Hub's rules for each half of user/name: letters, digits, '-', '_', '.', not at either end.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
FFHQ_LICENSE = "cc-by-nc-sa-4.0"


def parse_repo_id(name: str, *, revision: str | None = None) -> tuple[str, str | None]:
    """'user/name' or 'user/name@rev' -> (repo id, revision); bad characters are a PartiError, before any lookup."""
    repo, at, rev = name.partition("@")
    if at and revision is not None and revision != rev:
        raise PartiError(f"{name!r} names revision {rev!r} but revision={revision!r} was also given; give one")
    rev = rev if at else revision
    parts = repo.split("/")
    bad = (len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or "--" in repo or ".." in repo
           or len(repo) > 96)
    if bad:
        raise PartiError(f"{name!r} is neither an existing folder nor a Hub repo id (user/name[@revision]: "
                         f"letters, digits, '-', '_' and '.')")
    if rev is not None and (not _REVISION.fullmatch(rev) or ".." in rev):
        raise PartiError(f"{name!r}: revision {rev!r} is not a branch, tag or commit name")
    return repo, rev


def _looks_like_path(name: str) -> bool:
    """Names that can only be paths (absolute, relative with ./ or ~, nested folders): never a Hub lookup."""
    repo = name.partition("@")[0]
    return (name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/")
            or repo.count("/") != 1)


def resolve_checkpoint(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as it is, or a Hub repo id ('user/name', 'user/name@rev') -> its cached snapshot folder."""
    path = Path(name_or_path).expanduser()
    if isinstance(name_or_path, Path) or path.exists() or _looks_like_path(str(name_or_path)):
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
    """Log what a dataset download will take and refuse one that cannot fit (files already cached count too)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants, errors

    try:
        info = HfApi().dataset_info(repo_id, revision=revision, files_metadata=True)
    except errors.HfHubHTTPError:
        return  # _snapshot reports the failure with its own message
    total = sum(f.size or 0 for f in info.siblings or [] if any(fnmatch(f.rfilename, p) for p in patterns))
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    log.info("dataset %s: %.1f GB of parquet shards into %s (once; later runs read the cache)", repo_id,
             total / 1e9, cache)
    if total > free:
        raise PartiError(f"dataset {repo_id} needs {total / 1e9:.1f} GB and {cache} has {free / 1e9:.1f} GB free; "
                         f"free disk space or set HF_HOME to a larger disk")


def _snapshot(repo_id: str, *, revision: str | None, repo_type: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, errors, snapshot_download

    from parti import __version__

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


# ----------------------------------------------------------------------------------------------------
# push: the upload folder and its model card


def prepare_upload(checkpoint: str | Path, folder: str | Path, *, repo_id: str | None = None) -> Path:
    """Build in `folder` (new or empty) exactly what `push_to_hub` uploads: the generator folder's model files
    (with tokenizer/ and text_encoder/; no training state, caches or metrics), its latest sample grid and a
    README.md model card. The checkpoint is loaded first, strictly, so a folder that does not load is refused."""
    from parti.pipeline import load_pipeline

    checkpoint, folder = resolve_checkpoint(checkpoint), Path(folder)  # a Hub repo id may be pushed elsewhere
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PartiError(f"upload folder {folder} is not empty; give a new folder")
    pipe = load_pipeline(checkpoint, device="cpu", dtype="fp32")  # refuses inconsistent folders
    folder.mkdir(parents=True, exist_ok=True)
    for rel in MODEL_FILES:
        if (checkpoint / rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint / rel, folder / rel)  # copyfile: a snapshot's symlink becomes a file
    grids = sorted((checkpoint / "samples").glob("step_*.png"))
    if grids:
        shutil.copyfile(grids[-1], folder / SAMPLE_NAME)  # step numbers are zero-padded: the last is the latest
    card = model_card(pipe, checkpoint=checkpoint, repo_id=repo_id, sample=SAMPLE_NAME if grids else None)
    (folder / CARD_NAME).write_text(card)
    return folder


def push_to_hub(checkpoint: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload parti generator") -> str:
    """Upload a generator folder (see `prepare_upload`) to `repo_id`, creating the repo; returns the commit URL."""
    repo_id, revision = parse_repo_id(repo_id)
    if revision is not None:
        raise PartiError(f"push to a repo id without @revision (got {revision!r}); uploads go to its main branch")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="parti-push-") as tmp:
        folder = prepare_upload(checkpoint, Path(tmp) / "upload", repo_id=repo_id)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def training_data(checkpoint: Path, record: dict[str, Any]) -> tuple[str, str, str]:
    """(what the generator was trained on, its licence id for the card, a sentence on that licence)."""
    data = str(record.get("data") or "unknown")
    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        manifest = checkpoint / "cache" / "manifest.json"
    if manifest.is_file():  # trained from a code cache: the cache records its source
        data = str(read_json(manifest).get("data") or data)
    if data == "synthetic":
        return ("parti's built-in synthetic captioned faces (drawn by `parti.synthetic`; no real people)", "other",
                "The synthetic faces are generated by this project's own code: no third-party images, "
                "no third-party licence terms.")
    if "ffhq" in data.lower():
        return (f"FFHQ (Flickr-Faces-HQ, NVIDIA) with captions, from `{data}`", FFHQ_LICENSE,
                "FFHQ is licensed CC BY-NC-SA 4.0 by NVIDIA: weights trained on it are for non-commercial "
                "use only, shared alike, with attribution.")
    return (f"`{data}`", "other", "Check the licence of that dataset before using these weights.")


def model_card(pipe, *, checkpoint: Path, repo_id: str | None = None, sample: str | None = None) -> str:
    """README.md for the Hub: YAML front matter, then what the model is, its data and licence, its size,
    its evaluation numbers (eval.json, demo.json), a sample grid and the code that loads it."""
    record = read_json(checkpoint / CONFIG_NAME)
    data, license_id, license_text = training_data(checkpoint, record)
    tok = pipe.tokenizer.config
    repo = repo_id or "<user>/<name>"
    front = {"license": license_id, "library_name": "parti", "pipeline_tag": "text-to-image",
             "tags": ["parti", "text-to-image", "autoregressive", "vqgan", "faces"]}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",  # JSON values are YAML
             f"# {repo.split('/')[-1]}", "",
             "## Model", "",
             "A [Parti](https://arxiv.org/abs/2206.10789)-style autoregressive text-to-image model of faces, made "
             f"with the `parti` package: a ViT-VQGAN tokenizer turns a {tok.image_size}x{tok.image_size} image "
             f"into a {tok.grid_size}x{tok.grid_size} grid of codes (from {tok.codebook_size}), and a transformer "
             "decoder predicts those codes one by one, cross-attending to a text encoder "
             f"({(record.get('text_encoder') or {}).get('name', 'unknown')}).", "",
             "## Training data", "", f"Trained on {data}.", "", f"Licence: `{license_id}`. {license_text}", "",
             *_parameter_lines(pipe), "", "## Evaluation", "", *_evaluation_lines(checkpoint)]
    if sample:
        lines += ["## Samples", "", "The training run's latest sample grid:", "", f"![samples]({sample})", ""]
    prompt = "a smiling woman with long blonde hair"
    lines += ["## Use", "", "With the `parti` package installed (`pip install -e .` in its repository):", "",
              "```bash", f'parti sample --checkpoint {repo} --prompt "{prompt}" --out faces.png', "```", "",
              "```python", "import parti", "", f'pipe = parti.load_pipeline("{repo}")',
              f'out = pipe(["{prompt}"], num_images_per_prompt=4, seed=0)',
              "out.images  # (4, 3, H, W) in [-1, 1]", "```", "",
              f"`parti serve --checkpoint {repo}` opens a web demo. Only config.json, model.safetensors and "
              "spm.model files are downloaded and read: nothing in the repo is unpickled or executed.", ""]
    return "\n".join(lines)


def _parameter_lines(pipe) -> list[str]:
    gen = pipe.generator.config
    lines = ["## Parameters", "", "| part | parameters |", "|---|---|",
             f"| generator ({gen.dim} wide, {gen.depth} layers, {gen.seq_len} image tokens) | "
             f"{_millions(_count(pipe.generator))} |",
             f"| image tokenizer (encoder and decoder) | {_millions(_count(pipe.tokenizer))} |"]
    encoder = pipe.text_encoder
    if getattr(encoder, "trainable", False):
        lines.append(f"| text encoder (trained with the generator) | {_millions(_count(encoder))} |")
    else:  # a frozen T5: loaded by name from its own repo, not part of this one
        lines.append(f"| frozen text encoder {encoder.name} (not in this repo) | {_millions(_count(encoder.model))} |")
    return lines


def _evaluation_lines(checkpoint: Path) -> list[str]:
    """eval.json (from `parti evaluate`) and the demo's attribute accuracy (demo.json here or one folder up)."""
    from parti.evaluate import format_table

    tables = []
    if (checkpoint / "eval.json").is_file():
        tables.append(("eval.json (`parti evaluate`)", read_json(checkpoint / "eval.json")))
    for demo in (checkpoint / "demo.json", checkpoint.parent / "demo.json"):
        if demo.is_file():
            tables.append(("demo.json (`parti demo`): attribute accuracy of generated faces, read back from "
                           "the pixels", read_json(demo).get("attribute_accuracy") or {}))
            break
    lines = []
    for what, results in tables:
        if results:
            lines += [f"From the run's {what}:", "", "```", format_table(results), "```", ""]
    return lines or ["No evaluation was run on this checkpoint (`parti evaluate` writes eval.json).", ""]


# ----------------------------------------------------------------------------------------------------
# the `parti push` command


def cmd_push(args: argparse.Namespace) -> None:
    url = push_to_hub(args.checkpoint, args.repo, private=args.private)
    print(f"pushed {args.checkpoint} to {args.repo}: {url}\nload it with parti.load_pipeline({args.repo!r})")


def add_push_parser(sub) -> None:
    """Register `parti push` on the CLI's subparsers."""
    p = sub.add_parser("push", help="upload a generator folder (with tokenizer, text encoder, model card) to the Hub")
    p.add_argument("--checkpoint", required=True, help="generator run folder")
    p.add_argument("--repo", required=True, help="Hub repo id user/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(func=cmd_push)
