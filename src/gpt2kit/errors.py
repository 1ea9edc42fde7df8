"""The exceptions gpt2kit raises for problems a user can fix: one type per kind of problem.

Each also derives from the builtin that code written for transformers catches (ValueError, TypeError,
OSError, RuntimeError), so `except ValueError` keeps working. The `gpt2kit` command prints these as one
line; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class GPT2KitError(Exception):
    """A problem with what the user asked for or gave; the message says what was wrong and what to do."""


class InvalidInputError(GPT2KitError, ValueError):
    """A value, shape or name that gpt2kit cannot accept."""


class InvalidArgumentError(GPT2KitError, TypeError):
    """An argument of the wrong type, or an unknown keyword."""


class ContextLengthError(InvalidInputError):
    """A sequence longer than the model's n_positions (see check_context_length)."""


class InsufficientMemoryError(GPT2KitError, MemoryError):
    """Work that would need more memory than the device has available (refused before it starts)."""


class NonFiniteLogitsError(GPT2KitError, RuntimeError):
    """A model that produced NaN or infinite logits (corrupt weights, or an overflow in float16)."""


class DeviceUnavailableError(GPT2KitError, RuntimeError):
    """A device that this machine does not have."""


class GPT2KitFileError(GPT2KitError, OSError):
    """A file or directory that is unreadable, or not what it should be."""


class MissingFileError(GPT2KitFileError, FileNotFoundError):
    """A file or directory that does not exist."""


class CheckpointFileError(GPT2KitFileError):
    """A checkpoint file (weights or training state) that cannot be read: truncated, corrupt, or not a checkpoint."""


class UnsafeCheckpointError(GPT2KitFileError):
    """A pickle-based file (pytorch_model.bin, training_state.pt) holding more than tensors and plain data:
    loading it would run code named in the file, which gpt2kit never does (see torchfile.py)."""


class NotSupportedError(GPT2KitError, NotImplementedError):
    """A feature of the reference API that gpt2kit does not offer; the message names the alternative."""


def check_context_length(prompt_tokens: int, new_tokens: int, n_positions: int, *, what: str = "max_new_tokens") -> None:
    """The one check that a prompt plus the tokens to add fits the model's context (n_positions)."""
    if prompt_tokens > n_positions:
        raise ContextLengthError(f"The prompt is {prompt_tokens} tokens long, but this model reads at most "
                                 f"{n_positions} tokens (n_positions). Shorten the prompt.")
    if prompt_tokens + new_tokens > n_positions:
        raise ContextLengthError(
            f"The sequence would be {prompt_tokens + new_tokens} tokens long ({prompt_tokens} in the prompt or cache + "
            f"{new_tokens} {what}), beyond this model's n_positions={n_positions} (its longest sequence). Shorten the "
            f"prompt or ask for at most {max(n_positions - prompt_tokens, 0)} new tokens.")
