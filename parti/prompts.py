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


def sample_prompts(data: str) -> tuple[str, ...]:
    return SYNTHETIC_SAMPLE_PROMPTS if data.startswith("synthetic") else FFHQ_SAMPLE_PROMPTS
