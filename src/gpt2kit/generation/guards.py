"""Checks that stop a generation which cannot succeed: one whose buffers cannot fit in memory (refused
before any work), and a model whose logits turn NaN or infinite (stopped at the step it happens).
"""
from __future__ import annotations

import torch

from ..errors import InsufficientMemoryError, NonFiniteLogitsError

GiB = float(1 << 30)


# -- memory ---------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still hand out, or None where that is unknown (the check is then skipped)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's caching allocator holds but does not use are free to this process too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:  # Linux; psutil is not a dependency
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # the kernel's estimate, in kB
        except (OSError, ValueError, IndexError):
            return None
    return None


def generation_memory(config, dtype: torch.dtype, rows: int, prompt_len: int, max_length: int, *, beams: bool,
                      sampling: bool, kept_outputs: int) -> dict[str, int]:
    """Bytes a generation needs beyond the weights, by part. Only the large buffers are counted, so this is
    a lower bound: what is refused surely cannot fit.

    rows: sequences decoded together (prompts x beams or return sequences); kept_outputs: how many of
    output_scores / output_logits keep a (rows, vocab) tensor per new token."""
    el = torch.empty((), dtype=dtype).element_size()
    V, C, H = config.vocab_size, config.n_embd, config.n_head
    inner = config.n_inner or 4 * C
    parts = {"KV cache": 2 * config.n_layer * rows * max_length * C * el}  # keys and values, every layer
    # the loop's (rows, vocab) float32 tensors alive at once: logits, processed scores, the next step's
    # logits (and probabilities when sampling; beams add their summed log-probabilities)
    parts["next-token scores"] = (3 + int(sampling) + int(beams)) * rows * V * 4
    # the prompt's pass through one block: residual, norm, q/k/v, attention output, MLP hidden (twice)
    act = rows * prompt_len * (6 * C + 2 * inner) * el
    if getattr(config, "_attn_implementation", None) == "eager":  # the (P, P) attention weights, per head
        act += rows * H * prompt_len * prompt_len * 4
    parts["prompt activations"] = act
    parts["kept scores/logits"] = kept_outputs * (max_length - prompt_len) * rows * V * 4
    # int64 token ids: the running and returned sequences; beams also candidates and back-pointers
    parts["sequences"] = (16 if beams else 2) * rows * max_length * 8
    return parts


def check_generation_fits(model, rows: int, batch: int, prompt_len: int, max_length: int, cfg) -> None:
    """Refuse, before any work, a generation whose buffers exceed the memory this device has available."""
    available = available_memory(model.device)
    if available is None:
        return
    kept = int(bool(cfg.return_dict_in_generate and cfg.output_scores)) + \
        int(bool(cfg.return_dict_in_generate and cfg.output_logits))
    parts = generation_memory(model.config, model.dtype, rows, prompt_len, max_length, beams=cfg.num_beams > 1,
                              sampling=bool(cfg.do_sample), kept_outputs=kept)
    need = sum(parts.values())
    if need <= available:
        return
    shown = ", ".join(f"{name} {b / GiB:.1f} GiB" for name, b in parts.items() if b >= need / 100)
    expand = rows // batch
    how = f"{batch} prompt(s) x {expand} " + ("beams" if cfg.num_beams > 1 else "return sequences")
    reduce = ["num_beams" if cfg.num_beams > 1 else None,
              "num_return_sequences" if cfg.num_return_sequences > 1 else None,
              "the prompts per batch" if batch > 1 else None,
              f"max_new_tokens (now {max_length - prompt_len})"]
    reduce = [r for r in reduce if r] + (["output_scores/output_logits"] if kept else [])
    fit = available * rows // need  # every part grows with the rows
    raise InsufficientMemoryError(
        f"This generation needs at least {need / GiB:.1f} GiB of memory ({rows} rows = {how}, {max_length} "
        f"positions: {shown}), but only {available / GiB:.1f} GiB is available on {model.device.type} "
        f"(about {fit} rows would fit). Reduce {', '.join(reduce[:-1]) + ' or ' if len(reduce) > 1 else ''}"
        f"{reduce[-1]}.")


# -- NaN / inf ------------------------------------------------------------------------------------
def nonfinite_logits_error(step: int, dtype: torch.dtype) -> NonFiniteLogitsError:
    cause = ("an overflow in float16 (load the model in float32 or bfloat16)" if dtype == torch.float16 else
             "an overflow (in float16, load the model in float32 or bfloat16)")
    return NonFiniteLogitsError(
        f"The model produced NaN/inf logits at step {step} (new token {step}): its weights are likely corrupt "
        f"(find them with torch.isfinite(p).all() over model.parameters()), or {cause}.")


def nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on the logits' device: does any of logits (rows, vocab) hold a NaN or inf? One sum, as a
    NaN or inf anywhere makes it non-finite (measured on this CPU, ~10x cheaper than isfinite().all() over
    4 x 50257 floats); only logits past ~1e33 could overflow it, and those are broken too."""
    return ~torch.isfinite(logits.sum())


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: which rows of logits (rows, vocab) hold a NaN or inf, by the same one-sum rule (a server's
    batch fails only its broken rows): 0.2 against 3.8 ms for isfinite().all(-1) over 32 x 50257 floats."""
    return ~torch.isfinite(logits.sum(-1))


def check_finite_logits(logits: torch.Tensor, step: int, dtype: torch.dtype) -> None:
    """Raise if logits (rows, vocab) hold a NaN or inf. Reads a flag back from the device: call it where the
    loop waits for the device anyway (on a CPU, always)."""
    if bool(nonfinite(logits)):
        raise nonfinite_logits_error(step, dtype)
