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
from .logits import build_processors
from .outputs import GenerateDecoderOnlyOutput
from .runner import DecodeRunner, ModelRunner, decode_supported
from .stopping import StoppingCriteriaList, StopStringCriteria
from ..errors import InvalidInputError, InvalidArgumentError

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs")


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
    cfg, extra, default_max = _resolve_config(model, generation_config, kwargs)
    input_ids = extra.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise InvalidInputError("Pass the prompt once: either as the first argument (inputs) or as input_ids=.")
    input_ids = inputs if inputs is not None else input_ids
    attention_mask = extra.pop("attention_mask", None)
    for key in ("past_key_values", "cache", "inputs_embeds"):
        if extra.get(key) is not None:
            raise InvalidInputError(f"generate() does not take {key}: pass the whole prompt as input_ids; the engine builds "
                             "its own cache (choose it with cache_implementation='static' or 'dynamic').")
        extra.pop(key, None)
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
    if cfg.max_new_tokens is not None:
        max_length = P + cfg.max_new_tokens
    elif default_max:
        max_length = min(P + cfg.max_length, model.config.n_positions)
    else:
        max_length = cfg.max_length
    if P >= max_length:
        raise InvalidInputError(f"Input length of input_ids is {P}, but `max_length` is set to {max_length}: increase "
                         "max_length or, better, set max_new_tokens.")
    n_pos = model.config.n_positions
    if max_length > n_pos:
        raise InvalidInputError(f"The prompt ({P} tokens) plus max_new_tokens ({max_length - P}) is {max_length} tokens, "
                         f"beyond this model's n_positions={n_pos} (its longest sequence). Shorten the prompt or "
                         f"ask for at most {n_pos - P} new tokens.")
    cfg.max_length = max_length
    if cfg.min_new_tokens is not None:
        cfg.min_length = P + cfg.min_new_tokens
        cfg.min_new_tokens = None  # folded into min_length, as the reference does

    padding_lengths = None
    if cfg.repetition_penalty not in (None, 1.0) and attention_mask is not None:
        padding_lengths = (attention_mask != 0).int().argmax(1)
    expand = max(cfg.num_beams, cfg.num_return_sequences)
    if expand > 1:
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
                max_length, processors, criteria, generator, streamer)


def make_runner(model, plan: Plan):
    B = plan.input_ids.shape[0]
    impl = plan.cfg.cache_implementation
    if impl == "dynamic" or not decode_supported(model):
        return ModelRunner(model, B, plan.max_length, plan.attention_mask, static=impl == "static")
    if model.device.type == "cuda":  # fixed shapes, the decode step replayed from a CUDA graph
        from .graphs import GraphRunner

        return GraphRunner(model, B, plan.max_length, plan.attention_mask)
    return DecodeRunner(model, B, plan.max_length, plan.attention_mask)


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
    runner = make_runner(model, plan)
    # finished rows may leave the batch unless someone needs every row at every step
    can_drop = not (want_scores or want_logits or plan.criteria or plan.streamer is not None
                    or getattr(runner, "fixed_batch", False))
    stops = plan.eos is not None or bool(plan.criteria)
    check_every = 1 if device.type == "cpu" else 8  # on a GPU, read "all done?" back only now and then

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
    cur = P
    while True:
        raw = logits.float()
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
                hit = hit | plan.criteria(seq[:, :cur], scores)
            newly = unfinished & hit
            done_at[rows] = torch.where(newly, cur, done_at[rows])
            unfinished = unfinished & ~hit
        if cur >= plan.max_length:
            break
        if stops and (cur - P) % check_every == 0 and cur >= cfg.min_length:
            n_left = int(unfinished.sum())
            if n_left == 0:
                break
            if can_drop and n_left < unfinished.numel():
                keep = unfinished.nonzero().squeeze(1)
                runner.keep_rows(keep)
                seq, rows, unfinished, positions = seq[keep], rows[keep], unfinished[keep], positions[keep]
                for p in plan.processors:
                    if hasattr(p, "select_rows"):
                        p.select_rows(keep)
        logits = runner.step(seq[:, cur - 1], positions)
        positions = positions + 1

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
