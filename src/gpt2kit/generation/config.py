"""GenerationConfig: every knob of `generate`, read from and written to `generation_config.json`.

As in transformers 5, an attribute left unset is None and takes its value at generation time, first from
the model's own generation config, then from GLOBAL_DEFAULTS below (max_length=20, top_k=50, ...). So a
saved file holds only what someone set, and `generate(**kwargs)` overrides both.
"""
from __future__ import annotations

import copy
import json
import numbers
import os
from ..errors import InvalidInputError

# attribute -> value when nobody set it (the values transformers 5 applies at generation time)
GLOBAL_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "early_stopping": False,
    "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "num_return_sequences": 1, "output_scores": False,
    "output_logits": False, "return_dict_in_generate": False, "renormalize_logits": False,
    "remove_invalid_values": False, "output_attentions": False, "output_hidden_states": False,
}

# every attribute GenerationConfig knows; all default to None (unset)
FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time", "stop_strings",
    "do_sample", "num_beams", "use_cache", "cache_implementation", "cache_config", "temperature", "top_k", "top_p",
    "min_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "renormalize_logits", "remove_invalid_values", "suppress_tokens", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "pad_token_id",
    "bos_token_id", "eos_token_id", "seed",
)

# arguments of generate() itself, which a config must not hold
GENERATE_ARGUMENTS = ("logits_processor", "stopping_criteria", "streamer", "tokenizer", "generator",
                      "prefix_allowed_tokens_fn", "assistant_model")

CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# field -> (test, what a value must be): each range defined once, applied by validate() and by the flags of
# `gpt2kit generate` (cli.py), so the command and the API accept the same values.
# SHAPE_RULES hold for a config on its own; VALUE_RULES are checked at generate time, as the reference
# checks them in its logits processors; SAMPLING_RULES only when sampling (greedy ignores these values).
SHAPE_RULES = {
    **dict.fromkeys(("max_new_tokens", "max_length", "num_beams", "num_return_sequences"),
                    (lambda v: _int(v) and v > 0, "a positive integer")),
    **dict.fromkeys(("min_new_tokens", "min_length", "no_repeat_ngram_size"),
                    (lambda v: _int(v) and v >= 0, "a non-negative integer")),
    "pad_token_id": (lambda v: v >= 0, "a non-negative token id"),
}
VALUE_RULES = {
    "top_k": (lambda v: _int(v) and v >= 0, "a non-negative integer (0 disables it)"),
    "top_p": (lambda v: _number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "min_p": (lambda v: _number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "typical_p": (lambda v: _number(v) and 0.0 < v <= 1.0, "a number in (0, 1]"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a strictly positive number"),
}
SAMPLING_RULES = {
    "temperature": (lambda v: _number(v) and v > 0, "a strictly positive number when sampling"),
}
RULES = {**SHAPE_RULES, **VALUE_RULES, **SAMPLING_RULES}


def check_value(name: str, value) -> None:
    """Raise InvalidInputError if `value` breaks the rule for field `name` (see RULES)."""
    test, what = RULES[name]
    if value is not None and not test(value):
        hint = "; for greedy decoding pass do_sample=False instead" if name in SAMPLING_RULES else ""
        raise InvalidInputError(f"`{name}` must be {what}, but is {value!r}{hint}.")


def fit_max_new_tokens(model) -> None:
    """Give a model whose generation config sets no length (a freshly trained one) max_new_tokens=50, the
    command's default, or half its context where that is shorter, so that its saved generation_config.json
    leaves room for a prompt."""
    gen = model.generation_config
    if gen.max_new_tokens is None and gen.max_length is None:
        gen.max_new_tokens = max(1, min(50, model.config.n_positions // 2))
        gen._from_model_config = False  # now a setting of its own, not a copy of config.json's


CONFIG_NAME = "generation_config.json"


class GenerationConfig:
    """Parameters of text generation (names, meanings and defaults as in transformers' GenerationConfig).

    Extra keyword arguments are kept as attributes (and saved), like transformers' custom entries.
    """

    def __init__(self, **kwargs):
        for name in FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        self._from_model_config = kwargs.pop("_from_model_config", None)
        self.transformers_version = kwargs.pop("transformers_version", None)
        for name in GENERATE_ARGUMENTS:
            if name in kwargs:
                raise InvalidInputError(f"`{name}` is an argument of generate(), not of GenerationConfig: pass it to "
                                 f"generate() (or the pipeline) directly.")
        for name, value in kwargs.items():  # custom entries are kept, as the reference does
            setattr(self, name, value)
        self.validate()

    # -- checks ------------------------------------------------------------------------------------
    def validate(self, combinations: bool = False) -> None:
        """Raise ValueError for values generation cannot honour (the same checks as the reference).

        `combinations` also checks settings that conflict with each other; generate() asks for it once the
        kwargs and defaults are merged (a config on its own may be completed later).
        """
        if self.early_stopping not in (None, True, False, "never"):
            raise InvalidInputError(f"`early_stopping` must be True, False or 'never', but is {self.early_stopping!r}.")
        for name in SHAPE_RULES:
            check_value(name, getattr(self, name))
        if self.cache_implementation is not None and self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise InvalidInputError(f"Unknown cache_implementation {self.cache_implementation!r}; choose one of "
                             f"{', '.join(map(repr, CACHE_IMPLEMENTATIONS))}.")
        if self.bad_words_ids is not None:
            ok = isinstance(self.bad_words_ids, list) and len(self.bad_words_ids) > 0 and all(
                isinstance(seq, list) and seq and all(isinstance(t, int) and t >= 0 for t in seq)
                for seq in self.bad_words_ids)
            if not ok:
                raise InvalidInputError("`bad_words_ids` must be a non-empty list of non-empty lists of token ids, "
                                 f"but is {self.bad_words_ids!r}.")
        if not combinations:
            return
        for name in VALUE_RULES:
            check_value(name, getattr(self, name))
        if self.do_sample:
            for name in SAMPLING_RULES:
                check_value(name, getattr(self, name))
        if self.num_return_sequences is not None and self.num_return_sequences > 1:
            beams = self.num_beams or 1
            if beams == 1 and not self.do_sample:
                raise InvalidInputError("Greedy methods (do_sample != True) without beam search do not support "
                                 f"`num_return_sequences` different than 1 (got {self.num_return_sequences}): "
                                 "pass do_sample=True or num_beams >= num_return_sequences.")
            if beams > 1 and self.num_return_sequences > beams:
                raise InvalidInputError(f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                                 f"`num_beams` ({beams}).")

    # -- merging -----------------------------------------------------------------------------------
    def update(self, **kwargs) -> dict:
        """Set the attributes this config has; return the kwargs it does not know (model inputs)."""
        unused = {}
        for key, value in kwargs.items():
            if key in FIELDS or hasattr(self, key) and not key.startswith("_"):
                setattr(self, key, value)
            else:
                unused[key] = value
        self.validate()
        return unused

    def fill_defaults(self, *others) -> "GenerationConfig":
        """Unset attributes take the first value set in `others` (dicts or configs), then GLOBAL_DEFAULTS."""
        for other in (*others, GLOBAL_DEFAULTS):
            values = other if isinstance(other, dict) else other.to_dict()
            for key, value in values.items():
                if value is not None and getattr(self, key, None) is None and not key.startswith("_") \
                        and key != "transformers_version":
                    setattr(self, key, value)
        return self

    def copy(self) -> "GenerationConfig":
        return copy.deepcopy(self)

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}

    def to_diff_dict(self) -> dict:
        """Only what differs from a fresh GenerationConfig (what the JSON file holds)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path, use_diff: bool = True) -> None:
        from ..utils import atomic_write_text

        atomic_write_text(str(path), self.to_json_string(use_diff))

    def save_pretrained(self, save_directory, config_file_name: str | None = None, **kwargs) -> None:
        if os.path.isfile(save_directory):
            raise InvalidInputError(f"save_directory {str(save_directory)!r} is a file: pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, config_file_name or CONFIG_NAME))

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "GenerationConfig":
        return cls(**{**config_dict, **kwargs})

    @classmethod
    def from_json_file(cls, path) -> "GenerationConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:  # binary: fails to decode before it fails to parse
                raise InvalidInputError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name, config_file_name: str | None = None, **kwargs) -> "GenerationConfig":
        """Read generation_config.json from a local directory (or a Hub repo through weights.hub)."""
        from ..weights.hub import resolve_file

        hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")
                      if k in kwargs}
        path = resolve_file(pretrained_model_name, config_file_name or CONFIG_NAME, **hub_kwargs)
        config = cls.from_json_file(path)
        config.update(**kwargs)
        return config

    @classmethod
    def from_model_config(cls, model_config) -> "GenerationConfig":
        """The generation settings a model config carries (GPT-2: bos/eos 50256, use_cache)."""
        data = model_config.to_dict() if not isinstance(model_config, dict) else dict(model_config)
        keep = {k: data[k] for k in FIELDS if data.get(k) is not None and k not in ("output_attentions",
                                                                                    "output_hidden_states")}
        keep = {k: v for k, v in keep.items() if GLOBAL_DEFAULTS.get(k, object()) != v or k == "use_cache"}
        return cls(**keep, _from_model_config=True)

    # -- comparisons and display -------------------------------------------------------------------
    def __eq__(self, other):
        if not isinstance(other, GenerationConfig):
            return NotImplemented
        strip = lambda d: {k: v for k, v in d.items() if k not in ("_from_model_config", "transformers_version")}
        return strip(self.to_diff_dict()) == strip(other.to_diff_dict())

    def __repr__(self):
        return f"GenerationConfig {self.to_json_string()}"
