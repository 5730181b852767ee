"""Built-in synthetic captioned faces: flat cartoon portraits drawn with PIL, plus their captions.

Every image is a pure function of its attributes (no noise, no gradients, no anti-aliasing), and the
attributes of item `i` are a pure function of (seed, split, i). Because colours are flat and regions
are fixed, `read_attributes` can read most attributes back from pixels exactly, which is how
evaluation checks that a generated image shows what its prompt asked for. docs/synthetic.md has the
palette, the layout in fractions of the image size, the read regions and the caption phrasings.
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from parti.errors import PartiError

ATTRIBUTES: dict[str, tuple[Any, ...]] = {
    "background_color": ("blue", "green", "red", "yellow", "purple", "gray"),
    "hair_color": ("black", "brown", "blonde", "red", "white", "blue"),
    "hair_length": ("short", "long"),
    "skin_tone": ("light", "tan", "brown", "dark"),
    "expression": ("smiling", "neutral"),
    "glasses": (False, True),
    "hat": (False, True),
}

# Flat RGB colours. Background colours are pastel and hair colours saturated or dark, so the same word
# ("red", "blue") never names two close colours; every hair colour is >= 56 apart (Euclidean RGB) from
# every skin tone and >= 90 from every background, so a misdrawn region is not misread as another.
BACKGROUND_RGB = {
    "blue": (110, 160, 240), "green": (110, 200, 110), "red": (235, 100, 100),
    "yellow": (245, 240, 100), "purple": (170, 110, 215), "gray": (155, 155, 155),
}
HAIR_RGB = {
    "black": (25, 25, 25), "brown": (130, 70, 20), "blonde": (230, 175, 40),
    "red": (200, 30, 20), "white": (245, 245, 245), "blue": (40, 60, 200),
}
SKIN_RGB = {"light": (255, 220, 190), "tan": (215, 160, 125), "brown": (165, 110, 75), "dark": (75, 45, 40)}
HAT_RGB = (0, 130, 120)
LENS_RGB = (140, 200, 230)
FRAME_RGB = (20, 20, 30)
EYE_RGB = (30, 30, 45)
MOUTH_RGB = (170, 30, 50)
SHIRT_RGB = (60, 70, 95)

# (hair_color, background_color) pairs left out of `SyntheticFaces(holdout=True)`: one per hair colour
# and one per background colour, so each colour on its own is still seen with five partners.
HOLDOUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("black", "red"), ("brown", "gray"), ("blonde", "purple"),
    ("red", "blue"), ("white", "green"), ("blue", "yellow"),
)

READABLE_ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTES)
_SPLITS = {"train": 0, "val": 1}

# Read regions (x0, y0, x1, y1) in fractions of the image; each is mirrored left/right and the median
# over both halves is classified. Each region lies inside one drawn shape for every attribute value.
_READ_REGIONS = {
    "background": (0.0, 0.0, 0.08, 0.08),   # corners: never drawn over
    "hair": (0.21, 0.36, 0.28, 0.56),       # side strips beside the eyes: hair for any hat and length
    "hair_length": (0.21, 0.68, 0.28, 0.80),  # beside the neck: long hair, else background
    "hat": (0.45, 0.17, 0.55, 0.23),        # crown: hat, else hair
    "skin": (0.44, 0.31, 0.56, 0.37),       # forehead: between the hat brim and the glasses
    "glasses": (0.36, 0.48, 0.44, 0.51),    # lens below the eye: lens tint, else skin
    "mouth": (0.46, 0.625, 0.54, 0.645),     # top of the open smile: mouth, else skin
}

DEFAULT_LENGTH = 20_000  # faces in the training split unless a length is given (CLI, API, cache)
VAL_LENGTH = 1_000  # faces in the validation split, always


def sample_attributes(rng: random.Random) -> dict:
    """One value per attribute, each uniform and independent."""
    return {name: rng.choice(values) for name, values in ATTRIBUTES.items()}


def chance_level(attribute: str) -> float:
    """Accuracy of guessing `attribute` uniformly at random."""
    if attribute not in ATTRIBUTES:
        raise PartiError(f"unknown attribute {attribute!r}; attributes are {list(ATTRIBUTES)}")
    return 1.0 / len(ATTRIBUTES[attribute])


def _check_attributes(attrs: dict) -> None:
    for name, values in ATTRIBUTES.items():
        if attrs.get(name) not in values:
            raise PartiError(f"attribute {name}={attrs.get(name)!r} is not one of {list(values)}")


def render_face(attrs: dict, size: int = 128) -> Image.Image:
    """Draw the portrait for `attrs` as a size x size RGB image (flat colours, no anti-aliasing)."""
    _check_attributes(attrs)
    if size < 16:
        raise PartiError(f"synthetic faces need size >= 16, got {size}")
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[attrs["background_color"]])
    draw = ImageDraw.Draw(img)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        # Fractions -> inclusive pixel box; rounding both ends keeps left/right features mirror images.
        left, top = round(x0 * size), round(y0 * size)
        return left, top, max(left, round(x1 * size) - 1), max(top, round(y1 * size) - 1)  # >= 1 pixel

    hair, skin = HAIR_RGB[attrs["hair_color"]], SKIN_RGB[attrs["skin_tone"]]
    line = max(1, round(0.02 * size))  # glasses frame width
    radius = max(1, round(0.06 * size))
    draw.ellipse(box(0.14, 0.84, 0.86, 1.30), fill=SHIRT_RGB)  # shoulders
    if attrs["hair_length"] == "long":
        draw.rounded_rectangle(box(0.20, 0.30, 0.80, 0.92), radius=radius, fill=hair)  # falls to shoulders
    draw.rectangle(box(0.43, 0.70, 0.57, 0.88), fill=skin)  # neck
    draw.ellipse(box(0.26, 0.14, 0.74, 0.54), fill=hair)  # crown, mostly hidden by the face
    draw.rounded_rectangle(box(0.20, 0.28, 0.32, 0.62), radius=radius, fill=hair)  # side strips
    draw.rounded_rectangle(box(0.68, 0.28, 0.80, 0.62), radius=radius, fill=hair)
    draw.ellipse(box(0.30, 0.26, 0.70, 0.78), fill=skin)  # face
    if attrs["glasses"]:
        draw.rectangle(box(0.33, 0.37, 0.47, 0.55), fill=LENS_RGB, outline=FRAME_RGB, width=line)
        draw.rectangle(box(0.53, 0.37, 0.67, 0.55), fill=LENS_RGB, outline=FRAME_RGB, width=line)
        draw.rectangle(box(0.47, 0.43, 0.53, 0.43 + line / size), fill=FRAME_RGB)  # bridge
    draw.ellipse(box(0.37, 0.41, 0.43, 0.47), fill=EYE_RGB)
    draw.ellipse(box(0.57, 0.41, 0.63, 0.47), fill=EYE_RGB)
    if attrs["expression"] == "smiling":
        draw.pieslice(box(0.40, 0.52, 0.60, 0.72), 0, 180, fill=MOUTH_RGB)  # lower half: open smile
    else:
        draw.rectangle(box(0.41, 0.67, 0.59, 0.70), fill=MOUTH_RGB)  # straight line
    if attrs["hat"]:
        draw.chord(box(0.27, 0.08, 0.73, 0.44), 180, 360, fill=HAT_RGB)  # dome over the crown
        draw.rectangle(box(0.20, 0.23, 0.80, 0.30), fill=HAT_RGB)  # brim
    return img


def _region_median(pixels: np.ndarray, name: str) -> np.ndarray:
    """Per-channel median (3,) over a read region and its left/right mirror."""
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = _READ_REGIONS[name]
    r0, r1 = round(y0 * h), max(round(y1 * h), round(y0 * h) + 1)  # at least one row and column
    c0, c1 = round(x0 * w), max(round(x1 * w), round(x0 * w) + 1)
    parts = [pixels[r0:r1, c0:c1], pixels[r0:r1, w - c1:w - c0]]
    if name == "background":  # all four corners
        parts += [pixels[h - r1:h - r0, c0:c1], pixels[h - r1:h - r0, w - c1:w - c0]]
    return np.median(np.concatenate([p.reshape(-1, 3) for p in parts]), axis=0)


def _nearest(rgb: np.ndarray, palette: dict | list[tuple[Any, tuple]]) -> Any:
    """The label of the palette colour nearest to `rgb`; a list palette may give a label several colours."""
    pairs = list(palette.items()) if isinstance(palette, dict) else palette
    colors = np.array([c for _, c in pairs], dtype=np.float64)
    return pairs[int(np.argmin(((colors - rgb) ** 2).sum(axis=1)))][0]


def read_attributes(image: Image.Image | np.ndarray) -> dict:
    """Read READABLE_ATTRIBUTES back from a rendered (or generated) face.

    Exact on `render_face` output at every size from 27 to 130 px (checked over all 2,304 attribute
    combinations, and at 160-512) and on mirrored images; below 27 px glasses/expression can be misread.

    Each attribute is the nearest palette colour to the median over a fixed region, so mild noise
    and blur do not change the answer; the on/off attributes compare against the colour seen when
    the feature is absent (hair under the hat, skin under the glasses and the smile).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise PartiError(f"read_attributes needs an RGB image of shape (H, W, 3), got {pixels.shape}")
    background = _nearest(_region_median(pixels, "background"), BACKGROUND_RGB)
    hair = _nearest(_region_median(pixels, "hair"), HAIR_RGB)
    skin = _nearest(_region_median(pixels, "skin"), SKIN_RGB)
    hair_rgb, skin_rgb = HAIR_RGB[hair], SKIN_RGB[skin]
    return {
        "background_color": background,
        "hair_color": hair,
        "hair_length": _nearest(_region_median(pixels, "hair_length"),
                                {"long": hair_rgb, "short": BACKGROUND_RGB[background]}),
        "skin_tone": skin,
        "expression": _nearest(_region_median(pixels, "mouth"), {"smiling": MOUTH_RGB, "neutral": skin_rgb}),
        "glasses": _nearest(_region_median(pixels, "glasses"),  # below ~28 px the region can hit the frame
                            [(True, LENS_RGB), (True, FRAME_RGB), (False, skin_rgb)]),
        "hat": _nearest(_region_median(pixels, "hat"), {True: HAT_RGB, False: hair_rgb}),
    }


# ---- captions ----------------------------------------------------------------------------------
# A caption is an optional subject ("portrait of a smiling person") and clauses naming attributes, in a
# random order and with a random wording each. It always names the background and hair colours; a worn
# accessory is always named, so an unnamed one means none (an absent one is sometimes negated); hair
# length, skin and expression are named often. Held-out phrasings: an accessory named before both the hair
# and the background ("a person in a hat with black hair on a red background"). No caption `make_caption`
# writes is phrased so, and every one `heldout_caption` writes is (`is_heldout_phrasing` tells them apart).

_ACCESSORY_WORD = re.compile(r"\b(?:glasses|hat|hatless)\b")
_PREPOSITIONS = ("with", "on", "against", "in", "wearing", "without")
_BACKGROUND = ("on a {} background", "against a {} background", "in front of a {} background", "{} background",
               "{} backdrop")
_ACCESSORY = {  # (attribute, worn): wordings; the bare first one is what a joint clause uses
    ("glasses", True): ("glasses", "wearing glasses", "with glasses", "in glasses"),
    ("glasses", False): ("no glasses", "without glasses"),
    ("hat", True): ("a hat", "wearing a hat", "with a hat", "in a hat"),
    ("hat", False): ("no hat", "without a hat", "hatless"),
}
_EXPRESSION = {"smiling": ("smiling", "with a smile"), "neutral": ("neutral", "neutral-looking", "not smiling")}
_SUBJECTS = ("a {}person", "a {}face", "portrait of a {}person", "cartoon of a {}person", "close-up of a {}face")


def _accessory_clauses(a: dict, rng: random.Random, *, force: bool) -> list[str]:
    """Worn accessories always, absent ones half the time (force: at least one clause)."""
    named = [name for name in ("glasses", "hat") if a[name] or rng.random() < 0.5]
    if force and not named:
        named = [rng.choice(("glasses", "hat"))]
    if len(named) == 2 and rng.random() < 0.3:  # one clause for both: "wearing glasses and a hat"
        order = sorted(rng.sample(named, 2), key=lambda n: not a[n])  # "glasses and no hat", not the reverse
        bare = [_ACCESSORY[n, a[n]][0] for n in order]
        verb = rng.choice(("", "with ", "wearing ", "in ")) if a["glasses"] and a["hat"] else ""
        return [f"{verb}{bare[0]} and {bare[1]}"]
    return [rng.choice(_ACCESSORY[n, a[n]]) for n in named]


def _clauses(a: dict, rng: random.Random, *, force_accessory: bool) -> tuple[str, list[str], list[str]]:
    """(subject adjectives, [hair clause, background clause], accessory clauses + other clauses)."""
    hair = f"{a['hair_length']} {a['hair_color']} hair" if rng.random() < 0.7 else f"{a['hair_color']} hair"
    anchors = [rng.choice(("with ", "")) + hair, rng.choice(_BACKGROUND).format(a["background_color"])]
    adjectives, others = [], []
    if rng.random() < 0.7:  # expression: an adjective of the subject or a clause
        if rng.random() < 0.5:
            adjectives.append("smiling" if a["expression"] == "smiling" else rng.choice(("neutral", "neutral-looking")))
        else:
            others.append(rng.choice(_EXPRESSION[a["expression"]]))
    if rng.random() < 0.6:
        if rng.random() < 0.4:
            adjectives.append(f"{a['skin_tone']}-skinned")
        else:
            others.append(rng.choice(("{} skin", "with {} skin")).format(a["skin_tone"]))
    return " ".join(adjectives), anchors, _accessory_clauses(a, rng, force=force_accessory) + others


def _assemble(adjectives: str, clauses: list[str], rng: random.Random) -> str:
    """Subject (unless a tag list) and clauses: before a preposition often a space, else a comma."""
    if not adjectives and rng.random() < 0.25:  # tag list: "blue background, short red hair, glasses"
        return ", ".join(c.removeprefix("with ") for c in clauses)
    text = rng.choice(_SUBJECTS).format(adjectives + " " if adjectives else "")
    for i, clause in enumerate(clauses):
        last = i == len(clauses) - 1 and i > 0
        if clause.split()[0] in _PREPOSITIONS and rng.random() < 0.6:
            text += " " + clause
        else:
            text += (" and " if last and rng.random() < 0.4 else ", ") + clause
    return text


def make_caption(attrs: dict, rng: random.Random) -> str:
    """A training caption: many wordings and word orders, never a held-out phrasing (see above)."""
    _check_attributes(attrs)
    adjectives, anchors, rest = _clauses(attrs, rng, force_accessory=False)
    clauses = anchors + rest
    rng.shuffle(clauses)
    first_anchor = min(i for i, c in enumerate(clauses) if c in anchors)
    first_accessory = next((i for i, c in enumerate(clauses) if _ACCESSORY_WORD.search(c)), len(clauses))
    if first_accessory < first_anchor:  # a held-out phrasing: swap the two
        clauses[first_accessory], clauses[first_anchor] = clauses[first_anchor], clauses[first_accessory]
    return _assemble(adjectives, clauses, rng)


def heldout_caption(attrs: dict, rng: random.Random) -> str:
    """A caption in a held-out phrasing: an accessory clause before the hair and background (evaluation)."""
    _check_attributes(attrs)
    adjectives, anchors, rest = _clauses(attrs, rng, force_accessory=True)
    first = rng.choice([c for c in rest if _ACCESSORY_WORD.search(c)])
    others = [c for c in anchors + rest if c != first]
    rng.shuffle(others)
    return _assemble(adjectives, [first] + others, rng)


def is_heldout_phrasing(text: str) -> bool:
    """Whether `text` names glasses or a hat before both its hair colour and its background colour."""
    text = text.lower()
    accessory, hair, background = _ACCESSORY_WORD.search(text), _HAIR.search(text), _BG.search(text)
    ends = [m.start() for m in (hair, background) if m]
    return accessory is not None and bool(ends) and accessory.start() < min(ends)


def _looking(attrs: dict) -> str:
    return "smiling" if attrs["expression"] == "smiling" else "neutral-looking"


def describe(attrs: dict) -> str:
    """The canonical caption naming every attribute (used as evaluation prompts)."""
    _check_attributes(attrs)
    glasses = "glasses" if attrs["glasses"] else "no glasses"
    hat = "a hat" if attrs["hat"] else "no hat"
    return (f"a {_looking(attrs)} person with {attrs['hair_length']} {attrs['hair_color']} hair, "
            f"{attrs['skin_tone']} skin, {glasses} and {hat} on a {attrs['background_color']} background")


_ALIASES = {"grey": "gray", "blond": "blonde"}
_BG = re.compile(r"\b(blue|green|red|yellow|purple|gray|grey)[\s-]+(?:background|backdrop)\b")
_HAIR = re.compile(r"\b(?:(short|long)[\s-]+)?(black|brown|blonde|blond|red|white|blue)[\s-]+hair")
_SKIN = re.compile(r"\b(light|tan|brown|dark)[\s-]+skin")


def parse_prompt(text: str) -> dict:
    """The attribute values a prompt names (the inverse of `make_caption` and `describe`).

    Only attributes the text mentions are returned; "no glasses" / "without a hat" give False.
    """
    text = text.lower()
    found: dict[str, Any] = {}
    if m := _BG.search(text):
        found["background_color"] = _ALIASES.get(m.group(1), m.group(1))
    if m := _HAIR.search(text):
        found["hair_color"] = _ALIASES.get(m.group(2), m.group(2))
        if m.group(1):
            found["hair_length"] = m.group(1)
    if m := _SKIN.search(text):
        found["skin_tone"] = m.group(1)
    if re.search(r"\bnot smiling\b|\bneutral|\bserious\b", text):
        found["expression"] = "neutral"
    elif re.search(r"\bsmil(?:ing|e)\b", text):
        found["expression"] = "smiling"
    if re.search(r"\b(?:no|without(?: any)?)\s+glasses\b", text):
        found["glasses"] = False
    elif re.search(r"\bglasses\b", text):
        found["glasses"] = True
    if re.search(r"\b(?:no|without(?: a)?)\s+hat\b|\bhatless\b", text):
        found["hat"] = False
    elif re.search(r"\bhat\b", text):
        found["hat"] = True
    return found


# ---- dataset -----------------------------------------------------------------------------------

class SyntheticFaces:
    """Indexable captioned faces; item i is a pure function of (seed, split, i, size, holdout).

    `length=None` makes it infinite (any index >= 0 works; `len()` raises, check `is_infinite`).
    `holdout=True` redraws, deterministically, any item whose (hair_color, background_color) is in
    HOLDOUT_COMBINATIONS; the other items are the same as with `holdout=False`.
    """

    def __init__(self, *, size: int = 128, length: int | None = DEFAULT_LENGTH, seed: int = 0, split: str = "train",
                 holdout: bool = False):
        if split not in _SPLITS:
            raise PartiError(f"unknown split {split!r}; synthetic splits are {list(_SPLITS)}")
        if length is not None and length < 1:
            raise PartiError(f"synthetic length must be >= 1 or None (infinite), got {length}")
        if size < 16:
            raise PartiError(f"synthetic faces need size >= 16, got {size}")
        self.size, self.length, self.seed, self.split, self.holdout = size, length, seed, split, holdout

    @property
    def is_infinite(self) -> bool:
        return self.length is None

    def __len__(self) -> int:
        if self.length is None:
            raise PartiError("this SyntheticFaces is infinite (length=None); check is_infinite before len()")
        return self.length

    def attributes(self, index: int) -> tuple[dict, random.Random]:
        """Attributes of item `index` and the item's RNG (positioned for its caption)."""
        # One RNG stream per (seed, split, index): distinct integers seed independent Mersenne Twisters.
        rng = random.Random((self.seed * 4 + _SPLITS[self.split]) * 2**40 + index)
        attrs = sample_attributes(rng)
        while self.holdout and (attrs["hair_color"], attrs["background_color"]) in HOLDOUT_COMBINATIONS:
            attrs = sample_attributes(rng)
        return attrs, rng

    def __getitem__(self, index: int) -> dict:
        if self.length is not None:
            if index < 0:
                index += self.length
            if not 0 <= index < self.length:
                raise IndexError(f"index {index} out of range for {self.length} synthetic faces")
        elif index < 0:
            raise IndexError("an infinite SyntheticFaces has no negative indices")
        attrs, rng = self.attributes(index)
        return {"image": render_face(attrs, self.size), "caption": make_caption(attrs, rng), "attributes": attrs}
