"""Checkpoints of a training run, each one a Hugging Face model directory plus the run's state.

    OUT/checkpoints/step-000100/   config.json, generation_config.json, model.safetensors,
                                   vocab.json, merges.txt, training_state.pt
    OUT/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a run killed at any moment leaves the previous checkpoint intact.
training_state.pt holds what `--resume` needs to continue the same run exactly: optimizer and
scheduler state, every process's RNG states and the data position.
"""
from __future__ import annotations

import os
import random
import shutil

import torch

from ..utils import atomic_write_text

STATE_NAME = "training_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import sys

        if "numpy" in sys.modules:  # only when something has used numpy's global RNG
            import numpy as np

            state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_model_dir(model, tokenizer, directory: str, *, dtype: torch.dtype | None = None) -> None:
    """config.json, generation_config.json, model.safetensors (and the tokenizer files) in `directory`.

    `dtype` stores the weights in another precision (e.g. bfloat16 to halve a shipped model)."""
    if dtype is not None and dtype != model.dtype:
        import copy

        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(directory)
    if tokenizer is not None:
        import copy

        tokenizer = copy.copy(tokenizer)  # the saved tokenizer truncates to what this model reads
        tokenizer.model_max_length = model.config.n_positions
        tokenizer.save_pretrained(directory)


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, keep: int = 2) -> str:
    """Write checkpoint `step` atomically and drop all but the newest `keep`. Returns its directory."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tokenizer, tmp)
    torch.save(state, os.path.join(tmp, STATE_NAME))
    if os.path.exists(final):  # a re-run over the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    old = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, "checkpoints", f.read().strip())
    return path if os.path.isfile(os.path.join(path, STATE_NAME)) else None


def load_state(checkpoint_dir: str) -> dict:
    return torch.load(os.path.join(checkpoint_dir, STATE_NAME), map_location="cpu", weights_only=False)

