"""Pushing a generator folder to the Hugging Face Hub, with a generated model card; `parti push`.

`prepare_upload(checkpoint, folder)` builds the exact folder that would be uploaded (model files, a sample
grid, a README.md model card); `push_to_hub` uploads it with one `HfApi().upload_folder` call; `PushConfig`
holds the command's settings. huggingface_hub is imported only when a folder is pushed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parti.audit import AUDIT_GRID_NAME
from parti.cache import is_cache, read_manifest
from parti.checkpoint import (
    CACHE_DIR,
    CONFIG_NAME,
    DEMO_NAME,
    EVAL_NAME,
    GRID_GLOB,
    MAX_GRID_BYTES,
    MODEL_FILES,
    SAMPLES_DIR,
)
from parti.errors import PartiError
from parti.evaluate import format_table
from parti.files import not_plain_file, read_json, write_json
from parti.hub import is_local_path, parse_repo_id, resolve_checkpoint
from parti.pipeline import load_pipeline
from parti.runs import check_output
from parti.settings import check_settings, setting

SAMPLE_NAME = "samples.png"  # the run's latest sample grid, shown in the model card
CARD_NAME = "README.md"
FFHQ_LICENSE = "cc-by-nc-sa-4.0"
# Captioned FFHQ copies on the Hub whose dataset card names no licence (read 2026-12): the card says so.
UNLICENSED_CAPTIONS = ("cr7Por/ffhq_controlnet_5_2_23",)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# push: the upload folder and its model card


def prepare_upload(checkpoint: str | Path, folder: str | Path, *, repo_id: str | None = None) -> Path:
    """Build in `folder` (new or empty) exactly what `push_to_hub` uploads: the generator folder's model files
    (with tokenizer/ and text_encoder/; no training state, caches or metrics), its latest sample grid and a
    README.md model card. The checkpoint is loaded first, strictly, so a folder that does not load is refused."""
    checkpoint, folder = resolve_checkpoint(checkpoint), Path(folder)  # a Hub repo id may be pushed elsewhere
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PartiError(f"upload folder {folder} is not empty; give a new folder")
    # The staging folder goes through the output guard too: never inside the checkpoint or another model.
    check_output(folder, what="upload folder", folder=True, reads=(checkpoint,), replaces=lambda empty: None)
    pipe = load_pipeline(checkpoint, device="cpu", dtype="fp32")  # refuses inconsistent folders
    folder.mkdir(parents=True, exist_ok=True)
    for rel in MODEL_FILES:
        if (checkpoint / rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint / rel, folder / rel)  # copyfile: a snapshot's symlink becomes a file
    config = read_json(checkpoint / CONFIG_NAME)
    if public_config(config) != config:  # a local --data or T5 folder: published without the machine's path
        write_json(folder / CONFIG_NAME, public_config(config))
    grid = latest_grid(checkpoint)
    if grid is not None:
        shutil.copyfile(grid, folder / SAMPLE_NAME)
    audit = checkpoint / AUDIT_GRID_NAME  # `parti evaluate --audit`'s closest pairs, beside eval.json
    audit_ok = not_plain_file(audit, limit=MAX_GRID_BYTES) is None  # a file of its own: never a symlink's target
    if audit_ok:
        shutil.copyfile(audit, folder / AUDIT_GRID_NAME)
    card = model_card(pipe, checkpoint=checkpoint, repo_id=repo_id, sample=SAMPLE_NAME if grid else None,
                      audit=AUDIT_GRID_NAME if audit_ok else None)
    (folder / CARD_NAME).write_text(card)
    return folder


def latest_grid(checkpoint: Path) -> Path | None:
    """The run's newest sample grid (samples/step_*.png, zero-padded: the last name is the latest) that is a
    regular file of its own: a symlink there (to a key, a token, another file) is never published, nor a
    pipe or a file too large to be a grid; each one passed over is logged."""
    for grid in sorted((checkpoint / SAMPLES_DIR).glob(GRID_GLOB), reverse=True):
        why = not_plain_file(grid, limit=MAX_GRID_BYTES)
        if why is None:
            return grid
        log.warning("not publishing %s: %s", grid, why)
    return None


PATH_KEYS = ("data", "text_encoder_source")  # config.json keys a training may fill with a path of its machine


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as it is published: a local path the training recorded (`--data /home/me/faces`, a T5 folder)
    becomes `./<its last folder>`, still a local path by `is_local_path` (so a loader asks for that folder,
    never looks it up on the Hub) but no longer a map of the trainer's disk. Hub ids and "synthetic" stay."""
    out = dict(config)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str):
            continue
        prefix, name = ("hf:", value[3:]) if value.startswith("hf:") else ("", value)
        if name != "synthetic" and is_local_path(name):
            out[key] = f"{prefix}./{Path(name.rstrip('/')).expanduser().name or 'data'}"
    return out


@dataclass
class PushConfig:
    """`parti push`: the arguments of `push_to_hub`."""

    checkpoint: str | None = setting(None, "generator run folder", required=True)
    repo: str | None = setting(None, "Hub repo id user/name (created when missing)", required=True)
    private: bool = setting(False, "create the repo private")

    def __post_init__(self):
        check_settings(self)


def push_to_hub(checkpoint: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload parti generator") -> str:
    """Upload a generator folder (see `prepare_upload`) to `repo_id`, creating the repo; returns the commit URL."""
    repo_id, revision = parse_repo_id(repo_id)
    if revision is not None:
        raise PartiError(f"push to a repo id without @revision (got {revision!r}); uploads go to its main branch")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="parti-push-") as tmp:
        folder = prepare_upload(checkpoint, Path(tmp) / "upload", repo_id=repo_id)
        try:
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        except Exception as e:  # noqa: BLE001 - offline, unreachable, refused, not logged in: one line each way
            raise PartiError(_push_failure(repo_id, e)) from None
    return str(getattr(commit, "commit_url", commit))


def _push_failure(repo_id: str, error: Exception) -> str:
    """What to do when the upload failed: go online, log in, or try again."""
    from huggingface_hub import errors

    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.OfflineModeIsEnabled):
        return f"cannot push {repo_id}: the Hub is offline here (HF_HUB_OFFLINE=1); unset it, go online, and push again"
    if isinstance(error, errors.LocalTokenNotFoundError) or status in (401, 403):
        return (f"the Hub refused to push {repo_id} ({first}); log in with `hf auth login` using a token that may "
                f"write to it, then push again")
    if isinstance(error, errors.HfHubHTTPError):
        return f"the Hub refused to push {repo_id} ({first}); check the repo id and your access, then push again"
    return (f"could not reach the Hub to push {repo_id} ({type(error).__name__}: {first}); check the network "
            f"and push again")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def public_name(data: str) -> str:
    """How the card names training data: synthetic and Hub ids as they are; a local path by its last folder's
    name only (a machine path says who trained it and where, and is of no use to a reader)."""
    name = data.removeprefix("hf:")
    if data == "unknown" or data.startswith("hf:") and not is_local_path(name):
        return f"`{data}`"
    return f"a local copy named `{Path(name).expanduser().name or 'data'}`"


def training_data(checkpoint: Path, record: dict[str, Any]) -> tuple[str, str, str]:
    """(what the generator was trained on, its licence id for the card, a sentence on that licence)."""
    data = str(record.get("data") or "unknown")
    for cache in (Path(data), checkpoint / CACHE_DIR):  # trained from a code cache: it records its source
        if is_cache(cache):
            try:
                data = str(read_manifest(cache).get("data") or data)
            except PartiError as e:  # a damaged cache names no source: the card says what the config says
                log.warning("%s; the model card names the data the config records", e)
            break
    if data == "synthetic":
        return ("parti's built-in synthetic captioned faces (drawn by `parti.synthetic`; no real people)", "other",
                "The synthetic faces are generated by this project's own code: no third-party images, "
                "no third-party licence terms.")
    if "ffhq" in data.lower():
        name = data.removeprefix("hf:")
        captions = (f" The captions come from `{name}`, whose dataset card states no licence for them: ask its "
                    f"author before any use beyond research." if name in UNLICENSED_CAPTIONS else
                    " Check the terms of the captions' source too." if data.startswith("hf:") else "")
        return (f"FFHQ (Flickr-Faces-HQ, NVIDIA) with captions, from {public_name(data)}", FFHQ_LICENSE,
                "The images are FFHQ's: NVIDIA licenses the collection CC BY-NC-SA 4.0 and each photo keeps its "
                "Flickr author's licence (all allow non-commercial use): weights trained on it are for "
                "non-commercial use only, shared alike, with attribution." + captions)
    return (public_name(data), "other", "Check the licence of that dataset before using these weights.")


def model_card(pipe, *, checkpoint: Path, repo_id: str | None = None, sample: str | None = None,
               audit: str | None = None) -> str:
    """README.md for the Hub: YAML front matter, then what the model is, its data and licence, its size,
    its evaluation numbers (eval.json, demo.json; `audit`: the memorisation audit's grid), a sample grid and
    the code that loads it."""
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
    if audit:
        lines += ["Memorisation audit (`parti evaluate --audit`, its audit.* rows above): the generated images "
                  "closest to a training image (top) and that training image as the tokenizer rebuilds it (below):",
                  "", f"![memorisation audit]({audit})", ""]
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
    tables = []
    if (checkpoint / EVAL_NAME).is_file():
        tables.append(("eval.json (`parti evaluate`)", read_json(checkpoint / EVAL_NAME)))
    for demo in (checkpoint / DEMO_NAME, checkpoint.parent / DEMO_NAME):
        if demo.is_file():
            tables.append(("demo.json (`parti demo`): attribute accuracy of generated faces, read back from "
                           "the pixels", read_json(demo).get("attribute_accuracy") or {}))
            break
    lines = []
    for what, results in tables:
        if results:
            lines += [f"From the run's {what}:", "", "```", format_table(results), "```", ""]
    return lines or ["No evaluation was run on this checkpoint (`parti evaluate` writes eval.json).", ""]
