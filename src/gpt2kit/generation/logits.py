"""Logits processors: each maps (input_ids (B, L), scores (B, V)) -> new scores (B, V).

They are the transforms transformers applies, with the same definitions, so that sampling distributions
and beam scores agree; `build_processors` puts them in the reference's order (penalties and bans first,
then the sampling warpers temperature -> top-k -> top-p -> min-p -> typical-p). All work on device
tensors without reading values back to the host.
"""
from __future__ import annotations

import math

import torch
from ..errors import InvalidInputError

NEG_INF = -math.inf


class LogitsProcessor:
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class LogitsProcessorList(list):
    """Applies its processors in order."""

    def __call__(self, input_ids, scores, **kwargs):
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def _eos_mask(eos_ids, vocab: int, device) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ids = torch.as_tensor(eos_ids, device=device).reshape(-1)
    mask[ids[ids < vocab]] = True
    return mask


class _EosBan(LogitsProcessor):
    """Shared by the two minimum-length processors: -inf on the eos ids (the mask is built once)."""

    def __init__(self, eos_token_id):
        self.eos, self._mask = eos_token_id, None

    def _ban(self, scores):
        if self._mask is None or self._mask.shape[0] != scores.shape[-1] or self._mask.device != scores.device:
            self._mask = _eos_mask(self.eos, scores.shape[-1], scores.device)
        return scores.masked_fill(self._mask, NEG_INF)

    def _bans(self, length: int) -> bool:  # whether eos is banned for sequences of `length` tokens
        raise NotImplementedError

    def __call__(self, input_ids, scores):
        return self._ban(scores) if self._bans(input_ids.shape[-1]) else scores

    def banned_ids(self, length: int, vocab: int) -> torch.Tensor | None:
        """The ids this processor sets to -inf at `length` (the same for every row), or None: what a greedy step
        that never materializes the scores (LMHead.argmax) must not choose."""
        if not self._bans(length):
            return None
        cached = self.__dict__.get("_banned")
        if cached is None or cached[0] != vocab:  # once: a (vocab,) mask each step cost ~0.1 ms
            cached = self._banned = (vocab, _eos_mask(self.eos, vocab, "cpu").nonzero()[:, 0])
        return cached[1]


class MinLengthLogitsProcessor(_EosBan):
    """Forbid end-of-sequence while the sequence (prompt included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id):
        super().__init__(eos_token_id)
        self.min_length = min_length

    def _bans(self, length: int) -> bool:
        return length < self.min_length


class MinNewTokensLengthLogitsProcessor(_EosBan):
    """Forbid end-of-sequence until `min_new_tokens` tokens follow the prompt (`prompt_length_to_skip`)."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id):
        super().__init__(eos_token_id)
        self.skip, self.min_new_tokens = prompt_length_to_skip, min_new_tokens

    def _bans(self, length: int) -> bool:
        return length - self.skip < self.min_new_tokens


class TemperatureLogitsWarper(LogitsProcessor):
    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise InvalidInputError(f"`temperature` must be a strictly positive float, but is {temperature!r}.")
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """CTRL's repetition penalty (Keskar et al. 2019): a seen token's logit is divided by the penalty when
    positive and multiplied by it when negative. `prompt_ignore_length` (int, or a (B,) tensor: the left
    padding of each row) excludes that many leading positions from "seen"."""

    def __init__(self, penalty: float, prompt_ignore_length=None):
        if not isinstance(penalty, (int, float)) or penalty <= 0:
            raise InvalidInputError(f"`penalty` must be a strictly positive float, but is {penalty!r}.")
        self.penalty, self.ignore = float(penalty), prompt_ignore_length

    def select_rows(self, rows):  # the engine dropped finished rows
        if isinstance(self.ignore, torch.Tensor):
            self.ignore = self.ignore.to(rows.device).index_select(0, rows)

    def __call__(self, input_ids, scores):
        B, V = scores.shape
        ids = input_ids.clamp(max=V)  # ids outside the head's vocabulary go to a spare column
        if isinstance(self.ignore, int):
            ids = ids[:, self.ignore:]
        elif self.ignore is not None:
            pos = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(pos[None, :] < self.ignore.to(ids.device)[:, None], V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :V]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Ban any token that would complete an n-gram already present in the row (Paulus et al. 2017)."""

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise InvalidInputError(f"`ngram_size` must be a strictly positive integer, but is {ngram_size!r}.")
        self.n = ngram_size

    def __call__(self, input_ids, scores):
        B, L = input_ids.shape
        V = scores.shape[-1]
        if L < self.n:  # no complete n-gram yet
            return scores
        # the last n-1 tokens against the first n-1 of every window of n; a match bans the window's last token
        tail = input_ids[:, L - self.n + 1:]  # (B, n-1)
        windows = input_ids.unfold(1, self.n, 1)  # (B, L-n+1, n)
        hit = (windows[..., :-1] == tail[:, None, :]).all(-1)  # (B, L-n+1)
        windows_last = windows[..., -1]
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(hit, windows_last.clamp(max=V), V), True)
        return scores.masked_fill(banned[:, :V], NEG_INF)


class NoBadWordsLogitsProcessor(LogitsProcessor):
    """Never emit a banned token sequence: a one-token entry is always banned; a longer one bans its last
    token when the row ends with the rest. Entries that are exactly an end-of-sequence id are ignored."""

    def __init__(self, bad_words_ids, eos_token_id=None):
        eos = [] if eos_token_id is None else torch.as_tensor(eos_token_id).reshape(-1).tolist()
        words = [list(w) for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        self.single = sorted({w[0] for w in words if len(w) == 1})
        self.multi = [w for w in words if len(w) > 1]

    def __call__(self, input_ids, scores):
        V = scores.shape[-1]
        for tok in self.single:
            if tok >= V:
                raise InvalidInputError(f"bad_words_ids holds token id {tok}, outside the model's vocabulary of {V}.")
        out = scores
        if self.single:
            mask = torch.zeros(V, dtype=torch.bool, device=scores.device)
            mask[self.single] = True
            out = out.masked_fill(mask, NEG_INF)
        for word in self.multi:
            prefix = torch.tensor(word[:-1], device=input_ids.device)
            k = len(prefix)
            if input_ids.shape[1] < k:
                continue
            match = (input_ids[:, -k:] == prefix).all(-1)  # (B,)
            col = torch.zeros_like(out, dtype=torch.bool)
            col[:, word[-1]] = True
            out = out.masked_fill(col & match[:, None], NEG_INF)
        return out


class TopKLogitsWarper(LogitsProcessor):
    """Keep the k largest logits (ties with the k-th kept too)."""

    def __init__(self, top_k: int, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise InvalidInputError(f"`top_k` must be a strictly positive integer, but is {top_k!r}.")
        self.k, self.filter_value = max(top_k, min_tokens_to_keep), filter_value

    def __call__(self, input_ids, scores):
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]  # (B, 1)
        return scores.masked_fill(scores < kth, self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose probability
    mass reaches top_p; a token whose ascending cumulative mass stays <= 1 - top_p is dropped."""

    def __init__(self, top_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise InvalidInputError(f"`top_p` must lie in [0, 1], but is {top_p}.")
        self.top_p, self.filter_value, self.keep = top_p, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)  # ascending mass
        drop = cum <= 1.0 - self.top_p
        drop[..., -self.keep:] = False
        return scores.masked_fill(drop.scatter(1, order, drop), self.filter_value)


class MinPLogitsWarper(LogitsProcessor):
    """min-p sampling (Nguyen et al. 2024): drop tokens less likely than min_p x the top token's probability."""

    def __init__(self, min_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        if not 0.0 <= min_p <= 1.0:
            raise InvalidInputError(f"`min_p` must lie in [0, 1], but is {min_p}.")
        self.min_p, self.filter_value, self.keep = min_p, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        probs = scores.softmax(-1)
        drop = probs < self.min_p * probs.amax(-1, keepdim=True)
        top = torch.topk(probs, min(self.keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, top, False)
        return scores.masked_fill(drop, self.filter_value)


class TypicalLogitsWarper(LogitsProcessor):
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprisal is closest to the
    entropy until their mass reaches `mass`."""

    def __init__(self, mass: float = 0.9, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0.0 < mass < 1.0:
            raise InvalidInputError(f"`typical_p` must lie in (0, 1), but is {mass}.")
        self.mass, self.filter_value, self.keep = mass, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        logp = torch.log_softmax(scores, -1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # (B, 1)
        distance = (-logp - entropy).abs()
        sorted_dist, order = torch.sort(distance, descending=False)
        cum = scores.gather(-1, order).softmax(-1).cumsum(-1)
        last = (cum < self.mass).sum(1).clamp_(max=scores.shape[-1] - 1)  # (B,)
        drop = sorted_dist > sorted_dist.gather(1, last[:, None])
        drop[..., : self.keep] = False
        return scores.masked_fill(drop.scatter(1, order, drop), self.filter_value)


class InfNanRemoveLogitsProcessor(LogitsProcessor):
    def __call__(self, input_ids, scores):
        scores = torch.where(scores != scores, torch.zeros_like(scores), scores)
        return scores.clamp(min=torch.finfo(scores.dtype).min, max=torch.finfo(scores.dtype).max)


class LogitNormalization(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores.log_softmax(-1)


def build_processors(cfg, prompt_length: int, eos_ids, padding_lengths=None, extra=None) -> LogitsProcessorList:
    """The processors `cfg` asks for, in the reference's order (user-supplied `extra` ones after the built-in
    penalties and before the sampling warpers)."""
    procs = LogitsProcessorList()
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, prompt_ignore_length=padding_lengths))
    if cfg.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        procs.append(NoBadWordsLogitsProcessor(cfg.bad_words_ids, eos_ids))
    if eos_ids is not None and cfg.min_length:
        procs.append(MinLengthLogitsProcessor(cfg.min_length, eos_ids))
    if eos_ids is not None and cfg.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, cfg.min_new_tokens, eos_ids))
    if cfg.remove_invalid_values:
        procs.append(InfNanRemoveLogitsProcessor())
    for p in extra or ():
        if any(type(p) is type(q) for q in procs):
            raise InvalidInputError(f"A {type(p).__name__} was passed in logits_processor, but generate() builds one from "
                             "the generation config too: set it in one place only.")
        procs.append(p)
    if cfg.do_sample:
        keep = 1
        if (cfg.num_beams or 1) > 1:  # beam sampling must keep a non-eos continuation
            keep = (len(eos_ids) if eos_ids is not None else 1) + 1
        if cfg.temperature is not None and cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=keep))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=keep))
        if cfg.min_p is not None:
            procs.append(MinPLogitsWarper(cfg.min_p, min_tokens_to_keep=keep))
        if cfg.typical_p is not None and cfg.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(cfg.typical_p, min_tokens_to_keep=keep))
    if cfg.renormalize_logits:
        procs.append(LogitNormalization())
    return procs
