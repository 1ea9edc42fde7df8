"""The generation engine: token ids in, token ids out.

generate() merges the settings (kwargs > generation_config > the model's > defaults), checks lengths
before any work, expands the batch for beams / return sequences, then runs a prefill and a decode loop
(greedy or sampling here, beam search in beam.py) over a runner (runner.py). Left padding is handled with
positions from the attention mask (cumsum - 1, as the reference computes them), so each row gives what it
gives alone; rows that finish leave the batch and the cache when nothing needs their later scores.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .config import GenerationConfig
from .logits import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, build_processors
from .outputs import GenerateDecoderOnlyOutput
from . import runner as runners
from .stopping import StoppingCriteriaList, StopStringCriteria
from .guards import check_finite_logits, check_generation_fits, nonfinite, nonfinite_logits_error
from ..errors import ContextLengthError, InvalidArgumentError, InvalidInputError, check_context_length
from ..model.cache import Cache, StaticCache
from ..utils import warn_once

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs")
EOS_BANS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)  # processors that only ban eos


@dataclass
class Plan:
    """Everything the search loops need, resolved once."""

    cfg: GenerationConfig
    input_ids: torch.LongTensor  # (B * expand, P)
    attention_mask: torch.Tensor | None  # (B * expand, P) or None when nothing is padded
    position_ids: torch.LongTensor  # (B * expand, P)
    eos: torch.LongTensor | None  # (n_eos,)
    pad: int
    max_length: int
    processors: list
    criteria: StoppingCriteriaList
    generator: torch.Generator | None
    streamer: object
    cache: object = None  # a cache the caller passed, holding the first `past` positions of input_ids
    past: int = 0


def generation_config_of(model) -> GenerationConfig:
    cfg = getattr(model, "generation_config", None)
    return cfg if cfg is not None else GenerationConfig.from_model_config(model.config)


def _resolve_config(model, generation_config, kwargs):
    """(merged config, leftover kwargs = model inputs, whether max_length is the global default)."""
    base = generation_config if generation_config is not None else generation_config_of(model)
    if not isinstance(base, GenerationConfig):
        if not hasattr(base, "to_diff_dict"):
            raise InvalidArgumentError(f"generation_config must be a GenerationConfig, got {type(base).__name__}.")
        base = GenerationConfig.from_dict(  # e.g. transformers' own GenerationConfig
            {k: v for k, v in base.to_diff_dict().items() if not k.startswith("_") or k == "_from_model_config"})
    cfg = base.copy()
    default_max_length = (kwargs.get("max_length") is None and cfg.max_length is None
                          and generation_config_of(model).max_length is None)
    model_inputs = cfg.update(**kwargs)
    cfg.fill_defaults(generation_config_of(model))
    cfg.validate(combinations=True)
    return cfg, model_inputs, default_max_length


def _as_eos(eos) -> torch.LongTensor | None:
    if eos is None:
        return None
    t = torch.as_tensor(eos, dtype=torch.long).reshape(-1)
    return t if t.numel() else None


def prepare(model, inputs, generation_config, logits_processor, stopping_criteria, streamer, tokenizer,
            generator, kwargs) -> Plan:
    # a length the caller gave is strict; one from the model's generation config is a default, capped to fit
    given = [k for k in ("max_new_tokens", "max_length") if kwargs.get(k) is not None
             or getattr(generation_config, k, None) is not None]
    cfg, extra, default_max = _resolve_config(model, generation_config, kwargs)
    input_ids = extra.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise InvalidInputError("Pass the prompt once: either as the first argument (inputs) or as input_ids=.")
    input_ids = inputs if inputs is not None else input_ids
    attention_mask = extra.pop("attention_mask", None)
    cache = extra.pop("past_key_values", None)
    if extra.get("cache") is not None:
        if cache is not None:
            raise InvalidInputError("Pass the cache once: past_key_values= or cache=, not both.")
        cache = extra.pop("cache")
    extra.pop("cache", None)
    if extra.get("inputs_embeds") is not None:
        raise InvalidInputError("generate() does not take inputs_embeds: pass the prompt as input_ids.")
    extra.pop("inputs_embeds", None)
    extra.pop("use_cache", None)
    for key in ("output_attentions", "output_hidden_states"):
        if getattr(cfg, key):
            raise InvalidInputError(f"generate() does not collect {key.split('_', 1)[1]}; run the model's forward on "
                             "the returned sequences to get them.")
    if extra:
        raise InvalidInputError(f"generate() got argument(s) it does not know: {', '.join(sorted(extra))}. They are neither "
                         "GenerationConfig fields nor model inputs (input_ids, attention_mask).")

    device = model.device
    eos = _as_eos(cfg.eos_token_id)
    if input_ids is None:  # no prompt: start from the beginning-of-sequence token
        if cfg.bos_token_id is None:
            raise InvalidInputError("No prompt was given and the generation config has no bos_token_id to start from: "
                             "pass input_ids.")
        input_ids = torch.full((1, 1), cfg.bos_token_id, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise InvalidInputError(f"input_ids must be a (batch, length) tensor of token ids, got shape "
                         f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}.")
    input_ids = input_ids.long().to(device)
    B, P = input_ids.shape
    if P == 0:
        raise InvalidInputError("The prompt is empty: pass at least one token id (for example the bos token).")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)

    if attention_mask is None:  # inferred as the reference does: pad ids mark padding unless pad == eos
        if cfg.pad_token_id is not None and (eos is None or cfg.pad_token_id not in eos.tolist()) \
                and bool((input_ids == cfg.pad_token_id).any()):
            attention_mask = (input_ids != cfg.pad_token_id).long()
    else:
        attention_mask = torch.as_tensor(attention_mask).to(device)
        if attention_mask.shape != input_ids.shape:
            raise InvalidInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}: they must match.")
    if attention_mask is not None:
        if B > 1 and bool((attention_mask[:, -1] == 0).any()):
            warnings.warn("Right padding was detected: GPT-2 generates after the last position, so pad on the left "
                          "(tokenizer.padding_side = 'left') for correct results.", UserWarning, stacklevel=3)
        if bool((attention_mask.sum(-1) == 0).any()):
            raise InvalidInputError("A row of attention_mask is all zeros: every prompt needs at least one real token.")
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        if bool(attention_mask.all()):
            attention_mask = None
    else:
        position_ids = torch.arange(P, device=device).expand(B, P)

    # lengths, checked before any work
    n_pos = model.config.n_positions
    if given == ["max_length"]:  # the caller's max_length, not the model's default max_new_tokens, decides
        cfg.max_new_tokens = None
    length_key = "max_new_tokens" if cfg.max_new_tokens is not None else "max_length"
    if cfg.max_new_tokens is not None:
        max_length = P + cfg.max_new_tokens
    elif default_max:
        max_length = min(P + cfg.max_length, n_pos)
    else:
        max_length = cfg.max_length
    if max_length > n_pos and length_key not in given and P < n_pos:
        warn_once(f"The model's generation_config sets {length_key}={getattr(cfg, length_key)}, which does not fit "
                  f"its context of n_positions={n_pos} tokens: generating at most n_positions minus the prompt's "
                  f"length. Pass {length_key}= to choose.", stacklevel=5)
        max_length = n_pos
    if P >= max_length:
        raise InvalidInputError(f"Input length of input_ids is {P}, but `max_length` is set to {max_length}: increase "
                         "max_length or, better, set max_new_tokens.")
    if length_key == "max_length" and max_length > n_pos:
        raise ContextLengthError(f"max_length={max_length} is beyond this model's n_positions={n_pos} (its longest "
                                 f"sequence): pass max_length <= {n_pos}, or max_new_tokens.")
    check_context_length(P, max_length - P, n_pos)
    cfg.max_length = max_length
    if cfg.min_new_tokens is not None:
        cfg.min_length = P + cfg.min_new_tokens
        cfg.min_new_tokens = None  # folded into min_length, as the reference does

    padding_lengths = None
    if cfg.repetition_penalty not in (None, 1.0) and attention_mask is not None:
        padding_lengths = (attention_mask != 0).int().argmax(1)
    expand = max(cfg.num_beams, cfg.num_return_sequences)
    check_generation_fits(model, B * expand, B, P, max_length, cfg)
    past = _check_prefix_cache(cache, B, P, max_length, model.config) if cache is not None else 0
    if expand > 1:
        if cache is not None:  # every beam / returned sequence continues from its row's cached prefix
            rows = torch.arange(B, device=device).repeat_interleave(expand)
            cache.select_rows(rows) if isinstance(cache, StaticCache) else cache.reorder_cache(rows)
        input_ids = input_ids.repeat_interleave(expand, 0)
        position_ids = position_ids.repeat_interleave(expand, 0)
        attention_mask = attention_mask.repeat_interleave(expand, 0) if attention_mask is not None else None
        padding_lengths = padding_lengths.repeat_interleave(expand, 0) if padding_lengths is not None else None

    processors = build_processors(cfg, P, eos.to(device) if eos is not None else None, padding_lengths,
                                  extra=logits_processor)
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if cfg.stop_strings:
        criteria.append(StopStringCriteria(tokenizer, cfg.stop_strings))
    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    return Plan(cfg, input_ids, attention_mask, position_ids, eos.to(device) if eos is not None else None, pad,
                max_length, processors, criteria, generator, streamer, cache, past)


def _check_prefix_cache(cache, B: int, P: int, max_length: int, config) -> int:
    """A cache passed to generate() must hold a prefix of every row of input_ids (as in transformers, which
    then reads only the tokens after it); returns its length."""
    if not isinstance(cache, Cache):
        if isinstance(cache, (tuple, list)):
            raise InvalidArgumentError("generate() takes a DynamicCache or StaticCache as past_key_values; convert a "
                                       "legacy tuple with DynamicCache.from_legacy_cache(past).")
        raise InvalidArgumentError(f"past_key_values must be a DynamicCache or StaticCache, got {type(cache).__name__}.")
    past = cache.get_seq_length()
    if past >= P:
        raise InvalidInputError(f"The cache already holds {past} positions but the prompt has {P} tokens: pass "
                                "input_ids that extend what the cache holds by at least one token.")
    rows = cache.max_batch_size if isinstance(cache, StaticCache) else (
        cache.layers[0][0].shape[0] if past else B)
    if rows != B:
        raise InvalidInputError(f"The cache holds {rows} rows but input_ids has {B}: they must match.")
    if isinstance(cache, StaticCache) and cache.max_cache_len < max_length:
        raise ContextLengthError(f"The StaticCache holds {cache.max_cache_len} positions, but this generation needs "
                                 f"{max_length}: build it with max_cache_len >= {max_length} or ask for fewer tokens.")
    return past


@torch.no_grad()
def generate(model, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
             streamer=None, tokenizer=None, generator=None, **kwargs):
    """Generate token ids after a prompt; see GenerationConfig for the settings (kwargs override it).

    Returns the sequences (prompt included), or, with return_dict_in_generate=True, an output object with
    sequences, scores / logits (when output_scores / output_logits) and past_key_values.
    """
    if not model.can_generate():
        raise InvalidArgumentError(f"{type(model).__name__} has no language-modelling head: use GPT2LMHeadModel to generate.")
    plan = prepare(model, inputs, generation_config, logits_processor, stopping_criteria, streamer, tokenizer,
                   generator, kwargs)
    if plan.cfg.num_beams > 1:
        from .beam import beam_search

        if streamer is not None:
            raise InvalidInputError("A streamer shows one sequence as it grows; beam search only knows its sequences at the "
                             "end. Use num_beams=1 with a streamer, or stream the returned text yourself.")

        return beam_search(model, plan)
    return sample_or_greedy(model, plan)


def greedy_by_head(plan: Plan, runner, keeps_scores: bool) -> bool:
    """Whether decode steps may ask the head for each row's argmax instead of its logits (runner.step_greedy:
    the float32 head's int8 screen, model/linear.py LMHead.argmax): greedy, no scores or logits kept, and
    nothing that reads the scores but the minimum-length eos bans (whose ids the head then never picks) and
    stop strings (which read the tokens only)."""
    return (not plan.cfg.do_sample and not keeps_scores and getattr(runner, "step_greedy", None) is not None
            and all(type(p) in EOS_BANS for p in plan.processors)
            and all(type(c) is StopStringCriteria for c in plan.criteria))


def banned_ids(processors, length: int, vocab: int):
    """The ids the processors set to -inf for sequences of `length` (eos before min_new_tokens), or None."""
    ids = [b for p in processors if (b := p.banned_ids(length, vocab)) is not None]
    return torch.cat(ids) if ids else None


def _next_positions(position_ids):
    return position_ids[:, -1] + 1


def sample_or_greedy(model, plan: Plan):
    cfg = plan.cfg
    ids = plan.input_ids
    B, P = ids.shape
    device = ids.device
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores_out, logits_out = [], []
    runner = runners.make_runner(model, plan)
    # finished rows may leave the batch unless someone needs every row at every step
    can_drop = not (want_scores or want_logits or plan.criteria or plan.streamer is not None
                    or getattr(runner, "fixed_batch", False))
    stops = plan.eos is not None or bool(plan.criteria)
    check_every = 1 if device.type == "cpu" else 8  # on a GPU, read "all done?" back only now and then
    # NaN/inf logits: checked at once where the host waits for the device anyway (a CPU; a streamer's
    # .cpu()), else flagged on the device and read back with "all done?" (and once at the end)
    check_now = device.type == "cpu" or plan.streamer is not None
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step with NaN/inf logits (0: none)
    dtype = model.dtype  # once: the property walks the parameters

    seq = torch.full((B, plan.max_length), plan.pad, dtype=torch.long, device=device)  # rows still running
    seq[:, :P] = ids
    out = seq if not can_drop else seq.clone()  # every row, for the result
    rows = torch.arange(B, device=device)  # where each running row goes in `out`
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    done_at = torch.full((B,), plan.max_length, dtype=torch.long, device=device)  # length of each finished row

    if plan.streamer is not None:
        plan.streamer.put(ids.cpu())
    positions = _next_positions(plan.position_ids)
    logits = runner.prefill(ids, plan.attention_mask, plan.position_ids)
    best = None  # a step's argmax from the head itself (greedy_by_head), when it gave no logits
    by_head = greedy_by_head(plan, runner, want_scores or want_logits)
    vocab = model.config.vocab_size
    cur = P
    while True:
        if best is not None:
            nxt = best  # the argmax of this step's logits, which were all finite (LMHead.argmax)
        else:
            raw = logits.float()
            if check_now:
                check_finite_logits(raw, cur - P + 1, dtype)
            else:
                bad = nonfinite(raw)
                first_bad = torch.where(bad & (first_bad == 0), cur - P + 1, first_bad)
                raw = raw.masked_fill(bad, 0.0)  # keeps sampling valid until the flag is read; the result is refused
            scores = plan.processors(seq[:, :cur], raw.clone() if want_logits else raw) if plan.processors else raw
            if want_scores:
                scores_out.append(scores)
            if want_logits:
                logits_out.append(raw)
            if cfg.do_sample:
                probs = torch.softmax(scores, -1)
                nxt = torch.multinomial(probs, 1, generator=plan.generator).squeeze(1)
            else:
                nxt = scores.argmax(-1)
        if stops:
            nxt = torch.where(unfinished, nxt, plan.pad)
        seq[:, cur] = nxt
        if can_drop:
            out[rows, cur] = nxt
        if plan.streamer is not None:
            plan.streamer.put(nxt.cpu())
        cur += 1
        if stops and (plan.criteria or cur > cfg.min_length):  # before min_length eos is banned: nothing can end
            hit = torch.zeros_like(unfinished)
            if plan.eos is not None:
                hit = torch.isin(nxt, plan.eos)
            if plan.criteria:
                hit = hit | plan.criteria(seq[:, :cur], scores if best is None else None)
            newly = unfinished & hit
            done_at[rows] = torch.where(newly, cur, done_at[rows])
            unfinished = unfinished & ~hit
        if cur >= plan.max_length:
            break
        if stops and (cur - P) % check_every == 0 and cur >= cfg.min_length:
            if check_now:
                n_left = int(unfinished.sum())
            else:  # one read-back for both flags
                n_left, bad_at = torch.stack((unfinished.sum(), first_bad)).tolist()
                if bad_at:
                    raise nonfinite_logits_error(bad_at, model.dtype)
            if n_left == 0:
                break
            if can_drop and n_left < unfinished.numel():
                keep = unfinished.nonzero().squeeze(1)
                runner.keep_rows(keep)
                seq, rows, unfinished, positions = seq[keep], rows[keep], unfinished[keep], positions[keep]
                for p in plan.processors:
                    if hasattr(p, "select_rows"):
                        p.select_rows(keep)
        if by_head:
            best, logits = runner.step_greedy(seq[:, cur - 1], positions, banned_ids(plan.processors, cur, vocab))
        else:
            logits = runner.step(seq[:, cur - 1], positions)
        positions = positions + 1

    if not check_now and int(first_bad):
        raise nonfinite_logits_error(int(first_bad), model.dtype)
    if stops and not bool(unfinished.any()):  # all rows ended: stop where the last one did (the reference's length)
        cur = min(cur, int(done_at.max()))
    sequences = out[:, :cur]
    if plan.streamer is not None:
        plan.streamer.end()
    if not cfg.return_dict_in_generate:
        return sequences
    n_new = cur - P
    return GenerateDecoderOnlyOutput(sequences=sequences,
                                     scores=tuple(scores_out[:n_new]) if want_scores else None,
                                     logits=tuple(logits_out[:n_new]) if want_logits else None,
                                     past_key_values=runner.final_cache())
