"""Image sources: folders of odd files, parquet/imagefolder tables, synthetic faces, loaders and resume."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from parti.batches import batch_stream
from parti.data import (
    UnreadableImageWarning,
    collate,
    folder_train_count,
    open_source,
    to_tensor,
)
from parti.errors import PartiError
from parti.synthetic import HOLDOUT_COMBINATIONS, read_attributes

S = 16


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No network and a private, empty Hugging Face home (tables are read in place: nothing goes there)."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


def rgb(w: int, h: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), color)


@pytest.fixture
def image_folder(tmp_path):
    """Nine image-named files in nested folders (two broken) plus files that are not images."""
    root = tmp_path / "faces"
    (root / "a" / "b").mkdir(parents=True)
    rgb(40, 30, (200, 10, 10)).save(root / "a" / "00.png")
    (root / "a" / "00.txt").write_text("a red square\n")
    Image.new("L", (20, 20), 128).save(root / "a" / "b" / "01.png")
    Image.new("RGBA", (24, 24), (0, 0, 0, 0)).save(root / "02.png")  # fully transparent -> white
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.save(root / "03.png", transparency=0)  # transparent palette index -> white
    Image.fromarray(np.full((20, 20), 128 * 257, np.uint16)).save(root / "04.png")  # 16-bit mid grey
    rgb(10, 10, (10, 200, 10)).save(root / "05.png")  # smaller than S: upscaled
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "06.jpg")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "empty.jpg").write_bytes(b"")
    rgb(20, 20, (10, 10, 200)).save(root / "zz.webp")  # last sorted: the val image
    (root / "notes.txt").write_text("not an image")
    (root / "meta.json").write_text("{}")
    (root / "LICENSE").write_text("free")
    return root


def test_folder_reads_every_mode_and_skips_broken_files(image_folder):
    source = open_source(str(image_folder), image_size=S)
    assert len(source) == 9  # 10 image-named files; the last 10% (one) is val
    with pytest.warns(UnreadableImageWarning) as caught:
        items = [source[i] for i in range(len(source))]
    assert len(caught) == 2 and source.skipped == 2
    assert {str(w.message).split(":")[0].rsplit("/", 1)[-1] for w in caught} == {"bad.png", "empty.jpg"}
    good = {source.files[it["index"]].name: it for it in items if it is not None}
    assert len(good) == 7
    for item in good.values():
        x = item["image"]
        assert x.shape == (3, S, S) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    assert torch.all(good["02.png"]["image"] == 1) and torch.all(good["03.png"]["image"] == 1)
    assert good["04.png"]["image"].abs().max() < 0.01  # 16-bit scaled, not clipped to white
    assert good["01.png"]["image"].abs().max() < 0.01
    assert good["00.png"]["caption"] == "a red square" and good["05.png"]["caption"] is None
    assert good["06.jpg"]["image"][0].mean() > 0.5  # CMYK (0, 255, 255, 0) is red
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file: a second epoch is silent
        assert source[[it is None for it in items].index(True)] is None
    assert source.skipped == 2
    val = open_source(str(image_folder), split="val", image_size=S)
    assert len(val) == 1 and val.files[0].name == "zz.webp"


def test_folder_split_rule():
    assert folder_train_count(70_000) == 60_000  # FFHQ: 00000-59999 train, 60000-69999 val
    assert [folder_train_count(n) for n in (1, 2, 9, 10, 100, 69_999)] == [1, 1, 8, 9, 90, 63_000]


def test_to_tensor_crops_the_centre_and_flips():
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste(rgb(20, 20, (0, 255, 0)), (20, 0))
    x = to_tensor(img, 8)
    assert torch.allclose(x[:, 2:6, 2:6], torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.02)  # green middle
    asym = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    assert torch.equal(to_tensor(asym, 8, flip=True), to_tensor(asym, 8).flip(2))
    assert to_tensor(Image.new("I;16", (5, 7)), 12).shape == (3, 12, 12)


def test_folder_errors(tmp_path):
    with pytest.raises(PartiError, match="no such file or folder"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(PartiError, match="no images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(PartiError, match="no readable images"):
        open_source(str(tmp_path / "broken"))
    (tmp_path / "one").mkdir()
    rgb(8, 8, (1, 2, 3)).save(tmp_path / "one" / "x.png")
    with pytest.raises(PartiError, match="too few"):
        open_source(str(tmp_path / "one"), split="val")
    with pytest.raises(PartiError, match="split"):
        open_source("synthetic", split="test")


def write_table(folder, n: int = 40, *, caption_key: str = "text", corrupt: int | None = None):
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    images = [rgb(12, 12, (i * 6, 100, 200)) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), caption_key: datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": images, caption_key: [f"face {i}" for i in range(n)]},
                                       features=features)
    if corrupt is not None:
        table = table.cast_column("image", datasets.Image(decode=False))
        table = table.map(lambda row, i: {"image": {"bytes": b"junk", "path": None} if i == corrupt else row["image"]},
                          with_indices=True)
    path = folder / "data.parquet"
    table.to_parquet(str(path))
    return path


def test_parquet_file_and_folder(tmp_path):
    path = write_table(tmp_path / "pq", corrupt=5)
    train = open_source(str(path), image_size=S)
    val = open_source(str(path), split="val", image_size=S)
    assert (len(train), len(val)) == (38, 2)  # every 20th row is val
    assert val[0]["caption"] == "face 19" and train[19]["caption"] == "face 20"
    assert train[0]["image"].shape == (3, S, S)
    with pytest.warns(UnreadableImageWarning):
        assert train[5] is None
    assert train.skipped == 1
    folder = open_source(str(tmp_path / "pq"), image_size=S)  # a folder of parquet files
    hub = open_source(f"hf:{tmp_path / 'pq'}", image_size=S)  # load_dataset(NAME) path
    assert len(folder) == len(hub) == 38 and hub[3]["caption"] == "face 3"


def test_table_column_errors(tmp_path):
    path = write_table(tmp_path / "pq", n=20)
    with pytest.raises(PartiError, match=r"column 'caption' not in dataset; columns are \['image', 'text'\]"):
        open_source(str(path), caption_column="caption")
    with pytest.raises(PartiError, match="pass --image-column"):
        open_source(str(path), image_column="img")
    other = write_table(tmp_path / "other", n=20, caption_key="image_caption")
    # The captioned FFHQ's column, found without a flag (it once fell back to 'text' and failed)
    assert open_source(str(other), image_size=S)[0]["caption"] == "face 0"
    assert open_source(str(other), caption_column="image_caption", image_size=S)[0]["caption"] == "face 0"
    images_only = open_source(str(other), caption_column="none", image_size=S)
    assert images_only[0]["caption"] is None and not images_only.has_captions
    with pytest.raises(PartiError, match="not in the Hugging Face cache"):
        open_source("hf:nobody/no-such-dataset")


def test_columns_are_chosen_on_purpose_and_logged(tmp_path, caplog):
    """Hostile input (issue 28; the table rows are in tests/test_bad_input.py): the image column is taken by
    name, or alone when its name says no condition; a caption column must hold text; the choice is logged."""
    import logging

    from parti.data import find_columns, is_condition_name

    assert all(is_condition_name(c) for c in ("conditioning_image", "mask", "depth_map", "canny-edges",
                                               "control_net_hint", "Segmentation", "pose"))
    assert not any(is_condition_name(c) for c in ("image", "photo", "face", "jpg", "target_image"))
    with pytest.raises(PartiError, match="named like a condition"):
        find_columns(["conditioning_image", "text"], images=["conditioning_image"], texts=["text"], image_column=None,
                     caption_column=None, spec="x")
    assert find_columns(["face", "text"], images=["face"], texts=["text"], image_column=None, caption_column=None,
                        spec="x") == ("face", "text")
    path = write_table(tmp_path / "pq", n=20, caption_key="image_caption")
    with caplog.at_level(logging.INFO, logger="parti.data"):
        open_source(str(path), image_size=S)
    assert "images from column 'image' (named like an image); captions from column 'image_caption' (named " \
           "like a caption)" in caplog.text
    with pytest.raises(PartiError, match="names no data"):
        open_source("hf:")


def test_imagefolder_with_metadata(tmp_path):
    root = tmp_path / "imf"
    (root / "img").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(25):
            rgb(20, 14, (i * 10, 0, 0)).save(root / "img" / f"{i:02d}.png")
            f.write(json.dumps({"file_name": f"img/{i:02d}.png", "text": f"caption {i}"}) + "\n")
    source = open_source(str(root), image_size=S)
    assert len(source) == 24 and source.has_captions
    captions = {source[i]["caption"] for i in range(len(source))}
    assert len(captions) == 24 and all(c.startswith("caption ") for c in captions)


def save(img: Image.Image, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_metadata(path, records: list[dict]) -> None:
    """An imagefolder metadata file in the format its suffix names (csv, jsonl or parquet)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".csv":
        pyarrow.csv.write_csv(pa.Table.from_pylist(records), path)
    else:
        pyarrow.parquet.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_imagefolder_metadata_formats(tmp_path, kind):
    """As datasets' imagefolder defines it: rows are the metadata's, `file_name` is relative to the metadata
    file's folder, images it does not name are no rows, other columns are features (here the caption)."""
    root = tmp_path / "imf"
    records = []
    for i in range(22):
        save(rgb(12, 12, (i * 10, 0, 0)), root / "img" / f"{i}.png")
        records.append({"file_name": f"img/{i}.png", "caption": f"caption {i}", "score": i})
    save(rgb(12, 12, (0, 0, 0)), root / "img" / "unlisted.png")
    write_metadata(root / f"metadata.{kind}", records)
    train = open_source(str(root), image_size=S)
    val = open_source(str(root), split="val", image_size=S)
    assert (len(train), len(val)) == (21, 1) and val[0]["caption"] == "caption 19"
    assert [train[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    assert train[2]["image"][0].mean() > train[1]["image"][0].mean()  # row 2's own, redder picture
    with pytest.raises(PartiError, match="holds int64 values"):
        open_source(str(root), caption_column="score", image_size=S)


def test_imagefolder_split_folders_and_named_image_columns(tmp_path):
    root = tmp_path / "imf"
    for split, n in (("train", 12), ("test", 5)):
        for i in range(n):
            save(rgb(12, 12, (i, 50, 0)), root / split / f"{i}.png")
        write_metadata(root / split / "metadata.jsonl",
                       [{"photo_file_name": f"{i}.png", "text": f"{split} {i}"} for i in range(n)])
    train = open_source(str(root), image_size=S)
    val = open_source(str(root), split="val", image_size=S)
    assert (len(train), len(val)) == (12, 5) and train.image_column == "photo" and val[4]["caption"] == "test 4"


def test_imagefolder_metadata_errors(tmp_path):
    root = tmp_path / "imf"
    save(rgb(12, 12, (1, 2, 3)), root / "in" / "0.png")
    rgb(12, 12, (1, 2, 3)).save(tmp_path / "secret.png")
    write_metadata(root / "metadata.jsonl", [{"file_name": "../secret.png", "text": "x"}] * 20)
    with pytest.raises(PartiError, match="outside the dataset's folder"):
        open_source(str(root), image_size=S)
    write_metadata(root / "metadata.jsonl", [{"image_path": "in/0.png", "text": "x"}] * 20)
    with pytest.raises(PartiError, match="has no file_name column"):
        open_source(str(root), image_size=S)
    (root / "metadata.jsonl").write_text('{"file_name": "in/0.png"}\n{not json\n')
    with pytest.raises(PartiError, match="could not read .*metadata.jsonl") as err:
        open_source(str(root), image_size=S)
    assert "\n" not in str(err.value)


def test_synthetic_source():
    source = open_source("synthetic", image_size=32, synthetic_length=12)
    assert len(source) == 12 and len(open_source("synthetic", split="val", image_size=32)) == 1000
    item = source[3]
    assert item["image"].shape == (3, 32, 32) and item["caption"] and item["index"] == 3
    pixels = ((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert read_attributes(pixels) == item["attributes"]  # rendered at size: no resampling
    batch = next(batch_stream(source, collate, batch_size=4, seed=0, epoch=0, start=0))[2]
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["attributes"]) == 4 and batch["skipped"] == 0
    held = open_source("synthetic", image_size=32, synthetic_length=200, holdout=True)
    pairs = {(held[i]["attributes"]["hair_color"], held[i]["attributes"]["background_color"]) for i in range(200)}
    assert not pairs & set(HOLDOUT_COMBINATIONS)


def batches(source, *, epoch: int, start: int = 0, flip: bool = True, **kwargs) -> list[tuple[list[int], torch.Tensor]]:
    """One epoch of `parti.batches.batch_stream` (training's data order), from batch `start`."""
    n = (len(source) // kwargs["batch_size"]) - start
    stream = batch_stream(source, collate, epoch=epoch, start=start, flip_prob=0.5 if flip else 0.0, **kwargs)
    return [(b["index"].tolist(), b["image"]) for _, _, b in itertools.islice(stream, n) if b is not None]


def test_loader_is_deterministic_resumable_and_flips(tmp_path):
    for i in range(30):  # left-right asymmetric images, so a flip shows
        pixels = np.zeros((S, S, 3), np.uint8)
        pixels[:, : S // 4] = (i * 8, 255, 0)
        Image.fromarray(pixels).save(tmp_path / f"{i:02d}.png")
    source = open_source(str(tmp_path), image_size=S)  # 27 train images
    run = batches(source, batch_size=4, seed=1, epoch=2)
    assert len(run) == 6 and all(len(ix) == 4 for ix, _ in run)  # drop_last
    again = batches(source, batch_size=4, seed=1, epoch=2)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(run, again))
    resumed = batches(source, batch_size=4, seed=1, epoch=2, start=3)
    assert len(resumed) == 3 and all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(run[3:], resumed))
    other_epoch = batches(source, batch_size=4, seed=1, epoch=3)
    assert [ix for ix, _ in run] != [ix for ix, _ in other_epoch]
    flipped = plain = 0
    for ix, images in run:
        for i, image in zip(ix, images):
            original = source[i]["image"]
            flipped += torch.equal(image, original.flip(2))
            plain += torch.equal(image, original)
    assert flipped > 0 and plain > 0 and flipped + plain == 24
    no_flip = batches(source, batch_size=4, seed=1, epoch=2, flip=False)
    assert [ix for ix, _ in no_flip] == [ix for ix, _ in run]  # flips drawn after the order: the same order
    assert all(torch.equal(img, source[i]["image"]) for ix, images in no_flip for i, img in zip(ix, images))
    workers = batches(source, batch_size=4, seed=1, epoch=2, num_workers=2)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(run, workers))


def test_collate_drops_unreadable_items():
    item = {"image": torch.zeros(3, 2, 2), "caption": None, "index": 4}
    batch = collate([None, item, None])
    assert batch["image"].shape == (1, 3, 2, 2) and batch["skipped"] == 2 and batch["index"].tolist() == [4]
    assert collate([None, None]) is None
