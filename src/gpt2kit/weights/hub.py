"""Name -> local files.

A name is either a local directory or a Hugging Face Hub repo id. Hub downloads go through
`huggingface_hub` (imported only when needed, so that `import gpt2kit` stays cheap) and honour its
cache, `revision`, `local_files_only` and the offline environment variables (HF_HUB_OFFLINE,
TRANSFORMERS_OFFLINE). When the Hub cannot be reached the error says how to use a local directory.
"""
from __future__ import annotations

import os
from typing import Iterable

from ..errors import GPT2KitFileError, MissingFileError


class ModelNotFoundError(GPT2KitFileError):
    """Raised when a name is neither a local directory nor a reachable/cached Hub repo."""


def is_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


# A probe of the Hub's endpoint, once per process: without a network huggingface_hub retries each
# request with backoff (5 retries, ~30 s, a log line each) before it gives up.
PROBE_TIMEOUT_S = 3.0
_UNREACHABLE: dict[str, str | None] = {}  # endpoint -> None (it answered) or why it cannot be reached


def hub_unreachable() -> str | None:
    """Why the Hub endpoint (HF_ENDPOINT, through the user's proxies) cannot be reached, or None if it
    answers. Any HTTP answer counts: only a connection that cannot be made means offline."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    if endpoint not in _UNREACHABLE:
        try:
            get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
            _UNREACHABLE[endpoint] = None
        except Exception as e:  # connection refused, DNS failure, timeout, proxy error: all mean "not reachable"
            _UNREACHABLE[endpoint] = f"{endpoint} cannot be reached ({type(e).__name__}: {e})"
    return _UNREACHABLE[endpoint]


def _local_hint(name: str) -> str:
    return (
        f"To load without the Hub, pass a local directory instead of {name!r}: one written by "
        "`save_pretrained(dir)` (gpt2kit or transformers), holding config.json and model.safetensors "
        "(or pytorch_model.bin), and vocab.json + merges.txt (or tokenizer.json) for the tokenizer."
    )


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
    required: bool = True,
) -> str | None:
    """Return a local path for `filename` of model `name_or_path`, downloading it from the Hub if
    needed. Returns None when `required` is False and the file does not exist (locally or on the Hub)."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        path = os.path.join(name, subfolder, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise MissingFileError(f"{filename!r} not found in local directory {name!r}.")
        return None
    if os.path.isfile(name):
        raise ModelNotFoundError(
            f"{name!r} is a file, but a model or tokenizer is loaded from a directory. "
            "Pass the folder that holds it."
        )
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or name.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"Local directory {name!r} does not exist. Check the path.")
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError(f"{name!r} is not a local directory and huggingface_hub is not installed. {_local_hint(name)}") from e
    offline = local_files_only or is_offline()
    unreachable = None if offline else hub_unreachable()
    try:
        return huggingface_hub.hf_hub_download(
            repo_id=name,
            filename=filename,
            subfolder=subfolder or None,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline or unreachable is not None,  # offline: the local cache still serves
            token=token,
        )
    # a cache miss while offline is a LocalEntryNotFoundError, a subclass of EntryNotFoundError: test it first
    except LocalEntryNotFoundError as e:
        why = ("offline mode is on (local_files_only / HF_HUB_OFFLINE)" if offline else
               f"the Hub at {unreachable}" if unreachable else "the Hub cannot be reached")
        if not required:
            return None
        raise ModelNotFoundError(
            f"Cannot load {filename!r} for {name!r}: {why} and it is not in the local cache. {_local_hint(name)}"
        ) from e
    except EntryNotFoundError:
        if required:
            raise MissingFileError(f"{filename!r} does not exist in Hub repo {name!r} (revision {revision or 'main'}).")
        return None
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"{name!r} is neither a local directory nor a Hub repo. {_local_hint(name)}") from e
    except Exception as e:  # network errors come in many types (requests, httpx, OSError)
        if not required:
            return None
        raise ModelNotFoundError(
            f"Cannot download {filename!r} for {name!r}: the Hub cannot be reached ({type(e).__name__}: {e}). {_local_hint(name)}"
        ) from e


def resolve_any(name_or_path, filenames: Iterable[str], **kwargs) -> tuple[str, str] | None:
    """The first of `filenames` that exists for the model, as (filename, local path), or None."""
    for filename in filenames:
        path = resolve_file(name_or_path, filename, required=False, **kwargs)
        if path is not None:
            return filename, path
    return None
