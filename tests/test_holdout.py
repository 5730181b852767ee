"""--holdout: the held-out (hair, background) pairs never reach training, in either stage, and a cache or
demo folder made the other way is refused rather than silently reused."""

import json

import numpy as np
import pytest

from parti import synthetic
from parti.cache import CodeCache, encode_dataset
from parti.cli import main
from parti.data import open_source, open_split
from parti.errors import PartiError
from parti.train_tokenizer import TokenizerTrainConfig

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _pairs(captions):
    pairs = set()
    for caption in captions:
        named = synthetic.parse_prompt(caption)
        pairs.add((named["hair_color"], named["background_color"]))
    return pairs


def test_tokenizer_split_leaves_held_out_pairs_out():
    cfg = TokenizerTrainConfig(data="synthetic", preset="tiny", holdout=True, synthetic_length=600)
    for split in ("train", "val"):
        source = open_split(cfg, split, 32)
        pixels = [np.asarray(source.faces[i]["image"]) for i in range(200)]
        read = {(a["hair_color"], a["background_color"]) for a in map(synthetic.read_attributes, pixels)}
        assert not read & set(synthetic.HOLDOUT_COMBINATIONS), split
    # Without the flag the same seed draws them (600 faces, 6 of 42 pairs: all but certain).
    plain = open_split(TokenizerTrainConfig(data="synthetic", preset="tiny", synthetic_length=600), "train", 32)
    captions = [plain.faces[i]["caption"] for i in range(600)]
    assert _pairs(captions) & set(synthetic.HOLDOUT_COMBINATIONS)


def test_cache_records_holdout_and_refuses_the_other_way(tiny_folders, tmp_path):
    out = encode_dataset(data="synthetic", tokenizer=tiny_folders / "tok", out=tmp_path / "cache",
                         synthetic_length=400, holdout=True, batch_size=100, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["holdout"] is True
    train = CodeCache(out, "train")
    assert len(train) == 400
    assert not _pairs(train.captions) & set(synthetic.HOLDOUT_COMBINATIONS)
    train.check(tokenizer_fingerprint=manifest["tokenizer_fingerprint"], text_identity=None, holdout=True)
    with pytest.raises(PartiError, match="encoded with --holdout"):
        train.check(tokenizer_fingerprint=manifest["tokenizer_fingerprint"], text_identity=None, holdout=False)


def test_holdout_needs_synthetic_data(tmp_path):
    with pytest.raises(PartiError, match="needs --data synthetic"):
        open_source(str(tmp_path), holdout=True)


def test_demo_holdout_scores_held_out_pairs_and_refuses_a_plain_folder(tmp_path, capsys):
    images = tmp_path / "images"
    common = ["-q", "demo", "--size", "smoke", "--images", str(images), "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    # The plain demo's folder is not continued as a holdout demo: its generator saw the held-out pairs.
    assert main(common + ["--out", str(tmp_path / "plain"), "--holdout"]) == 2
    err = capsys.readouterr().err
    assert "holdout: False -> True" in err and err.count("\n") == 1
    assert main(common + ["--out", str(tmp_path / "held"), "--holdout"]) == 0
    summary = json.loads((tmp_path / "held" / "demo.json").read_text())
    assert summary["holdout"] is True
    acc = summary["attribute_accuracy"]
    assert 0.0 <= acc["holdout_attribute_accuracy.hair_color"] <= 1.0
    assert (images / "demo_holdout_samples.png").stat().st_size > 0
    assert "(held-out pairs)" in capsys.readouterr().out
