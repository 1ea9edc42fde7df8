"""pipeline("text-generation"): text in, text out, a thin adapter over the tokenizer and the engine.

As the reference's TextGenerationPipeline: a str gives [{"generated_text": ...}] (one dict per returned
sequence), a list of str gives one such list per prompt; generation kwargs pass through to generate();
the pipeline's own defaults (max_new_tokens=256, do_sample=True, temperature=0.7) apply only where neither
the call nor the model's generation config sets a value. The default max_new_tokens is capped to what the
model's context leaves after the prompt (with a notice, once); a value the caller gave is never changed.
"""
from __future__ import annotations

import torch

from .generation.config import FIELDS, GenerationConfig
from .errors import InvalidInputError, InvalidArgumentError
from .utils import warn_once

SUPPORTED_TASKS = ("text-generation",)
# the reference's defaults for free-form text, used where neither the user nor the model set a value
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p")
GENERATE_ARGS = set(FIELDS) | {"generation_config", "logits_processor", "stopping_criteria", "streamer", "generator"}


def _device(device) -> torch.device:
    from .devices import resolve_device

    if device is None or (isinstance(device, int) and device < 0):  # the pipeline's -1 means the CPU
        return torch.device("cpu")
    return resolve_device(device, "pipeline(device=...)")


class TextGenerationPipeline:
    task = "text-generation"

    def __init__(self, model, tokenizer, device=None, batch_size: int | None = None, **kwargs):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device if device is None else _device(device)
        if self.device != model.device:
            self.model = self.model.to(self.device)
        if getattr(tokenizer, "padding_side", "left") == "right":  # GPT-2 generates after the last position
            tokenizer.padding_side = "left"
        self.batch_size = batch_size
        self.defaults = kwargs  # call kwargs given at construction apply to every call

    # -- the call ----------------------------------------------------------------------------------
    def __call__(self, text_inputs, **kwargs):
        kwargs = {**self.defaults, **kwargs}
        single = isinstance(text_inputs, str)
        if single:
            prompts = [text_inputs]
        elif isinstance(text_inputs, (list, tuple)) and all(isinstance(t, str) for t in text_inputs):
            prompts = list(text_inputs)
        else:
            raise InvalidArgumentError("text-generation takes a str or a list of str; chat messages need a chat template, "
                            "which GPT-2 does not have.")
        batch_size = kwargs.pop("batch_size", self.batch_size) or 1
        post = self._postprocess_params(kwargs)
        gen_kwargs, tok_kwargs, defaulted = self._split(kwargs)
        results = []
        for start in range(0, len(prompts), batch_size):
            results.extend(self._run(prompts[start:start + batch_size], gen_kwargs, tok_kwargs, post, defaulted))
        return results[0] if single else results

    def _postprocess_params(self, kwargs) -> dict:
        full, tensors, text = (kwargs.pop(k, None) for k in ("return_full_text", "return_tensors", "return_text"))
        if full is not None and tensors:
            raise InvalidInputError("`return_full_text` is mutually exclusive with `return_tensors`.")
        if text is not None and tensors:
            raise InvalidInputError("`return_text` is mutually exclusive with `return_tensors`.")
        return {"full_text": True if full is None else bool(full), "tensors": bool(tensors),
                "skip_special_tokens": kwargs.pop("skip_special_tokens", True),
                "clean_up_tokenization_spaces": kwargs.pop("clean_up_tokenization_spaces", None)}

    def _split(self, kwargs):
        tok_kwargs = {k: kwargs.pop(k) for k in ("add_special_tokens", "truncation", "padding") if k in kwargs}
        tok_kwargs.update(kwargs.pop("tokenizer_encode_kwargs", None) or {})
        stop = kwargs.pop("stop_sequence", None)
        if stop is not None:
            kwargs["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
        unknown = set(kwargs) - GENERATE_ARGS
        if unknown:
            raise InvalidArgumentError(f"text-generation pipeline got unknown argument(s): {', '.join(sorted(unknown))}.")
        gen_kwargs, defaulted = self._with_defaults(kwargs)
        return gen_kwargs, tok_kwargs, defaulted

    def _with_defaults(self, kwargs) -> tuple[dict, set]:
        """The reference's rule: pipeline defaults fill what neither the call nor the model's config set.
        Returns the generate kwargs and the names that took a pipeline default."""
        model_cfg = getattr(self.model, "generation_config", None) or GenerationConfig()
        set_params = {**model_cfg.to_diff_dict(), **kwargs}
        if kwargs.get("generation_config") is not None:
            set_params.update(kwargs["generation_config"].to_diff_dict())
        added = {k: v for k, v in PIPELINE_DEFAULTS.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if self.tokenizer.pad_token_id is not None and "pad_token_id" not in set_params:
            added["pad_token_id"] = self.tokenizer.pad_token_id
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_ONLY}
        if kwargs.get("generation_config") is not None:
            cfg = kwargs["generation_config"].copy()
            cfg.update(**added)
            return {**kwargs, "generation_config": cfg}, set(added)
        return {**kwargs, **added}, set(added)

    def _fit_default_length(self, kwargs, prompt_len) -> None:
        """Cap the pipeline's default max_new_tokens to what the model's context leaves after the prompt
        (a value the caller gave stays as given, and generate() refuses it if it does not fit)."""
        cfg = kwargs.get("generation_config")
        default = cfg.max_new_tokens if cfg is not None else kwargs["max_new_tokens"]
        n_pos = self.model.config.n_positions
        room = n_pos - prompt_len
        if not 0 < room < default:
            return
        warn_once(f"The pipeline's default max_new_tokens={default} does not fit this model's context of "
                  f"n_positions={n_pos} tokens: generating at most n_positions minus the prompt's length. Pass "
                  "max_new_tokens= to choose.", stacklevel=4)
        if cfg is not None:
            cfg = kwargs["generation_config"] = cfg.copy()
            cfg.max_new_tokens = room
        else:
            kwargs["max_new_tokens"] = room

    def _run(self, prompts, gen_kwargs, tok_kwargs, post, defaulted):
        tok = self.tokenizer
        pad_missing = len(prompts) > 1 and tok.pad_token_id is None
        if pad_missing:  # padding a batch needs some id; the attention mask hides it (the reference asks users for this)
            tok.pad_token = tok.eos_token
        try:
            enc = tok(prompts, return_tensors="pt", padding=len(prompts) > 1, **tok_kwargs)
        finally:
            if pad_missing:
                tok.pad_token = None
        input_ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device) if "attention_mask" in enc else None
        kwargs = dict(gen_kwargs)
        if kwargs.get("stop_strings") is not None:
            kwargs["tokenizer"] = tok
        if input_ids.shape[1] == 0:  # an empty prompt starts from the bos token, as generate() does
            input_ids, mask = None, None
        if "max_new_tokens" in defaulted:
            self._fit_default_length(kwargs, 1 if input_ids is None else input_ids.shape[1])
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        n_prompt = 0 if input_ids is None else input_ids.shape[1]
        per_prompt = sequences.shape[0] // len(prompts)
        records = []
        for i, prompt in enumerate(prompts):
            rows = sequences[i * per_prompt:(i + 1) * per_prompt].tolist()
            records.append([self._record(prompt, row, n_prompt, post) for row in rows])
        return records

    def _record(self, prompt, row, n_prompt, post):
        if post["tensors"]:
            return {"generated_token_ids": row}
        text = self.tokenizer.decode(row[n_prompt:], skip_special_tokens=post["skip_special_tokens"],
                                     clean_up_tokenization_spaces=post["clean_up_tokenization_spaces"])
        return {"generated_text": prompt + text if post["full_text"] else text}


def _default_model_dir():
    try:
        from .default_model import default_model_dir
    except ImportError:
        raise InvalidInputError("pipeline() was called without model=, and this gpt2kit has no embedded default model: "
                         "pass model= (a local checkpoint directory, a Hub name, or a loaded GPT2LMHeadModel).") from None
    return default_model_dir()


def pipeline(task: str | None = None, model=None, tokenizer=None, device=None, dtype=None, torch_dtype=None,
             device_map=None, batch_size: int | None = None, model_kwargs: dict | None = None, **kwargs):
    """Build a pipeline for `task` (only "text-generation"). `model` is a local directory, a Hub name, a loaded
    model, or None for the embedded default model; `tokenizer` likewise (defaults to the model's);
    `device` is "cpu", "cuda", "cuda:N", a CUDA index (-1 = CPU) or a torch.device; `dtype` "auto", a name or a
    torch.dtype. Other kwargs are call defaults (max_new_tokens, do_sample, return_full_text, ...)."""
    if task is None:
        task = "text-generation"
    if task not in SUPPORTED_TASKS:
        raise InvalidInputError(f"Unsupported task {task!r}: gpt2kit's pipeline supports {', '.join(SUPPORTED_TASKS)}.")
    if device is not None and device_map is not None:
        raise InvalidInputError("Pass either device or device_map to pipeline(), not both.")
    dtype = dtype if dtype is not None else torch_dtype
    target = _device(device if device is not None else device_map) if (device is not None or device_map) else None
    if model is None:
        model = _default_model_dir()
    name = None
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from .auto import AutoModelForCausalLM

        name = model
        load = dict(model_kwargs or {})
        if dtype is not None:
            load["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(model, **load)
    elif dtype not in (None, "auto"):
        from .weights.checkpoint import parse_dtype

        model = model.to(parse_dtype(dtype))
    if not hasattr(model, "generate") or not model.can_generate():
        raise InvalidArgumentError(f"text-generation needs a model with a language-modelling head (GPT2LMHeadModel), "
                        f"got {type(model).__name__}.")
    if tokenizer is None:
        name = name or getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not name:
            raise InvalidInputError("pipeline() could not tell which tokenizer goes with this model: pass tokenizer= "
                             "(a GPT2Tokenizer, a directory or a Hub name).")
        tokenizer = name
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from .tokenizer import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, device=target, batch_size=batch_size, **kwargs)
