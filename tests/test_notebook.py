"""parti.ipynb: cells only call the package, the committed file carries no outputs, and it runs end to end.

The end-to-end run executes a copy of the notebook with nbclient in small mode (PARTI_NOTEBOOK_SMALL=1:
tiny models, a few steps, synthetic faces, nothing downloaded), in a kernel of this very interpreter, with
the run folders in a temporary folder; with a second, shorter run that checks a rerun resumes, the file
takes about two minutes on two busy CPU cores.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from parti import notebook
from parti.errors import PartiError

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parent.parent / "parti.ipynb"
HAS_EVALUATE = importlib.util.find_spec("parti.evaluate") is not None


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0]


# ---------------------------------------------------------------------------------------------------------------
# The committed notebook


def test_notebook_is_valid_and_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in code_cells(nb):
        assert cell.outputs == [], f"committed notebook carries outputs:\n{cell.source[:200]}"
        assert cell.execution_count is None
    assert "widgets" not in nb.metadata  # no saved widget state from a run either


def test_code_cells_define_no_functions_or_classes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in code_cells(nb):
        for line in cell.source.splitlines():
            stripped = line.lstrip()
            assert not stripped.startswith(("def ", "async def ", "class ")), (
                f"a notebook cell defines {stripped!r}; put it in the parti package and call it")
            assert "lambda" not in stripped, f"a notebook cell holds logic: {stripped!r}"


def test_notebook_has_the_sections_and_resumes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert [h.split(". ", 1)[1].split(":")[0] for h in headings] == [
        "Setup", "Configuration", "Data", "Stage 1", "Stage 2", "Generate from new prompts", "Evaluation"]
    for tag in ("train-tokenizer", "train-generator"):
        assert "resume=True" in tagged(nb, tag).source
    install = tagged(nb, "install").source
    assert "find_spec(\"parti\") is None" in install  # skipped wherever parti is installed
    assert "torch" not in install.split("find_spec")[1]  # the install never names torch: Colab's stays
    assert "#@param" in tagged(nb, "parameters").source


# ---------------------------------------------------------------------------------------------------------------
# parti.notebook


def test_resolve_small_mode(monkeypatch, tmp_path):
    monkeypatch.setenv(notebook.SMALL_ENV, "1")
    monkeypatch.setenv(notebook.OUT_ENV, str(tmp_path))
    cfg = notebook.configure(data="hf:some/faces", tokenizer=dict(preset="ffhq128"), use_drive=True)
    assert cfg.small and cfg.tokenizer.data == cfg.generator.data == "synthetic"
    assert (cfg.tokenizer.preset, cfg.generator.preset) == ("tiny", "tiny")
    assert cfg.tokenizer.perceptual_weight == cfg.tokenizer.adversarial_weight == 0.0  # no VGG weights offline
    assert cfg.generator.text_encoder == "trainable" and not cfg.tokenizer_eval.download
    assert cfg.tokenizer_dir == tmp_path / "tokenizer" and cfg.generator_dir == tmp_path / "generator"
    assert cfg.tokenizer.mixed_precision in ("no", "bf16", "fp16")


def test_resolve_full_mode(monkeypatch):
    monkeypatch.delenv(notebook.SMALL_ENV, raising=False)
    cfg = notebook.configure(data="faces/", tokenizer=dict(steps=123), use_drive=True)
    assert not cfg.small and cfg.tokenizer.steps == 123
    assert cfg.generator.data == "faces/"  # not given: the same as data
    assert cfg.tokenizer_dir.parent == Path(notebook.DEFAULT_OUT)  # use_drive outside Colab: a warning, not a mount
    assert notebook.configure(generator=dict(data="hf:x")).generator.data == "hf:x"
    with pytest.raises(PartiError, match="tokenizer preset"):
        notebook.configure(tokenizer=dict(preset="huge"))


def test_environment_helpers(monkeypatch):
    assert notebook.in_colab() is False
    with pytest.raises(PartiError, match="Colab"):
        notebook.mount_drive()
    monkeypatch.setenv(notebook.SMALL_ENV, "1")
    assert notebook.small_mode() and "small mode" in notebook.describe_environment()
    monkeypatch.setenv(notebook.SMALL_ENV, "0")
    assert not notebook.small_mode()


def test_preview_data_and_latest_grid(tmp_path):
    image = notebook.preview_data("synthetic", n=3, image_size=32, synthetic_length=8)
    assert image.mode == "RGB" and image.height > 3 * 32
    with pytest.raises(PartiError, match="no sample grids"):
        notebook.latest_grid(tmp_path)
    (tmp_path / "samples").mkdir()
    image.resize((10, 10)).save(tmp_path / "samples" / "step_0000010.png")
    image.save(tmp_path / "samples" / "step_0000200.png")
    assert notebook.latest_grid(tmp_path).size == image.size


# ---------------------------------------------------------------------------------------------------------------
# End to end, small mode


def _kernel_manager(tmp_path):
    """A kernel of this interpreter (its own kernelspec in tmp), whatever kernels the machine has installed."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "parti-test")
    return KernelManager(kernel_name="parti-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def _execute(nb, *, cwd: Path, out: Path, tmp_path: Path):
    from nbclient import NotebookClient

    env = {**os.environ, notebook.SMALL_ENV: "1", notebook.OUT_ENV: str(out), "OMP_NUM_THREADS": "2",
           "MPLBACKEND": "agg"}
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    tmp = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    if not HAS_EVALUATE:  # parti.evaluate not written yet: run the rest; test_evaluation_cell skips
        nb.cells = [c for c in nb.cells if "evaluation" not in c.metadata.get("tags", [])]
    out = tmp / "runs"
    return _execute(nb, cwd=tmp, out=out, tmp_path=tmp), out, tmp


def _outputs(cell, kind):
    return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result") and kind in o.data]


def test_notebook_runs_end_to_end_in_small_mode(executed):
    nb, out, _ = executed
    errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in code_cells(nb) for o in _outputs(c, "image/png")]
    # data preview, reconstructions, tokenizer curves, codebook usage, sample grid, generator curves, new prompts
    assert len(images) >= 7
    assert len(_outputs(tagged(nb, "generate"), "image/png")) == 1
    for run in ("tokenizer", "generator"):
        assert (out / run / "config.json").exists() and (out / run / "metrics.jsonl").exists()
    assert (out / "generator" / "tokenizer" / "config.json").exists()  # the pipeline loads from one folder
    text = "".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs if o.output_type == "stream")
    assert "small mode" in text


def test_rerun_continues_from_the_last_checkpoint(executed, tmp_path):
    """Running the cells again (after a disconnect) reopens the same runs; finished ones return at once."""
    nb, out, tmp = executed
    runs = ("tokenizer", "generator")
    before = {run: (json.loads((out / run / "run.json").read_text()), (out / run / "metrics.jsonl").read_text())
              for run in runs}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:nb.cells.index(tagged(nb, "train-generator")) + 1]  # setup .. stage 2 training
    _execute(nb, cwd=tmp, out=out, tmp_path=tmp_path)
    for run in runs:
        info, metrics = before[run]
        after = json.loads((out / run / "run.json").read_text())
        assert after["started"] == info["started"]  # the same run, not a fresh one
        assert len(after["resumes"]) == len(info["resumes"]) + 1
        assert (out / run / "metrics.jsonl").read_text() == metrics  # no step ran again


@pytest.mark.skipif(not HAS_EVALUATE, reason="parti.evaluate is not written yet; the evaluation cell was skipped")
def test_evaluation_cell(executed):
    nb, _, _ = executed
    cell = tagged(nb, "evaluation")
    assert not [o for o in cell.outputs if o.output_type == "error"]
    assert "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream").strip()


def test_share_cells_push_and_serve_through_the_package():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    push, demo = tagged(nb, "push").source, tagged(nb, "web-demo").source
    assert "push_to_hub(run.generator_dir" in push and "if HUB_REPO:" in push  # skipped unless a repo is named
    assert "build_app(pipe)" in demo and "not notebook.small_mode()" in demo  # never launched by the tests' run


@pytest.mark.parametrize("layout", ["cloned-into-cwd", "checkout-is-cwd", "nothing"])
def test_install_cell_installs_a_checkout_that_is_only_a_namespace(tmp_path, layout):
    """Trap: with the repository cloned into the working folder, `find_spec` found the clone as a namespace
    package, the install was skipped and `from parti import notebook` failed. The cell's logic runs here in a
    Python without site-packages (`-S`: parti not installed), `%pip` recorded instead of run."""
    import re
    import subprocess
    import sys

    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = tagged(nb, "install").source
    source = re.sub(r'%pip install -q "(.*)"', r'INSTALLS.append(f"\1")', source)
    repo = {"cloned-into-cwd": tmp_path / "parti", "checkout-is-cwd": tmp_path, "nothing": None}[layout]
    if repo is not None:
        (repo / "parti").mkdir(parents=True)
        (repo / "parti" / "__init__.py").write_text("")
        (repo / "pyproject.toml").write_text('[project]\nname = "parti"\n')
    script = "INSTALLS = []\n" + source + "\nprint(INSTALLS)"
    # -S -E: no site-packages, no PYTHONPATH: parti is not installed, the working folder is on the path
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    if repo is None:
        assert proc.returncode != 0 and "clone or upload the repository" in proc.stderr  # says what to do
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == repr([str(repo.resolve())])  # the checkout, found by its package folder
