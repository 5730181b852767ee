"""Hub checkpoints, offline: repo ids load from a Hugging Face cache laid out as huggingface_hub lays it out
(blobs, refs/main, snapshots/<commit>/ with relative symlinks), pickles and code in the repo are never
read, bad ids are refused before any lookup; push builds the exact upload folder and model card."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from hubcache import COMMIT, add_to_cache
from parti.errors import PartiError


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A temporary HF_HOME whose hub cache huggingface_hub reads; the Hub stays offline."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # constants are read at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


@pytest.fixture
def traps(tmp_path):
    """A pickle and a .py file that leave a marker file behind if anything unpickles or runs them."""
    marker = tmp_path / "EXECUTED"

    class Trap:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling calls open(marker, "w")

    return marker, {"pytorch_model.bin": pickle.dumps(Trap()),
                    "modeling_parti.py": f"open({str(marker)!r}, 'w').close()\n".encode(),
                    "tokenizer/pytorch_model.bin": pickle.dumps(Trap()), "README.md": b"# a model\n"}


@pytest.fixture
def cached_repo(tiny_folders, hub_cache, traps):
    _, extra = traps
    return add_to_cache(hub_cache, "user/tiny", {**folder_files(tiny_folders / "gen"), **extra})


def test_load_pipeline_and_tokenizer_from_the_hub_cache_offline(tiny_folders, cached_repo, traps, monkeypatch):
    import huggingface_hub

    import parti

    marker, _ = traps
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    pipe = parti.load_pipeline("user/tiny", device="cpu")
    local = parti.load_pipeline(tiny_folders / "gen", device="cpu")
    for a, b in zip(pipe.generator.state_dict().values(), local.generator.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe(["a hat"], num_images_per_prompt=1, seed=0).images.shape == (1, 3, 32, 32)
    # Revisions: '@ref', a commit hash, the revision= argument.
    for name, revision in (("user/tiny@main", None), (f"user/tiny@{COMMIT}", None), ("user/tiny", "main")):
        assert parti.load_pipeline(name, device="cpu", revision=revision).tokenizer.fingerprint() == \
            local.tokenizer.fingerprint()
    assert not marker.exists(), "a pickle or .py file of the repo was executed"
    allowed = calls[0]["allow_patterns"]
    assert calls[0]["local_files_only"] is True
    assert "pytorch_model.bin" not in allowed and not any(p.endswith(".py") for p in allowed)


def test_load_tokenizer_from_a_tokenizer_repo(tiny_folders, hub_cache):
    import parti

    add_to_cache(hub_cache, "user/tok", folder_files(tiny_folders / "tok"))
    tok = parti.load_tokenizer("user/tok")
    assert tok.fingerprint() == parti.load_tokenizer(tiny_folders / "tok").fingerprint()
    add_to_cache(hub_cache, "user/gen", folder_files(tiny_folders / "gen"))
    with pytest.raises(PartiError, match="generator checkpoint, not a tokenizer"):
        parti.load_tokenizer("user/gen")


def test_the_download_allow_list_keeps_only_model_files():
    """The exact filter snapshot_download applies to the repo's file list (huggingface_hub's own)."""
    from huggingface_hub.utils import filter_repo_objects

    from parti.checkpoint import MODEL_FILES

    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "modeling.py", "README.md", "samples.png",
            "tokenizer/config.json", "tokenizer/model.safetensors", "tokenizer/evil.pkl", "text_encoder/spm.model",
            "text_encoder/config.json", "text_encoder/model.safetensors", "checkpoints/step_1/state.safetensors",
            "sub/config.json", "x/model.safetensors", "metrics.jsonl", "tokenizer/setup.py"]
    kept = sorted(filter_repo_objects(items=repo, allow_patterns=list(MODEL_FILES)))
    assert kept == sorted(["config.json", "model.safetensors", "tokenizer/config.json", "tokenizer/model.safetensors",
                           "text_encoder/spm.model", "text_encoder/config.json", "text_encoder/model.safetensors"])


def test_parti_sample_from_the_hub_cache_with_the_network_off(cached_repo, traps, tmp_path, capsys):
    from parti.cli import main

    out = tmp_path / "grid.png"
    code = main(["-q", "sample", "--checkpoint", "user/tiny", "--prompt", "red hair", "--prompt", "a hat",
                 "--num-images", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes().startswith(b"\x89PNG")
    assert not traps[0].exists()


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("parti: error:"), err
    return err[0]


def test_a_repo_neither_local_nor_cached_offline_is_one_line(hub_cache, tmp_path, capsys, monkeypatch):
    from parti.cli import main

    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, main(["sample", "--checkpoint", "someone/missing", "--prompt", "x"]))
    assert "someone/missing" in line and "go online" in line and "HF_HUB_OFFLINE" in line
    with pytest.raises(PartiError, match="someone/missing@v2 .*go online"):
        __import__("parti").load_pipeline("someone/missing@v2")


@pytest.mark.parametrize("name", ["user/na me", "us$er/name", "user/name!", "user/-name", "user/na--me",
                                  "user/name@bad rev", "user/name@a..b", "user/" + "n" * 100])
def test_bad_repo_ids_are_refused_before_any_lookup(name, hub_cache, monkeypatch, tmp_path):
    import huggingface_hub

    import parti

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up " + name))
    with pytest.raises(PartiError) as info:
        parti.load_pipeline(name)
    assert "\n" not in str(info.value) and ("repo id" in str(info.value) or "revision" in str(info.value))


def test_paths_are_never_looked_up(hub_cache, monkeypatch, tmp_path):
    import huggingface_hub

    import parti

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up a path"))
    for name in ("./user/name", "a/b/c", str(tmp_path / "nope"), "~/x/y", "gen"):
        with pytest.raises(PartiError, match="does not exist"):
            parti.load_pipeline(name)


def test_an_existing_local_folder_wins_over_a_repo_id(tiny_folders, cached_repo, monkeypatch, tmp_path):
    """The cache holds the untrained tiny generator; the local user/tiny folder holds other weights."""
    import huggingface_hub

    import parti
    from parti.generator import load_generator, save_generator

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_folders / "gen", tmp_path / "user" / "tiny")
    model, data = load_generator(tmp_path / "user" / "tiny")
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_generator(model, tmp_path / "user" / "tiny", extra={k: data[k] for k in ("tokenizer_fingerprint", "text_encoder")})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up the Hub"))
    pipe = parti.load_pipeline("user/tiny", device="cpu", dtype="fp32")
    assert torch.equal(pipe.generator.head.weight, model.head.weight)


# ----------------------------------------------------------------------------------------------------
# push


@pytest.fixture
def run_folder(tiny_folders, tmp_path):
    """A generator run folder as training leaves it: model files plus state, caches, metrics, samples."""
    run = tmp_path / "demo" / "generator"
    shutil.copytree(tiny_folders / "gen", run)
    config = json.loads((run / "config.json").read_text())
    config["data"] = "synthetic"
    (run / "config.json").write_text(json.dumps(config))
    for rel, data in {"checkpoints/step_0000010/state.safetensors": b"state", "checkpoints/step_0000010/state.json": b"{}",
                      "metrics.jsonl": b'{"step": 1}\n', "run.json": b"{}", "cache/manifest.json": b"{}",
                      "samples/step_0000010.png": b"\x89PNG old", "samples/step_0000020.png": b"\x89PNG new",
                      "eval.json": json.dumps({"fid": 123.4, "val_loss": 5.25}).encode()}.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    (run.parent / "demo.json").write_text(json.dumps({"attribute_accuracy": {
        "attribute_accuracy.hair_color": 0.75, "chance.hair_color": 1 / 6}}))
    return run


UPLOADED = {"README.md", "samples.png", "config.json", "model.safetensors", "tokenizer/config.json",
            "tokenizer/model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors"}


def test_prepare_upload_holds_exactly_the_model_files_card_and_samples(run_folder, tmp_path):
    import parti
    from parti.push import prepare_upload

    folder = prepare_upload(run_folder, tmp_path / "upload", repo_id="user/faces")
    files = folder_files(folder)
    assert set(files) == UPLOADED
    assert files["samples.png"] == b"\x89PNG new"  # the latest grid
    for rel in UPLOADED - {"README.md", "samples.png"}:
        assert files[rel] == (run_folder / rel).read_bytes()
    assert parti.load_pipeline(folder, device="cpu").tokenizer.fingerprint() == \
        parti.load_pipeline(run_folder, device="cpu").tokenizer.fingerprint()
    with pytest.raises(PartiError, match="not empty"):
        prepare_upload(run_folder, folder)


def test_model_card_sections(run_folder, tmp_path):
    import yaml

    from parti.push import prepare_upload

    card = (prepare_upload(run_folder, tmp_path / "up", repo_id="user/faces") / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "parti" and meta["pipeline_tag"] == "text-to-image" and meta["license"] == "other"
    headings = [line for line in body.splitlines() if line.startswith("## ")]
    assert headings == ["## Model", "## Training data", "## Parameters", "## Evaluation", "## Samples", "## Use"]
    assert "synthetic captioned faces" in body and "no third-party licence" in body
    assert "| generator" in body and "| image tokenizer" in body and "| text encoder" in body
    assert "fid" in body and "123.4" in body and "val_loss" in body  # eval.json
    assert "hair_color" in body and "75.0%" in body  # the demo's attribute accuracy (demo.json one folder up)
    assert "![samples](samples.png)" in body
    assert 'parti.load_pipeline("user/faces")' in body and "parti sample --checkpoint user/faces" in body


def test_model_card_of_an_ffhq_run_is_non_commercial(run_folder, tmp_path):
    import yaml

    from parti.push import prepare_upload

    config = json.loads((run_folder / "config.json").read_text())
    config["data"] = "/data/ffhq-128"
    (run_folder / "config.json").write_text(json.dumps(config))
    for name in ("eval.json", "samples"):
        shutil.rmtree(run_folder / name) if (run_folder / name).is_dir() else (run_folder / name).unlink()
    (run_folder.parent / "demo.json").unlink()
    card = (prepare_upload(run_folder, tmp_path / "up") / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "cc-by-nc-sa-4.0"
    assert "FFHQ" in card and "non-commercial" in card and "## Samples" not in card
    assert "No evaluation was run" in card and "<user>/<name>" in card
    assert "dataset card states no licence" not in card  # a local copy: no claim about a Hub card


def test_model_card_of_the_captioned_set_says_its_card_names_no_licence(run_folder, tmp_path):
    from parti.push import prepare_upload

    config = json.loads((run_folder / "config.json").read_text())
    config["data"] = "hf:cr7Por/ffhq_controlnet_5_2_23"
    (run_folder / "config.json").write_text(json.dumps(config))
    card = (prepare_upload(run_folder, tmp_path / "up") / "README.md").read_text()
    assert "cc-by-nc-sa-4.0" in card and "CC BY-NC-SA 4.0" in card  # the images: FFHQ's terms
    assert "`cr7Por/ffhq_controlnet_5_2_23`, whose dataset card states no licence" in card  # the captions: none


def test_push_to_hub_uploads_the_prepared_folder_once(run_folder, monkeypatch):
    import huggingface_hub

    from parti.push import push_to_hub

    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            sent["token"] = token

        def create_repo(self, repo_id, *, private, exist_ok):
            sent["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, *, repo_id, folder_path, commit_message):
            assert "files" not in sent, "upload_folder called twice"
            sent["files"] = folder_files(Path(folder_path))  # the temporary folder goes away after the call
            sent["upload"] = (repo_id, commit_message)
            return "https://hub.example/user/faces/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(run_folder, "user/faces", private=True)
    assert url.endswith("/commit/1") and sent["repo"] == ("user/faces", True, True)
    assert set(sent["files"]) == UPLOADED and sent["upload"][0] == "user/faces"
    assert b"user/faces" in sent["files"]["README.md"]


def test_parti_push_refuses_a_bad_repo_id_in_one_line(run_folder, monkeypatch, capsys):
    import huggingface_hub

    from parti.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **k: pytest.fail("reached the Hub"))
    line = one_line_error(capsys, main(["push", "--checkpoint", str(run_folder), "--repo", "user/bad name"]))
    assert "repo id" in line
