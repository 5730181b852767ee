"""Fixed prompt lists (under version control): periodic sample grids and evaluation."""

from __future__ import annotations

# Synthetic faces: each prompt names background and hair colour, plus other attributes.
SYNTHETIC_SAMPLE_PROMPTS = (
    "a smiling person with long red hair and glasses on a blue background",
    "a person with short black hair wearing a hat on a yellow background",
    "a neutral person with long blonde hair on a green background",
    "a smiling person with short white hair and glasses on a purple background",
)

# Captioned FFHQ: prompts in the style of cr7Por/ffhq_controlnet_5_2_23's captions.
FFHQ_SAMPLE_PROMPTS = (
    "a woman with long blonde hair smiling",
    "an old man with a gray beard wearing glasses",
    "a young boy with short brown hair",
    "a woman wearing a hat and red lipstick",
)


# `parti demo`'s grid: six prompts, each naming hair colour and background; every row leaves glasses or a hat
# unnamed (none should be drawn), and rows 4-6 name an accessory first, a held-out phrasing no training caption
# uses (parti.synthetic.is_heldout_phrasing).
DEMO_PROMPTS = (
    "a smiling person with long red hair and glasses on a blue background",
    "a person with short black hair wearing a hat on a yellow background",
    "a neutral person with long blonde hair on a green background",
    "a person in glasses with short white hair, smiling, on a purple background",
    "wearing a hat, a person with long blue hair against a gray background",
    "a neutral person in a hat with short brown hair on a red background",
)


def sample_prompts(data: str) -> tuple[str, ...]:
    return SYNTHETIC_SAMPLE_PROMPTS if data.startswith("synthetic") else FFHQ_SAMPLE_PROMPTS


# ---- evaluation ----------------------------------------------------------------------------------
# `parti evaluate --fixed-prompts` generates from these instead of the held-out captions (and falls back
# to them for data without captions). Changing a list changes every FID/CLIP number measured with it.

# Synthetic faces: every (hair_color, background_color) pair except HOLDOUT_COMBINATIONS, once each, in
# the training captions' phrasings. Attribute accuracy does not use this list: it builds its prompts from
# attributes (parti.evaluate.attribute_prompts).
SYNTHETIC_EVAL_PROMPTS = (
    "cartoon of a neutral-looking tan-skinned person with long black hair and glasses in front of a blue background",
    "a person with black hair against a green background",
    "a smiling person with short black hair and a hat on a yellow background",
    "close-up of a smiling face, long black hair, dark skin, no glasses, a hat, purple backdrop",
    "a person with black hair against a gray background",
    "on a blue background, a tan-skinned face with brown hair",
    "portrait of someone with long brown hair wearing glasses, green background",
    "red background, short brown hair, tan skin, neutral, glasses",
    "yellow background, long brown hair, brown skin, neutral",
    "close-up of a smiling face, short brown hair, light skin, no glasses, no hat, purple backdrop",
    "portrait of someone with long blonde hair wearing a hat, blue background",
    "on a green background, a dark-skinned face with blonde hair, wearing glasses",
    "close-up of a smiling face, long blonde hair, brown skin, glasses, no hat, red backdrop",
    "on a yellow background, a tan-skinned face with blonde hair, wearing glasses and a hat",
    "a person with blonde hair against a gray background",
    "portrait of someone with short red hair wearing glasses, green background",
    "a smiling person with short red hair and a hat on a red background",
    "a person with red hair against a yellow background",
    "purple background, short red hair, dark skin, smiling, glasses, hat",
    "a person with red hair against a gray background",
    "on a blue background, a tan-skinned face with white hair, wearing glasses",
    "on a red background, a light-skinned face with white hair, wearing glasses",
    "a person with white hair against a yellow background",
    "portrait of someone with long white hair wearing glasses, purple background",
    "on a gray background, a light-skinned face with white hair",
    "close-up of a smiling face, long blue hair, dark skin, glasses, a hat, blue backdrop",
    "green background, long blue hair, tan skin, smiling",
    "on a red background, a light-skinned face with blue hair, wearing glasses",
    "close-up of a smiling face, short blue hair, brown skin, no glasses, no hat, purple backdrop",
    "a person with blue hair against a gray background",
)

# Captioned FFHQ: 32 prompts in the style of the training captions (short, attribute-led), spread over
# age, gender, hair, accessories, expression and pose.
FFHQ_EVAL_PROMPTS = (
    "a woman with long blonde hair smiling",
    "an old man with a gray beard wearing glasses",
    "a young boy with short brown hair",
    "a woman wearing a hat and red lipstick",
    "a man with short black hair and a mustache",
    "a smiling young woman with curly brown hair",
    "an elderly woman with white hair and glasses",
    "a baby with big blue eyes",
    "a man with a shaved head and a beard",
    "a teenage girl with long straight black hair",
    "a woman with red hair and freckles",
    "a middle-aged man wearing sunglasses",
    "a little girl with pigtails smiling",
    "a man with wavy blond hair looking to the side",
    "a woman with short pink hair",
    "an old man with wrinkles and a bald head",
    "a young man wearing a baseball cap",
    "a woman with a ponytail and earrings",
    "a serious man in a suit and tie",
    "a laughing woman with dark curly hair",
    "a young woman wearing glasses and a scarf",
    "a man with long hair and a beard smiling",
    "a child with short blond hair and a big smile",
    "an asian woman with straight black hair",
    "a black man with short hair smiling",
    "a woman with brown hair in a bun",
    "an old woman wearing a headscarf",
    "a young man with messy brown hair",
    "a woman with blue eyes and blonde hair looking at the camera",
    "a man with gray hair wearing a hat",
    "a girl with braided hair",
    "a smiling man with glasses and short gray hair",
)


def eval_prompts(data: str) -> tuple[str, ...]:
    return SYNTHETIC_EVAL_PROMPTS if data.startswith("synthetic") else FFHQ_EVAL_PROMPTS
