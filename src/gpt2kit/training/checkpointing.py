"""Checkpoints of a training run, each one a Hugging Face model directory plus the run's state.

    OUT/checkpoints/step-000100/   config.json, generation_config.json, model.safetensors,
                                   vocab.json, merges.txt, training_state.pt
    OUT/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a run killed at any moment leaves the previous checkpoint intact.
training_state.pt holds what `--resume` needs to continue the same run exactly: optimizer and
scheduler state, every process's RNG states and the data position. It holds tensors and plain data
only (numbers, strings, None, lists, tuples, dicts: RNG states converted to these), so it is read
back with torch.load(weights_only=True) and a planted file cannot run code (torchfile.py).
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from typing import Callable

import torch

from ..errors import CheckpointFileError, MissingFileError
from ..torchfile import load_torch_file
from ..utils import atomic_path, atomic_write_text
from ..weights.formats import read_safetensors

STATE_NAME = "training_state.pt"
STATE_FORMAT = 2  # 2: plain data only (1, gpt2kit 0.1.0's first checkpoints, pickled numpy's RNG state)
_PLAIN = (bool, int, float, str, type(None), torch.Tensor)


def rng_state() -> dict:
    """This process's RNG states (Python, torch, CUDA when in use, numpy when imported) as tensors and plain data."""
    version, internal, gauss = random.getstate()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one ByteTensor per GPU
    if "numpy" in sys.modules:  # only when something may have used numpy's global RNG
        import numpy as np

        algorithm, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))


def check_plain(obj, where: str = "state") -> None:
    """Raise TypeError unless `obj` is made of tensors and plain data only (what weights_only=True reads back)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a training state holds "
                        "tensors and plain data only, so that it loads without running code")


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
    state = {"format": STATE_FORMAT, **state}
    check_plain(state)  # never write a state that the safe loader would refuse
    save_model_dir(model, tokenizer, tmp)
    with atomic_path(os.path.join(tmp, STATE_NAME)) as part:  # fsynced, like the model files, before the rename
        torch.save(state, part)
    if os.path.exists(final):  # a re-run over the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    old = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


RUN_FILES = ("log.jsonl", "checkpoints", "loss.png", "config.json", "model.safetensors")  # a run (or model) is here


def run_files(out_dir: str) -> list[str]:
    """The files in `out_dir` that show it already holds a training run or a model."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]


def clear_run(out_dir: str) -> None:
    """Delete a run's record (its checkpoints, log and plot) before a new run replaces it; the model files
    are replaced when the new run saves its own."""
    shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
    for name in ("log.jsonl", "loss.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, "checkpoints", f.read().strip())
    return path if os.path.isfile(os.path.join(path, STATE_NAME)) else None


def kept_checkpoints(out_dir: str) -> list[str]:
    """The run's checkpoint directories that hold a training state, newest step first."""
    root = os.path.join(out_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    steps = sorted((int(n[5:]), n) for n in names if n.startswith("step-") and n[5:].isdigit()
                   and os.path.isfile(os.path.join(root, n, STATE_NAME)))
    return [os.path.join(root, n) for _, n in reversed(steps)]


_STATE_KEYS = ("step", "samples", "optimizer", "scheduler", "config", "world_size", "rng")
_STATE_UNSAFE_HINT = (
    "gpt2kit writes training_state.pt with tensors and plain data only (those of gpt2kit 0.1.0's first checkpoints "
    "held numpy's RNG state as an object and are refused too). Resume only from checkpoints you wrote: delete "
    "this checkpoint directory to resume from an earlier one, or start the run again with --overwrite or a new --out.")


def _corrupt_state(path: str, reason: str) -> CheckpointFileError:
    return CheckpointFileError(f"Training state {path!r} is unreadable: {reason} (a copy cut short, or a full disk?).")


def load_state(checkpoint_dir: str) -> dict:
    """The training state of a checkpoint, read without running code. Raises UnsafeCheckpointError for a file
    that would need code execution, CheckpointFileError for a damaged one."""
    path = os.path.join(checkpoint_dir, STATE_NAME)
    state = load_torch_file(path, what="training state", unsafe_hint=_STATE_UNSAFE_HINT, corrupt=_corrupt_state)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise _corrupt_state(path, f"it is not a gpt2kit training state (no {', '.join(missing)})")
    return state


def load_resume_point(out_dir: str, notice: Callable[[str], None]) -> tuple[str, dict]:
    """(checkpoint directory, training state) to resume from: the newest kept checkpoint that reads, each
    damaged newer one skipped with a notice. A file that would need code execution stops the resume."""
    kept = kept_checkpoints(out_dir)
    if not kept:
        raise MissingFileError(f"--resume: no checkpoint in {os.path.join(out_dir, 'checkpoints')}. "
                               "Start the run without --resume.")
    for i, directory in enumerate(kept):
        try:
            state = load_state(directory)
            read_safetensors(os.path.join(directory, "model.safetensors"))  # the weights must read too
            return directory, state
        except CheckpointFileError as e:
            if i + 1 == len(kept):
                raise CheckpointFileError(
                    f"--resume: {e} No earlier checkpoint is kept to fall back to: start the run again with "
                    "--overwrite, or train into a new --out.") from None
            notice(f"note: {e} Resuming from the previous kept checkpoint, {os.path.basename(kept[i + 1])}, instead.")
    raise AssertionError("unreachable")
