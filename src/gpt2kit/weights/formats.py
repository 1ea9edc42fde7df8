"""Checkpoint files in and out: safetensors (memory-mapped), pytorch_model.bin, sharding and indexes.

This module knows files and flat {name: tensor} dicts only; which names a model expects is keymap.py's job.

Reading never makes a second copy of the weights: safetensors' `safe_open` maps the file privately
(copy-on-write), so each tensor it returns is a view of the page cache, and `.bin` files are opened with
`torch.load(mmap=True, weights_only=True)`. Writing goes through a temporary file and a rename, so a
crash never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..utils import atomic_path, atomic_write_text
from ..errors import CheckpointFileError, InvalidInputError
from ..torchfile import load_torch_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# the weight files a save may leave behind: model.safetensors, model-00001-of-00002.safetensors, ...
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")


def _corrupt(path: str, what: str) -> CheckpointFileError:
    return CheckpointFileError(
        f"Cannot read checkpoint file {path!r}: {what}. The file is truncated or corrupt (an interrupted "
        "download or copy?); delete it and download or save it again.")


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """{name: tensor} viewing a private memory map of `path` (no copy; pages load on first touch)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:  # header and coverage are checked here
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise _corrupt(path, str(e)) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


_BIN_UNSAFE_HINT = ("Get the model as model.safetensors instead, or, only if you trust where this file came from, "
                    "convert it to model.safetensors with a tool you trust.")


def read_bin(path: str) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, rebuilt without running code (torchfile.py), memory-mapped when it is a zip
    (the legacy pre-1.6 format cannot be mapped)."""
    state = load_torch_file(path, what="weights file", unsafe_hint=_BIN_UNSAFE_HINT, corrupt=_corrupt, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _corrupt(path, "it does not hold a flat {name: tensor} state dict")
    return state


def read_weights(path: str) -> dict[str, torch.Tensor]:
    return read_safetensors(path) if path.endswith(".safetensors") else read_bin(path)


def read_index(path: str) -> dict[str, str]:
    """The weight_map ({tensor name: shard file name}) of a sharded checkpoint's index."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise _corrupt(path, f"not a valid index with a 'weight_map' ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _corrupt(path, "'weight_map' must map tensor names to shard file names")
    for shard in set(weight_map.values()):  # shards live beside the index; no paths out of it
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise _corrupt(path, f"shard name {shard!r} is not a plain file name")
    return weight_map


def read_sharded(index_path: str, shard_paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """Merge the shards named by the index (shard file name -> local path) and check they match it."""
    weight_map = read_index(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_weights(shard_paths[shard])
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(part) != listed:
            missing, extra = sorted(listed - set(part)), sorted(set(part) - listed)
            raise _corrupt(shard_paths[shard], f"it disagrees with {os.path.basename(index_path)}: "
                                               f"missing {missing[:10]}, not listed {extra[:10]}")
        state.update(part)
    return state


# -- writing ------------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """'5GB' -> 5_000_000_000, '200MiB' -> 209_715_200; an int passes through (bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise InvalidInputError(f"max_shard_size must be positive, got {size}.")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise InvalidInputError(f"max_shard_size must be a positive size like '5GB', '500MB' or a number of bytes, got {size!r}.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in order: start a new shard when the next tensor would push this one past max_bytes
    (a tensor larger than max_bytes gets a shard of its own, as nothing can be split)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _write_one(tensors: dict[str, torch.Tensor], path: str, safe: bool) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if safe:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)


def write_weights(state: dict[str, torch.Tensor], directory: str, safe: bool, max_shard_size="5GB") -> list[str]:
    """Write `state` as model.safetensors (or pytorch_model.bin), sharded with an index past max_shard_size.
    Weight files of an earlier save in `directory` that this one does not rewrite are removed afterwards,
    so that a stale single file cannot shadow new shards. Returns the file names written."""
    single, index_name = (SAFE_WEIGHTS, SAFE_INDEX) if safe else (BIN_WEIGHTS, BIN_INDEX)
    shards = split_shards(state, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_one(shards[0], os.path.join(directory, single), safe)
        written = [single]
    else:
        stem, ext = single.rsplit(".", 1)
        written, weight_map = [], {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
            _write_one(shard, os.path.join(directory, name), safe)
            written.append(name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(os.path.join(directory, index_name), json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_name)
    for name in os.listdir(directory):
        stale = _WEIGHT_FILE.match(name) or name in (SAFE_INDEX, BIN_INDEX)
        if stale and name not in written:
            os.remove(os.path.join(directory, name))
    return written
