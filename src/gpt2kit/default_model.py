"""The embedded default model: a small GPT-2 (the real 50257-token vocabulary) trained by `gpt2kit train`
on the first 90% of tinyshakespeare, shipped inside the package so that `gpt2kit generate` and
`pipeline("text-generation")` work offline with no model named. README.md gives its recipe."""
from __future__ import annotations

import os
from .errors import MissingFileError

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default-model")


def default_model_dir() -> str:
    """The directory of the embedded default model (config.json, model.safetensors, vocab.json, merges.txt)."""
    if not os.path.isfile(os.path.join(_DIR, "model.safetensors")):
        raise MissingFileError(f"The embedded default model is missing from {_DIR}: the gpt2kit installation is "
                                "incomplete. Reinstall gpt2kit, or pass a model directory or Hub name explicitly.")
    return _DIR
