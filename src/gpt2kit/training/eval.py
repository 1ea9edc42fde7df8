"""Perplexity and bits per byte of a model on a text, by the sliding-window method.

The method of the Hugging Face perplexity guide (huggingface.co/docs/transformers/perplexity): windows
of `max_length` tokens start every `stride` tokens; each window scores only the tokens that no earlier
window scored, with up to max_length - stride tokens of context before them. With stride < max_length
every token but the text's first is scored exactly once; with stride = max_length the first token of
each window has no context and is skipped, as in the guide. The guide's code approximates the number of
tokens a window scores; here it is counted exactly, and perplexity = exp(total NLL / tokens scored).
"""
from __future__ import annotations

import json
import math
import sys

import torch

from .loss import IGNORE_INDEX, linear_cross_entropy
from .progress import progress_bar
from ..errors import InvalidInputError


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: input ids[begin:end], targets at positions >= first_scored."""
    if stride > max_length:
        raise InvalidInputError(f"stride ({stride}) must not exceed the window length ({max_length}): tokens would go unscored.")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))  # position begin has no context inside its window
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def sliding_window_nll(model, ids: torch.Tensor, max_length: int | None = None, stride: int | None = None,
                       batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """(sum of next-token NLLs in nats, number of tokens scored) of 1-D `ids` under a GPT2LMHeadModel.
    `progress`: a bar over the batches of windows on stderr (on a terminal)."""
    max_length = max_length or model.config.n_positions
    if max_length > model.config.n_positions:
        raise InvalidInputError(f"The window ({max_length} tokens) exceeds the model's n_positions ({model.config.n_positions}).")
    stride = stride or max(1, max_length // 2)
    device = model.device
    ids = ids.to(torch.int64)
    total, count = 0.0, 0
    plan = windows(len(ids), max_length, stride)
    model.eval()
    starts = range(0, len(plan), batch_size)
    for i in progress_bar(len(starts), "scoring", "batch", progress, iterable=starts):
        group = plan[i: i + batch_size]
        T = max(end - begin for begin, end, _ in group)
        x = torch.zeros(len(group), T, dtype=torch.int64)  # (b, T); short rows padded at the end
        y = torch.full((len(group), T), IGNORE_INDEX, dtype=torch.int64)  # y[:, t] is the target predicted at t
        for row, (begin, end, first) in enumerate(group):
            x[row, : end - begin] = ids[begin:end]
            y[row, first - begin - 1: end - begin - 1] = ids[first:end]
        # right padding needs no mask: causal attention never lets a real token see a later pad
        hidden = model.transformer(input_ids=x.to(device), use_cache=False).last_hidden_state  # (b, T, C)
        n = int((y != IGNORE_INDEX).sum())
        if n == 0:
            continue
        weight = getattr(model.lm_head, "weight", None)
        if weight is None:  # a quantized head (TorchAoConfig(include_input_output_embeddings=True)): its own kernels
            logits = model.lm_head(hidden.flatten(0, 1)).float()  # (b*T, V)
            mean = torch.nn.functional.cross_entropy(logits, y.flatten().to(device), ignore_index=IGNORE_INDEX)
        else:
            mean = linear_cross_entropy(hidden.flatten(0, 1).float(), weight.float(), y.flatten().to(device),
                                        compute_dtype=torch.float32)
        total += float(mean) * n
        count += n
    return total, count


def report(model, ids: torch.Tensor, n_bytes: int, max_length=None, stride=None, batch_size=8, progress=False) -> dict:
    """Perplexity, bits per byte and counts of token ids `ids` (the encoding of `n_bytes` bytes of text)."""
    if len(ids) < 2:
        raise InvalidInputError(f"The text has {len(ids)} token(s); perplexity needs at least 2.")
    max_length = max_length or model.config.n_positions
    stride = stride or max(1, max_length // 2)
    nll, n = sliding_window_nll(model, ids, max_length, stride, batch_size, progress)
    return {"perplexity": math.exp(nll / n), "bits_per_byte": nll / math.log(2) / n_bytes, "nll_per_token": nll / n,
            "tokens_scored": n, "bytes": n_bytes, "max_length": max_length, "stride": stride}


def eval_command(args) -> int:
    """`gpt2kit eval`: see cli.py for the flags."""
    from ..loading import load_model_and_tokenizer
    from .data import open_tokens, read_text, split_point, tokenize_to_cache

    data = read_text(args.file)
    start = split_point(data, 1.0 - args.val_fraction) if args.val_fraction else 0
    model, tok, name = load_model_and_tokenizer(args.model, args.device, args.dtype, args.quantize,
                                                args.quantize_embeddings)
    ids = open_tokens(tokenize_to_cache(args.file, tok, start=start, end=len(data), progress=args.progress, data=data))
    result = report(model, ids, len(data) - start, args.max_length, args.stride, args.batch_size, args.progress)
    result.update(model=name, file=args.file, byte_range=[start, len(data)])
    if args.json:
        print(json.dumps(result))
    else:
        part = f" (bytes {start}-{len(data)}, the last {args.val_fraction:g})" if start else ""
        print(f"{args.file}{part}: perplexity {result['perplexity']:.4f}, {result['bits_per_byte']:.4f} bits/byte, "
              f"{result['tokens_scored']} tokens scored (window {result['max_length']}, stride {result['stride']})",
              file=sys.stdout)
    return 0
