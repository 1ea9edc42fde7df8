"""gpt2kit: a complete, exact and fast GPT-2 system on PyTorch.

The public names mirror the Hugging Face reference page, so that its examples run after changing only
the import line. They are loaded lazily (PEP 562) so that `import gpt2kit` costs little beyond
`import torch`.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GPT2Config": "gpt2kit.config",
    "AutoConfig": "gpt2kit.auto",
    "GPT2Tokenizer": "gpt2kit.tokenizer",
    "GPT2TokenizerFast": "gpt2kit.tokenizer",
    "AutoTokenizer": "gpt2kit.tokenizer",
    "BatchEncoding": "gpt2kit.tokenizer",
    "GPT2PreTrainedModel": "gpt2kit.model",
    "GPT2Model": "gpt2kit.model",
    "GPT2LMHeadModel": "gpt2kit.model",
    "GPT2DoubleHeadsModel": "gpt2kit.model",
    "GPT2ForQuestionAnswering": "gpt2kit.model",
    "GPT2ForSequenceClassification": "gpt2kit.model",
    "GPT2ForTokenClassification": "gpt2kit.model",
    "AutoModel": "gpt2kit.auto",
    "AutoModelForCausalLM": "gpt2kit.auto",
    "AutoModelForSequenceClassification": "gpt2kit.auto",
    "AutoModelForTokenClassification": "gpt2kit.auto",
    "AutoModelForQuestionAnswering": "gpt2kit.auto",
    "Cache": "gpt2kit.model.cache",
    "DynamicCache": "gpt2kit.model.cache",
    "StaticCache": "gpt2kit.model.cache",
    "BaseModelOutputWithPastAndCrossAttentions": "gpt2kit.model.outputs",
    "CausalLMOutputWithCrossAttentions": "gpt2kit.model.outputs",
    "GPT2DoubleHeadsModelOutput": "gpt2kit.model.outputs",
    "QuestionAnsweringModelOutput": "gpt2kit.model.outputs",
    "SequenceClassifierOutputWithPast": "gpt2kit.model.outputs",
    "TokenClassifierOutput": "gpt2kit.model.outputs",
    "GenerationConfig": "gpt2kit.generation",
    "TextStreamer": "gpt2kit.generation",
    "TextIteratorStreamer": "gpt2kit.generation",
    "pipeline": "gpt2kit.pipelines",
    "TextGenerationPipeline": "gpt2kit.pipelines",
    "set_seed": "gpt2kit.utils",
    "BitsAndBytesConfig": "gpt2kit.quantization",
    "TorchAoConfig": "gpt2kit.quantization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2kit' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
