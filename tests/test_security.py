"""Inputs that cannot hurt: nothing parti reads is unpickled and no config is evaluated.

Each hostile file carries a pickle payload that creates a marker file when unpickled (checked once on a
copy, so the payload is known to be live); parti must refuse it with a one-line message and the marker
must never appear.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch

from parti.cli import main
from parti.errors import PartiError

PARTI = Path(__file__).resolve().parent.parent / "parti"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if something unpickles it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def armed(tmp_path: Path, name: str, *, zip_archive: bool = False) -> tuple[Path, Path]:
    """(hostile file, its marker). A torch.save archive or a bare pickle stream, both live."""
    marker = tmp_path / f"PWNED-{name}"
    path = tmp_path / name
    if zip_archive:
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    probe = tmp_path / f"probe-{name}"
    (tmp_path / f"copy-{name}").write_bytes(pickle.dumps(Payload(probe), protocol=4))
    pickle.loads((tmp_path / f"copy-{name}").read_bytes()).close()  # the payload really fires when unpickled
    assert probe.exists()
    return path, marker


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("parti: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("zip_archive", [False, True], ids=["pickle", "torch.save"])
def test_weights_replaced_by_a_pickle_are_refused_unread(folders, tmp_path, zip_archive):
    from parti.tokenizer import load_tokenizer

    tok = copy_folder(folders / "tok", tmp_path / "tok")
    payload, marker = armed(tmp_path, "payload", zip_archive=zip_archive)
    (tok / "model.safetensors").write_bytes(payload.read_bytes())
    with pytest.raises(PartiError, match="pickle .* not safetensors; it was refused unread"):
        load_tokenizer(tok)
    assert not marker.exists()


def test_sample_refuses_a_generator_whose_weights_are_a_pickle(folders, tmp_path, capsys):
    gen = copy_folder(folders / "gen", tmp_path / "gen")
    payload, marker = armed(tmp_path, "payload")
    (gen / "model.safetensors").write_bytes(payload.read_bytes())
    code = main(["sample", "--checkpoint", str(gen), "--prompt", "x", "--out", str(tmp_path / "a.png")])
    one_line_error(capsys, code, "never unpickles")
    assert not marker.exists() and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("command", ["sample", "train", "encode"])
def test_a_pt_file_given_as_a_model_is_refused(tmp_path, capsys, command):
    payload, marker = armed(tmp_path, "model.pt", zip_archive=True)
    args = {"sample": ["sample", "--checkpoint", str(payload), "--prompt", "x", "--out", str(tmp_path / "a.png")],
            "train": ["train", "--tokenizer", str(payload), "--out", str(tmp_path / "g"), "--steps", "1", "--cpu",
                      "--no-progress"],
            "encode": ["encode", "--tokenizer", str(payload), "--data", "synthetic", "--out", str(tmp_path / "c")]}
    code = main(args[command])
    one_line_error(capsys, code, "pickle files are never loaded")
    assert not marker.exists()


def test_training_state_replaced_by_a_pickle_is_refused_on_resume(tmp_path):
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = dict(preset="tiny", steps=2, batch_size=2, synthetic_length=8, val_images=2, perceptual_weight=0.0,
               adversarial_weight=0.0, save_every=1, sample_every=2, cpu=True, progress=False,
               out=str(tmp_path / "run"))
    train_tokenizer(TokenizerTrainConfig(**cfg))
    payload, marker = armed(tmp_path, "state")
    for state in (tmp_path / "run" / "checkpoints").glob("step_*/state.safetensors"):
        state.write_bytes(payload.read_bytes())
    with pytest.raises(PartiError, match="no readable checkpoint .* never unpickles"):
        train_tokenizer(TokenizerTrainConfig(**{**cfg, "steps": 4}, resume=True))
    assert not marker.exists()


def test_third_party_pth_weights_load_tensors_only(tmp_path):
    """The one pickle-format file parti accepts (torchvision's VGG16 .pth, read once and cached as
    safetensors) goes through torch.load(weights_only=True), which refuses any callable."""
    from parti.losses import VGG16Features, load_vgg16_weights

    payload, marker = armed(tmp_path, "vgg16.pth", zip_archive=True)
    with pytest.raises(PartiError, match="not a plain weights file"):
        load_vgg16_weights(VGG16Features(), path=str(payload), allow_download=False)
    assert not marker.exists()


def test_configs_are_json_data_never_code(folders, tmp_path, capsys):
    from parti.tokenizer import load_tokenizer

    marker = tmp_path / "PWNED-config"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    tok = copy_folder(folders / "tok", tmp_path / "tok")
    config = json.loads((tok / "config.json").read_text())
    config["config"]["dim"] = code  # a string where a number belongs: a type error, not code to run
    (tok / "config.json").write_text(json.dumps(config))
    with pytest.raises(PartiError, match="'dim' must be int"):
        load_tokenizer(tok)
    (tok / "config.json").write_text("{'kind': 'tokenizer', 'config': " + code + "}")  # python, not JSON
    with pytest.raises(PartiError, match="not valid JSON"):
        load_tokenizer(tok)
    with pytest.raises(SystemExit) as exit_:  # flags are typed: an int flag given code is a usage error
        main(["train-tokenizer", "--out", str(tmp_path / "t"), "--steps", code])
    assert exit_.value.code == 2 and "invalid int value" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "t").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_the_source_never_unpickles_or_evaluates():
    """A guard for future edits: no pickle/marshal/yaml imports, no eval/exec, torch.load only with
    weights_only=True, numpy never with allow_pickle=True, no remote code."""
    problems = []
    for path in sorted(PARTI.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal",
                                                                     "shelve", "yaml", "joblib")]
                problems += [f"{path.name}:{node.lineno} imports {n}" for n in bad]
        for node, owner, name in _calls(tree):
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{path.name}:{node.lineno} calls {name}")
            if owner == "torch" and name == "load" and keywords.get("weights_only") is not True:
                problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if keywords.get("allow_pickle") is True or keywords.get("trust_remote_code") is True:
                problems.append(f"{path.name}:{node.lineno} allows pickles or remote code")
    assert not problems, problems
