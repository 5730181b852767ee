"""parti: Parti (autoregressive text-to-image) on faces.

images -> tokenizer.encode -> codes;  captions -> text encoder -> states;
(codes, states) -> train generator;   prompt -> generate -> tokenizer.decode -> image.

Importing this package loads nothing heavy: names resolve on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PartiError": "parti.errors",
    "build_tokenizer": "parti.tokenizer",
    "load_tokenizer": "parti.tokenizer",
    "save_tokenizer": "parti.tokenizer",
    "TokenizerConfig": "parti.tokenizer",
    "TOKENIZER_PRESETS": "parti.tokenizer",
    "build_generator": "parti.generator",
    "load_generator": "parti.generator",
    "GeneratorConfig": "parti.generator",
    "GENERATOR_PRESETS": "parti.generator",
    "generate": "parti.sampling",
    "generate_naive": "parti.sampling",
    "SamplingParams": "parti.sampling",
    "open_source": "parti.data",
    "SyntheticFaces": "parti.synthetic",
    # The training functions share their modules' names (parti.train_tokenizer.train_tokenizer), so only
    # the configs are re-exported here: a submodule import would otherwise shadow the function.
    "TokenizerTrainConfig": "parti.train_tokenizer",
    "GeneratorTrainConfig": "parti.train_generator",
    "encode_dataset": "parti.cache",
    "load_pipeline": "parti.pipeline",
    "Pipeline": "parti.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'parti' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
