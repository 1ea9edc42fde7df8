"""GPT2Config: the fields and defaults of the reference page, validation, and config.json in and out.

A plain class rather than a dataclass so that unknown keys from a Hugging Face config.json (written by
newer or older transformers, or by fine-tuning scripts) are kept as attributes and written back.
"""
from __future__ import annotations

import copy
import json
import os

from .utils import atomic_write_text
from .errors import InvalidInputError, InvalidArgumentError

# field -> default, in the order of the reference page
_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "summary_activation": None,
    "summary_proj_to_labels": True,
    "summary_first_dropout": 0.1,
    "scale_attn_weights": True,
    "use_cache": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": None,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# generic fields every transformers config carries; written only when they differ from these
_GENERIC_DEFAULTS = {
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict": True,
    "problem_type": None,
    "architectures": None,
    "dtype": None,
}

ACTIVATIONS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish", "tanh", "sigmoid", "linear", "gelu_python", "mish", "relu6", "leaky_relu")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index", "attn")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

CONFIG_NAME = "config.json"


class GPT2Config:
    model_type = "gpt2"
    # transformers' generic names for GPT-2's fields
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(self, **kwargs):
        for canonical, alias_of in ((k, v) for k, v in self.attribute_map.items()):
            if canonical in kwargs:  # hidden_size=... sets n_embd
                kwargs.setdefault(alias_of, kwargs.pop(canonical))
        if "torch_dtype" in kwargs:  # older transformers wrote torch_dtype
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        for key, default in {**_DEFAULTS, **_GENERIC_DEFAULTS}.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        self._attn_implementation = kwargs.pop("attn_implementation", None) or kwargs.pop("_attn_implementation", None) or "sdpa"
        # classification fields: num_labels / id2label / label2id stay consistent with each other
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise InvalidInputError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} entries.")
        else:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        self.id2label = id2label
        self.label2id = {k: int(v) for k, v in label2id.items()} if label2id is not None else {v: k for k, v in id2label.items()}
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        # anything else (summary_last_dropout, classifier_dropout, task_specific_params, ...) is kept
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.validate()

    # -- aliases -------------------------------------------------------------------------------
    def __getattr__(self, name):  # only called when normal lookup fails
        alias = type(self).attribute_map.get(name)
        if alias is not None:
            return getattr(self, alias)
        raise AttributeError(f"'GPT2Config' has no attribute {name!r}")

    def __setattr__(self, name, value):
        name = type(self).attribute_map.get(name, name)
        super().__setattr__(name, value)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int):
        if n != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def torch_dtype(self):
        return self.dtype

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"GPT2Config.{key} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head:
            raise InvalidInputError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise InvalidInputError(f"n_inner must be None or a positive integer, got {self.n_inner!r}.")
        if self.activation_function not in ACTIVATIONS:
            raise InvalidInputError(f"Unknown activation_function {self.activation_function!r}; choose one of {', '.join(ACTIVATIONS)}.")
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidInputError(f"{key} must be a probability in [0, 1], got {value!r}.")
        if not self.layer_norm_epsilon > 0:
            raise InvalidInputError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}.")
        if self.summary_type not in SUMMARY_TYPES:
            raise InvalidInputError(f"Unknown summary_type {self.summary_type!r}; choose one of {', '.join(SUMMARY_TYPES)}.")
        if self.problem_type not in PROBLEM_TYPES:
            raise InvalidInputError(f"Unknown problem_type {self.problem_type!r}; choose one of {PROBLEM_TYPES[1:]} or None.")
        if self._attn_implementation not in ATTN_IMPLEMENTATIONS:
            known = {"flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention"}
            what = ("is one of transformers' GPU kernels, which gpt2kit does not ship"
                    if self._attn_implementation in known else "is not an attention implementation gpt2kit knows")
            raise InvalidInputError(f"attn_implementation={self._attn_implementation!r} {what}. The implementations "
                                    f"here are 'sdpa' (PyTorch's scaled_dot_product_attention, which picks a flash "
                                    f"kernel itself where the device has one) and 'eager' (explicit softmax).")

    # -- dict / json ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            if key in _GENERIC_DEFAULTS and value == _GENERIC_DEFAULTS[key]:
                continue
            out[key] = copy.deepcopy(value)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if out["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}:  # transformers leaves the default out
            del out["id2label"], out["label2id"]
        if isinstance(out.get("dtype"), object) and out.get("dtype") is not None:
            out["dtype"] = str(out["dtype"]).replace("torch.", "")
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "GPT2Config":
        model_type = config_dict.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise InvalidInputError(f"This is a config for model_type {model_type!r}; gpt2kit loads GPT-2 ('gpt2') models only.")
        return cls(**{**config_dict, **kwargs})

    @classmethod
    def from_json_file(cls, path: str) -> "GPT2Config":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a binary file fails to decode before it fails to parse
            raise InvalidInputError(f"{path} is not valid JSON ({e}). Re-save the config or fix the file.") from None
        if not isinstance(data, dict):
            raise InvalidInputError(f"{path} must hold a JSON object of config fields.")
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str, **_) -> None:
        if os.path.isfile(save_directory):
            raise InvalidInputError(f"save_pretrained needs a directory, but {save_directory!r} is a file.")
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(cls, name_or_path, *, return_unused_kwargs: bool = False, cache_dir=None, revision=None,
                        local_files_only: bool = False, token=None, subfolder: str = "", **kwargs) -> "GPT2Config":
        from .weights.hub import resolve_file

        path = resolve_file(name_or_path, CONFIG_NAME, cache_dir=cache_dir, revision=revision,
                            local_files_only=local_files_only, token=token, subfolder=subfolder)
        config = cls.from_json_file(path)
        unused = {}
        if "id2label" in kwargs:  # a new label set: ids are ints, label2id follows unless given too
            kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
            kwargs.setdefault("label2id", {v: k for k, v in kwargs["id2label"].items()})
        for key, value in kwargs.items():
            if key in config.__dict__ or key in cls.attribute_map or key in ("num_labels", "attn_implementation"):
                if key == "attn_implementation":
                    key = "_attn_implementation"
                setattr(config, key, value)
            else:
                unused[key] = value
        config.validate()
        if return_unused_kwargs:
            return config, unused
        if unused:
            raise InvalidArgumentError(f"Unknown GPT2Config field(s): {', '.join(sorted(unused))}.")
        return config

    def copy(self) -> "GPT2Config":
        return copy.deepcopy(self)

    def __eq__(self, other):
        return isinstance(other, GPT2Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"GPT2Config {self.to_json_string()}"
