"""Synthetic faces: determinism, coverage, captions <-> parse_prompt, exact pixel read-back, holdout."""

from __future__ import annotations

import random

import numpy as np
import pytest

from parti.errors import PartiError
from parti.synthetic import (
    ATTRIBUTES,
    HOLDOUT_COMBINATIONS,
    READABLE_ATTRIBUTES,
    SyntheticFaces,
    chance_level,
    describe,
    heldout_caption,
    is_heldout_phrasing,
    make_caption,
    parse_prompt,
    read_attributes,
    render_face,
    sample_attributes,
)


def test_same_seed_and_index_give_same_bytes():
    a, b = SyntheticFaces(size=64, seed=3), SyntheticFaces(size=64, seed=3)
    for i in (0, 1, 977):
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
        assert a[i]["caption"] == b[i]["caption"] and a[i]["attributes"] == b[i]["attributes"]


def test_different_indices_and_seeds_differ():
    faces = SyntheticFaces(size=64)
    images = {faces[i]["image"].tobytes() for i in range(20)}
    assert len(images) > 15  # 2304 attribute combinations: collisions are rare
    other = SyntheticFaces(size=64, seed=1)
    assert [faces[i]["attributes"] for i in range(20)] != [other[i]["attributes"] for i in range(20)]


def test_train_and_val_differ():
    train, val = SyntheticFaces(size=32, split="train"), SyntheticFaces(size=32, split="val")
    assert [train[i]["attributes"] for i in range(20)] != [val[i]["attributes"] for i in range(20)]
    with pytest.raises(PartiError, match="split"):
        SyntheticFaces(split="test")


def test_every_value_occurs():
    faces = SyntheticFaces(size=32, length=400)
    seen = {name: set() for name in ATTRIBUTES}
    for i in range(len(faces)):
        for name, value in faces.attributes(i)[0].items():
            seen[name].add(value)
    assert seen == {name: set(values) for name, values in ATTRIBUTES.items()}


def test_captions_name_background_and_hair():
    faces = SyntheticFaces(size=32, length=300)
    phrasings = set()
    for i in range(len(faces)):
        attrs, rng = faces.attributes(i)
        caption = make_caption(attrs, rng)
        assert f"{attrs['background_color']} back" in caption and f"{attrs['hair_color']} hair" in caption
        phrasings.add(caption.split()[0])
    assert len(phrasings) >= 5


def test_parse_prompt_inverts_describe_and_captions():
    rng = random.Random(0)
    for _ in range(1000):
        attrs = sample_attributes(rng)
        assert parse_prompt(describe(attrs)) == attrs
        for caption in (make_caption(attrs, rng), heldout_caption(attrs, rng)):
            parsed = parse_prompt(caption)
            assert {"background_color", "hair_color"} <= set(parsed), caption
            assert all(attrs[k] == v for k, v in parsed.items()), (caption, parsed)
            # A worn accessory is always named: an unnamed one means none is drawn.
            assert all(name in parsed for name in ("glasses", "hat") if attrs[name]), caption
    assert parse_prompt("a blond-haired man without glasses, grey background") == {
        "hair_color": "blonde", "glasses": False, "background_color": "gray"}
    assert parse_prompt("red hair on a blue background") == {"hair_color": "red", "background_color": "blue"}


def test_every_wording_of_every_attribute_occurs():
    """Every wording (accessory, background, expression, skin, subject) turns up in the training captions, and
    every attribute is named by some of them, in each position relative to the others."""
    from parti.synthetic import _ACCESSORY, _BACKGROUND, _EXPRESSION, _SUBJECTS

    faces = SyntheticFaces(size=32, length=3000)
    captions = [make_caption(*faces.attributes(i)) for i in range(len(faces))]
    text = "\n".join(captions)
    wordings = [w for ws in _ACCESSORY.values() for w in ws] + [w for ws in _EXPRESSION.values() for w in ws]
    wordings += [b.format("red").removeprefix("{} ") for b in _BACKGROUND] + ["-skinned", " skin"]
    wordings += [s.format("").strip() for s in _SUBJECTS]
    assert [w for w in wordings if w not in text] == []
    named = {name: 0 for name in ATTRIBUTES}
    orders = set()
    for caption in captions:
        parsed = parse_prompt(caption)
        for name in parsed:
            named[name] += 1
        orders.add(tuple(sorted(parsed, key=lambda n: _first_mention(caption, n))))
    assert all(count > 0.4 * len(captions) for count in named.values()), named
    assert len(orders) > 200  # many word orders, not a handful of templates


def _first_mention(caption: str, name: str) -> int:
    words = {"background_color": ("background", "backdrop"), "hair_color": ("hair",), "hair_length": ("short", "long"),
             "skin_tone": ("skin",), "expression": ("smil", "neutral"), "glasses": ("glasses",), "hat": ("hat",)}
    return min(caption.find(w) for w in words[name] if w in caption)


def test_heldout_phrasings_never_appear_in_training_captions():
    """An accessory named before both hair and background is held out: never in the train (or val) split,
    always in `heldout_caption`; with --holdout too."""
    for split, holdout in (("train", False), ("val", False), ("train", True)):
        faces = SyntheticFaces(size=32, length=2000, split=split, holdout=holdout)
        captions = [make_caption(*faces.attributes(i)) for i in range(len(faces))]  # as faces[i]["caption"]
        held = [c for c in captions if is_heldout_phrasing(c)]
        assert held == [], (split, held[:3])
    rng = random.Random(1)
    for _ in range(500):
        assert is_heldout_phrasing(heldout_caption(sample_attributes(rng), rng))
    assert is_heldout_phrasing("a person in a hat with short black hair on a yellow background")
    assert not is_heldout_phrasing("a person with short black hair wearing a hat on a yellow background")
    assert not is_heldout_phrasing("on a red background, glasses, blue hair")


def test_demo_prompts_parse_and_some_are_held_out():
    from parti.prompts import DEMO_PROMPTS

    for prompt in DEMO_PROMPTS:
        assert {"background_color", "hair_color"} <= set(parse_prompt(prompt)), prompt
    assert sum(map(is_heldout_phrasing, DEMO_PROMPTS)) >= 2
    assert any(not {"glasses", "hat"} <= set(parse_prompt(p)) for p in DEMO_PROMPTS)  # an accessory left unasked


@pytest.mark.parametrize("size", [32, 64, 128])
def test_read_attributes_exact(size):
    rng = random.Random(size)
    for _ in range(300):
        attrs = sample_attributes(rng)
        image = render_face(attrs, size)
        assert image.size == (size, size) and image.mode == "RGB"
        assert read_attributes(image) == {k: attrs[k] for k in READABLE_ATTRIBUTES}
    assert read_attributes(np.asarray(image)) == read_attributes(image)  # arrays work too


@pytest.mark.parametrize("size", [32, 64, 128])
def test_read_attributes_robust_to_noise(size):
    rng, noise = random.Random(1), np.random.default_rng(0)
    for _ in range(100):
        attrs = sample_attributes(rng)
        pixels = np.asarray(render_face(attrs, size)).astype(np.float64)
        noisy = np.clip(pixels + noise.normal(0, 8, pixels.shape), 0, 255).round().astype(np.uint8)
        read = read_attributes(noisy)
        assert (read["background_color"], read["hair_color"]) == (attrs["background_color"], attrs["hair_color"])
        flipped = read_attributes(np.ascontiguousarray(pixels[:, ::-1].astype(np.uint8)))
        assert flipped == {k: attrs[k] for k in READABLE_ATTRIBUTES}  # the layout is mirror-symmetric


def test_corners_show_background():
    rng = random.Random(2)
    from parti.synthetic import BACKGROUND_RGB

    for _ in range(50):
        attrs = sample_attributes(rng)
        px = np.asarray(render_face(attrs, 64))
        for corner in (px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]):
            assert tuple(corner) == BACKGROUND_RGB[attrs["background_color"]]


def test_holdout_excludes_combinations_and_keeps_other_items():
    plain, held = SyntheticFaces(size=32, length=600), SyntheticFaces(size=32, length=600, holdout=True)
    pairs, changed = set(), 0
    for i in range(len(held)):
        a, b = plain.attributes(i)[0], held.attributes(i)[0]
        pairs.add((b["hair_color"], b["background_color"]))
        if (a["hair_color"], a["background_color"]) in HOLDOUT_COMBINATIONS:
            changed += 1
        else:
            assert a == b  # only held-out items are redrawn
    assert not pairs & set(HOLDOUT_COMBINATIONS) and changed > 0
    assert len(pairs) == 36 - len(HOLDOUT_COMBINATIONS)


def test_length_and_infinite():
    faces = SyntheticFaces(size=32, length=5)
    assert len(faces) == 5 and not faces.is_infinite
    assert faces[-1]["attributes"] == faces[4]["attributes"]
    with pytest.raises(IndexError):
        faces[5]
    endless = SyntheticFaces(size=32, length=None)
    assert endless.is_infinite and endless[10**9]["caption"]
    with pytest.raises(PartiError, match="infinite"):
        len(endless)


def test_chance_level_and_bad_attributes():
    assert chance_level("hair_color") == pytest.approx(1 / 6) and chance_level("glasses") == 0.5
    with pytest.raises(PartiError, match="attributes are"):
        chance_level("beard")
    attrs = sample_attributes(random.Random(0))
    with pytest.raises(PartiError, match="hair_color"):
        render_face({**attrs, "hair_color": "green"})
