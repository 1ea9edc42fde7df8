"""from_pretrained / save_pretrained for every GPT-2 model class.

Loading builds the model on the meta device (no memory, no random init) and then assigns it the
checkpoint's own tensors, which view a private memory map of the file (formats.py): when no dtype or
device change is asked for, the weights are never copied, so peak memory is about the checkpoint's size.
Names are matched and checked in keymap.py; files are read and written in formats.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading

import torch

from ..config import GPT2Config
from ..devices import resolve_device
from ..utils import atomic_write_text
from . import formats
from ..quantization import loading as quant_loading
from .hub import ModelNotFoundError, resolve_file
from .keymap import check_plan, plan_load, to_file_layout, to_model_layout
from ..errors import InvalidArgumentError, InvalidInputError, NotSupportedError

logger = logging.getLogger("gpt2kit.weights")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(x) -> torch.dtype | None:
    """'auto' / None -> None (keep the checkpoint's dtype); 'bfloat16', 'torch.float16', torch.float32, ... -> dtype."""
    if x is None or x == "auto":
        return None
    if isinstance(x, torch.dtype):
        dtype = x
    elif isinstance(x, str) and x.lower().removeprefix("torch.") in _DTYPES:
        dtype = _DTYPES[x.lower().removeprefix("torch.")]
    else:
        raise InvalidInputError(f"dtype must be 'auto', a torch.dtype or one of {', '.join(sorted(_DTYPES))}; got {x!r}.")
    if not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating-point type for the weights, got {dtype}.")
    return dtype


# -- finding the weights --------------------------------------------------------------------------------

def _find_weights(name_or_path, use_safetensors, hub_kwargs) -> tuple[str, dict[str, torch.Tensor]]:
    """Locate and read the checkpoint: model.safetensors, then its sharded index, then pytorch_model.bin
    (and its index). Returns (a description of where it came from, {name: tensor})."""
    candidates = []
    if use_safetensors is not False:
        candidates += [formats.SAFE_WEIGHTS, formats.SAFE_INDEX]
    if use_safetensors is not True:
        candidates += [formats.BIN_WEIGHTS, formats.BIN_INDEX]
    for filename in candidates:
        path = resolve_file(name_or_path, filename, required=False, **hub_kwargs)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return path, formats.read_weights(path)
        shards = {s: resolve_file(name_or_path, s, **hub_kwargs) for s in sorted(set(formats.read_index(path).values()))}
        return path, formats.read_sharded(path, shards)
    where = os.fspath(name_or_path)
    only = " (use_safetensors=True excludes pytorch_model.bin)" if use_safetensors else ""
    raise ModelNotFoundError(f"No weights found for {where!r}: looked for {', '.join(candidates)}{only}. Pass a "
                             "directory written by save_pretrained (gpt2kit or transformers).")


def _load_config(cls, name_or_path, config, overrides, hub_kwargs) -> GPT2Config:
    if config is None or isinstance(config, (str, os.PathLike)):
        source = name_or_path if config is None else config
        config, unused = cls.config_class.from_pretrained(source, return_unused_kwargs=True, **hub_kwargs, **overrides)
    elif isinstance(config, GPT2Config):
        config, unused = config.copy(), {}
        for key, value in overrides.items():
            if key in config.__dict__ or key in config.attribute_map or key == "num_labels":
                setattr(config, key, value)
            else:
                unused[key] = value
        config.validate()
    else:
        raise InvalidArgumentError(f"config must be a GPT2Config, a path or a model name; got {type(config).__name__}.")
    if unused:
        raise InvalidArgumentError(f"from_pretrained() got unexpected keyword argument(s) {', '.join(sorted(unused))}: they are "
                        "neither loading options nor GPT2Config fields.")
    return config


# -- loading --------------------------------------------------------------------------------------------

def load_pretrained(cls, name_or_path, *model_args, config=None, cache_dir=None, revision=None, local_files_only=False,
                    token=None, subfolder="", dtype=None, torch_dtype=None, device_map=None, attn_implementation=None,
                    low_cpu_mem_usage=None, use_safetensors=None, output_loading_info=False, quantization_config=None,
                    **config_overrides):
    """Build `cls` from a local directory or Hub name: config.json plus the weights, checked key by key.

    dtype None/'auto' keeps the checkpoint's dtype (config dtype, else the tensors'), as transformers 5 does.
    `low_cpu_mem_usage` is accepted for compatibility: loading is always low-memory.
    """
    hub_kwargs = dict(cache_dir=cache_dir, revision=revision, local_files_only=local_files_only, token=token,
                      subfolder=subfolder)
    config = _load_config(cls, name_or_path, config, config_overrides, hub_kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
        config.validate()
    target_dtype = parse_dtype(dtype if dtype is not None else torch_dtype)
    device = resolve_device(device_map, "device_map")

    where, state = _find_weights(name_or_path, use_safetensors, hub_kwargs)
    qconfig, prequantized = quant_loading.resolve(quantization_config, config)
    quant = None
    if qconfig is not None:  # pre-quantized entries leave `state` here; the rest loads as usual
        with torch.device("meta"), _skip_init():
            names = [n for n, _ in cls(config.copy(), *model_args).named_modules()]
        quant = quant_loading.QuantizedLoad(qconfig, prequantized, state, names)
    if target_dtype is None:  # 'auto': the stored dtype
        target_dtype = parse_dtype(config.dtype) if config.dtype is not None else next(
            (t.dtype for t in state.values() if t.is_floating_point()), torch.get_default_dtype())
    config.dtype = target_dtype

    with torch.device("meta"), _skip_init():  # shapes only: no allocation, no random init
        model = cls(config, *model_args)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    tie = bool(config.tie_word_embeddings) and model.get_output_embeddings() is not None
    ckpt_shapes = quant.checkpoint_shapes(state) if quant else {k: tuple(v.shape) for k, v in state.items()}
    plan = plan_load(ckpt_shapes, model_shapes, prefix=cls.base_model_prefix,
                     head_prefixes=getattr(cls, "_head_prefixes", ()),
                     tied_keys=tuple(getattr(cls, "_tied_weights_keys", ())) if tie else ())
    check_plan(plan, where, cls.__name__, tie)
    if plan.mask_buffers:
        logger.info("Dropped %d causal-mask buffers (h.N.attn.bias/masked_bias) of the original GPT-2 layout.",
                    len(plan.mask_buffers))
    if plan.other_heads:
        logger.warning("%s: ignored the weights of another task's head in %s: %s", cls.__name__, where,
                       sorted(plan.other_heads))

    weights = {}
    for name, target in plan.rename.items():
        # quantized modules are built here, one weight at a time (streaming: see quantization/loading.py)
        if quant and quant.take(name, target, lambda n: to_model_layout(n, state[n]) if n in state else None,
                                target_dtype):
            continue
        t = to_model_layout(target, state[name])
        if t.is_floating_point() and t.dtype != target_dtype or t.device != device:
            t = t.to(device=device, dtype=target_dtype if t.is_floating_point() else t.dtype)
        weights[target] = t
    del state
    model.load_state_dict(weights, strict=False, assign=True)  # the parameters become the mapped tensors
    if plan.fresh:
        _init_fresh(model, plan.fresh, weights, device, target_dtype)
        logger.warning("%s: newly initialised %s (not in the checkpoint %s); train this head before use.",
                       cls.__name__, sorted(plan.fresh), where)
    if quant:
        quant.install(model, device)
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a buffer built in __init__ on meta, for instance: a bug in the model class, not the file
        raise RuntimeError(f"{cls.__name__}: {leftover} were not filled by loading; they must be parameters in the "
                           "checkpoint or be created after construction.")
    _load_generation_config(model, name_or_path, hub_kwargs)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": sorted(plan.fresh), "unexpected_keys": sorted(plan.other_heads),
                       "mismatched_keys": [], "error_msgs": []}
    return model


_INIT_NAMES = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
               "trunc_normal_", "zeros_", "ones_", "constant_")
_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _skip_init():
    """Make torch.nn.init's fills no-ops, for this thread only, while a model is built on meta: the checkpoint
    overwrites every weight anyway, and on meta tensors `normal_` runs through a Python reference that imports
    torch._dynamo (2.8 s and ~100 MB on first use, measured). The module-level functions are swapped for the
    duration, so other threads see wrappers that still fill; a lock keeps two loads from interleaving their
    swaps, and the originals come back on exit."""
    loader = threading.get_ident()

    def only_elsewhere(fill):
        def maybe_fill(tensor, *args, **kwargs):
            return tensor if threading.get_ident() == loader else fill(tensor, *args, **kwargs)
        return maybe_fill

    with _INIT_LOCK:
        saved = {n: getattr(torch.nn.init, n) for n in _INIT_NAMES}
        for n, fill in saved.items():
            setattr(torch.nn.init, n, only_elsewhere(fill))
        try:
            yield
        finally:
            for n, fill in saved.items():
                setattr(torch.nn.init, n, fill)


def _init_fresh(model, names, loaded, device, dtype) -> None:
    """Materialise the head parameters the checkpoint lacks and give them GPT-2's initialisation."""
    owners = {}
    for name in names:
        module_name, _, _ = name.rpartition(".")
        owners[module_name] = model.get_submodule(module_name)
    for module_name, module in owners.items():
        for pname, p in list(module.named_parameters(recurse=False)):
            fresh = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
            setattr(module, pname, torch.nn.Parameter(fresh, requires_grad=p.requires_grad))
        model._init_weights(module)
        for pname, p in list(module.named_parameters(recurse=False)):  # keep what the checkpoint did hold
            full = f"{module_name}.{pname}"
            if full in loaded:
                setattr(module, pname, torch.nn.Parameter(loaded[full], requires_grad=p.requires_grad))


def _load_generation_config(model, name_or_path, hub_kwargs) -> None:
    """Replace the default generation config by the checkpoint's generation_config.json, when both exist."""
    current = getattr(model, "generation_config", None)
    loader = getattr(type(current), "from_pretrained", None)
    if current is None or loader is None:
        return
    path = resolve_file(name_or_path, "generation_config.json", required=False, **hub_kwargs)
    if path is not None:
        model.generation_config = loader(os.path.dirname(path))


# -- saving ---------------------------------------------------------------------------------------------

def save_pretrained(model, save_directory, *, is_main_process=True, state_dict=None, max_shard_size="5GB",
                    safe_serialization=True, push_to_hub=False, variant=None, **kwargs) -> None:
    """Write config.json, generation_config.json and the weights (model.safetensors, or pytorch_model.bin when
    safe_serialization=False; sharded with an index past max_shard_size) in transformers' layout.
    Only the main process writes (is_main_process=False writes nothing, to avoid races)."""
    if kwargs:
        raise InvalidArgumentError(f"save_pretrained() got unexpected keyword argument(s) {', '.join(sorted(kwargs))}.")
    if push_to_hub:
        raise NotSupportedError("gpt2kit does not upload. Save to a directory, then upload it with "
                                  "huggingface_hub.upload_folder(repo_id=..., folder_path=save_directory).")
    if variant is not None:
        raise NotSupportedError("Weight variants (model.<variant>.safetensors) are not supported; omit variant=.")
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise InvalidInputError(f"save_pretrained needs a directory, but {save_directory!r} is a file.")
    if not is_main_process:
        return
    if state_dict is None:
        state_dict = model.state_dict()
        if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
            for key in getattr(model, "_tied_weights_keys", ()):  # tied from wte on load, as transformers omits it
                state_dict.pop(key, None)
    # quantized modules as transformers + bitsandbytes store them (checked before anything is written)
    state_dict = quant_loading.checkpoint_state(model, {k: to_file_layout(k, v) for k, v in state_dict.items()})
    os.makedirs(save_directory, exist_ok=True)

    config = model.config.copy()
    config.architectures = [type(model).__name__]
    config.dtype = model.dtype
    config.save_pretrained(save_directory)
    _save_generation_config(model, save_directory)
    formats.write_weights(state_dict, save_directory, safe=safe_serialization, max_shard_size=max_shard_size)


def _save_generation_config(model, save_directory) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(save_directory)
        return
    cfg = model.config
    minimal = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        minimal["pad_token_id"] = cfg.pad_token_id
    atomic_write_text(os.path.join(save_directory, "generation_config.json"), json.dumps(minimal, indent=2) + "\n")
