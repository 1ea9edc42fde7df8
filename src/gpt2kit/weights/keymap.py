"""Checkpoint names -> model names, and what to do with every name that does not match one to one.

Our state-dict names and shapes are transformers' own (Conv1D matrices stored [in, out], as in the
files: the in-memory layout was chosen by measurement, see DESIGN.md), so the map is about layouts only:

- head models keep the body under `transformer.`; a bare GPT2Model has no prefix. Files of either kind
  load into either kind of model;
- the Hub's original GPT-2 files carry the causal-mask buffers `h.N.attn.bias` / `h.N.attn.masked_bias`
  (also in cross-attention): they hold no weights and are dropped;
- a tied `lm_head.weight` may be absent (it is tied from `wte`), or present (older files), then ignored;
- the weights of a task head that the checkpoint lacks (the class's `_head_prefixes`) are initialised
  fresh, and the weights of another task's head are dropped; both with a one-line notice;
- anything else that is missing, unexpected or of the wrong shape is an error that names the keys.

If the in-memory layout of a matrix ever changes, `to_model_layout` / `to_file_layout` are the one place
to transpose it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import GPT2KitError

# the names of every GPT-2 task head's weights in transformers' checkpoints
HEAD_PREFIXES = ("lm_head.", "multiple_choice_head.", "score.", "classifier.", "qa_outputs.")
_MASK_BUFFER = re.compile(r"^(?:transformer\.)?h\.\d+\.(?:attn|crossattention)\.(?:bias|masked_bias)$")


class WeightsMismatchError(GPT2KitError, RuntimeError):
    """The checkpoint's names or shapes do not fit the model."""


@dataclass
class LoadPlan:
    rename: dict = field(default_factory=dict)  # checkpoint name -> model name, for the tensors to load
    mask_buffers: list = field(default_factory=list)  # dropped: Hub causal-mask buffers
    other_heads: list = field(default_factory=list)  # dropped: another task's head
    tied: list = field(default_factory=list)  # model names filled by tie_weights
    fresh: list = field(default_factory=list)  # model names to initialise (this task's head, absent)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (name, checkpoint shape, model shape)


def _model_name(name: str, model_keys, prefix: str, has_base: bool) -> str:
    """The model's name for checkpoint name `name` (the prefix added or removed as the model needs)."""
    p = prefix + "."
    if has_base:
        if name.startswith(p) or name in model_keys or name.startswith(HEAD_PREFIXES):
            return name
        return p + name
    return name[len(p):] if name.startswith(p) else name


def plan_load(ckpt_shapes: dict, model_shapes: dict, *, prefix: str = "transformer", head_prefixes=(),
              tied_keys=()) -> LoadPlan:
    """Match checkpoint names/shapes against the model's (both {name: shape}); decide each name's fate."""
    plan = LoadPlan()
    has_base = any(k.startswith(prefix + ".") for k in model_shapes)
    for name, shape in ckpt_shapes.items():
        if _MASK_BUFFER.match(name):
            plan.mask_buffers.append(name)
            continue
        target = _model_name(name, model_shapes, prefix, has_base)
        if target in tied_keys:  # filled from wte instead; a stored copy is redundant
            continue
        if target not in model_shapes:
            (plan.other_heads if target.startswith(HEAD_PREFIXES) else plan.unexpected).append(name)
            continue
        if tuple(shape) != tuple(model_shapes[target]):
            plan.mismatched.append((target, tuple(shape), tuple(model_shapes[target])))
            continue
        if target in plan.rename.values():  # both `h.0...` and `transformer.h.0...` in one file
            plan.unexpected.append(name)
            continue
        plan.rename[name] = target
    loaded = set(plan.rename.values()) | {name for name, _, _ in plan.mismatched}  # mismatched: reported once
    for target in model_shapes:
        if target in loaded:
            continue
        if target in tied_keys:
            plan.tied.append(target)
        elif target.startswith(tuple(head_prefixes)):
            plan.fresh.append(target)
        else:
            plan.missing.append(target)
    return plan


def check_plan(plan: LoadPlan, where: str, model_name: str, tie: bool) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped key."""
    problems = []
    if plan.missing:
        hint = ""
        if any(k.endswith("lm_head.weight") for k in plan.missing) and not tie:
            hint = (" (config.tie_word_embeddings is False, so the checkpoint must hold its own lm_head.weight; "
                    "set tie_word_embeddings=True if the head shares the token embedding)")
        problems.append(f"missing keys {_names(plan.missing)}{hint}")
    if plan.unexpected:
        problems.append(f"unexpected keys {_names(plan.unexpected)}")
    if plan.mismatched:
        shapes = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in plan.mismatched[:10])
        more = f" and {len(plan.mismatched) - 10} more" if len(plan.mismatched) > 10 else ""
        problems.append(f"shape mismatches ({shapes}{more})")
    if problems:
        raise WeightsMismatchError(
            f"The checkpoint in {where} does not fit {model_name}: " + "; ".join(problems) + ". Check that the "
            "checkpoint is a GPT-2 checkpoint and that its config.json matches it (vocab_size, n_embd, n_layer, "
            "n_inner, add_cross_attention, tie_word_embeddings).")


def _names(keys, limit: int = 12) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def to_model_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor in the model's in-memory layout. Identity: both store Conv1D as [in, out]."""
    return tensor


def to_file_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A model tensor in the checkpoint layout (the inverse of to_model_layout)."""
    return tensor
