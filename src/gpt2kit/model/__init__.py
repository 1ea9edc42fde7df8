"""The GPT-2 network: body (gpt2.py), layers, heads, caches and output types."""
from .cache import Cache, DynamicCache, StaticCache
from .gpt2 import GPT2Model, GPT2PreTrainedModel
from .heads import GPT2LMHeadModel

__all__ = ["Cache", "DynamicCache", "StaticCache", "GPT2Model", "GPT2PreTrainedModel", "GPT2LMHeadModel"]


def __getattr__(name):  # task heads live in heads.py too; imported when first asked for
    from . import heads

    try:
        return getattr(heads, name)
    except AttributeError:
        raise AttributeError(f"module 'gpt2kit.model' has no attribute {name!r}") from None
