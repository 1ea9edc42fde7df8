"""Text generation on token ids: GenerationConfig, logits processors, stopping criteria, the engine
(generate), and streamers that turn the ids back into text as they arrive."""
from .config import GenerationConfig
from .logits import (LogitsProcessor, LogitsProcessorList, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
                     MinPLogitsWarper, NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                     RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                     TypicalLogitsWarper)
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .stopping import EosTokenCriteria, MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer

__all__ = [name for name in dir() if not name.startswith("_")]
