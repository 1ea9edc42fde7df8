"""Auto classes: the reference's entry points that pick the GPT-2 class for a task.

gpt2kit implements GPT-2 only, so each Auto class maps to one concrete class; a config of another
model_type gets a clear error from GPT2Config.
"""
from __future__ import annotations

from importlib import import_module

from .config import GPT2Config
from .errors import InvalidInputError


class AutoConfig:
    def __init__(self):
        raise EnvironmentError("Use AutoConfig.from_pretrained(...) or AutoConfig.for_model('gpt2', ...).")

    @staticmethod
    def from_pretrained(name_or_path, **kwargs) -> GPT2Config:
        return GPT2Config.from_pretrained(name_or_path, **kwargs)

    @staticmethod
    def for_model(model_type: str = "gpt2", **kwargs) -> GPT2Config:
        if model_type != "gpt2":
            raise InvalidInputError(f"gpt2kit builds GPT-2 models only, not {model_type!r}.")
        return GPT2Config(**kwargs)


class _AutoModel:
    _target = ""  # name of the class in gpt2kit.model

    def __init__(self):
        raise EnvironmentError(f"Use {type(self).__name__}.from_pretrained(...) or .from_config(config).")

    @classmethod
    def _cls(cls):
        return getattr(import_module("gpt2kit.model"), cls._target)

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        return cls._cls().from_pretrained(name_or_path, *args, **kwargs)

    @classmethod
    def from_config(cls, config: GPT2Config, **kwargs):
        return cls._cls().from_config(config, **kwargs)


class AutoModel(_AutoModel):
    _target = "GPT2Model"


class AutoModelForCausalLM(_AutoModel):
    _target = "GPT2LMHeadModel"


class AutoModelForSequenceClassification(_AutoModel):
    _target = "GPT2ForSequenceClassification"


class AutoModelForTokenClassification(_AutoModel):
    _target = "GPT2ForTokenClassification"


class AutoModelForQuestionAnswering(_AutoModel):
    _target = "GPT2ForQuestionAnswering"
