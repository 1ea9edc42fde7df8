"""The one place gpt2kit reads a file written by torch.save (pytorch_model.bin, training_state.pt).

Such a file is a pickle, and unpickling can call any function the file names (os.system, ...). So it is
only ever opened with `torch.load(weights_only=True)`, whose restricted unpickler rebuilds tensors and
plain data (numbers, strings, None, lists, tuples, dicts) and refuses every other object. torch's own
refusal advises retrying with the protection off; gpt2kit instead says what the file is and what to do.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from typing import Callable

import torch

from .errors import GPT2KitFileError, UnsafeCheckpointError

_PICKLE_START = re.compile(rb"\x80[\x02-\x05]")  # the PROTO opcode that starts a pickle of protocol 2-5


def load_torch_file(path: str, *, what: str, unsafe_hint: str, corrupt: Callable[[str, str], GPT2KitFileError],
                    mmap: bool = False):
    """The object in torch.save file `path`, rebuilt without running code.

    what: the file's role, for messages ("weights file", "training state"). unsafe_hint: what the user
    should do with a file that would need code execution. corrupt(path, reason): the error for a file
    that is damaged or not a torch.save file at all. mmap maps a zip-format file instead of reading it."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it better
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        unsafe = _needs_code(path, str(e))
        if unsafe is None:
            raise corrupt(path, "it is not a file written by torch.save (its data cannot be unpickled)") from None
        raise UnsafeCheckpointError(
            f"Refusing to load {what} {path!r}: {unsafe}, so loading it would run code from the file. {unsafe_hint}"
        ) from None
    except EOFError:
        raise corrupt(path, "it ends too early (truncated)") from None
    except RuntimeError as e:
        text = str(e)
        if "zip archive" in text or "PytorchStreamReader" in text or "magic number" in text:
            raise corrupt(path, "its archive is incomplete or damaged") from None
        raise corrupt(path, f"{type(e).__name__}: {_first_line(text)}") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError, MemoryError) as e:
        raise corrupt(path, f"{type(e).__name__}: {_first_line(str(e))}") from None


def _needs_code(path: str, message: str) -> str | None:
    """Why a file the restricted unpickler refused needs code execution, or None when it is just damaged."""
    named = re.search(r"GLOBAL ([\w.]+)", message)
    if named:
        return f"it is a pickle that calls {named.group(1)} (neither a tensor nor plain data)"
    with open(path, "rb") as f:
        head = f.read(2)
    if _PICKLE_START.match(head) and not zipfile.is_zipfile(path):
        return "it is a plain Python pickle, not a torch.save file of tensors"
    return None


def _first_line(text: str) -> str:
    """torch's message without its advice to disable weights_only (never passed on)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip() if lines else "unreadable"
