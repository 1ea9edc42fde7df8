"""`gpt2kit serve --model-impl transformers`: the model served is gpt2kit's, shown at load to compute what
transformers' own GPT2LMHeadModel computes on the same weights (the implementation the flag asks for in
`vllm serve ... --model-impl transformers`), or the server does not start."""
from __future__ import annotations

import torch

from ..errors import GPT2KitError

PROBE_TOKENS = 32  # positions of the probe input: every block, the attention over several keys, the head
# largest |logit difference| accepted, relative to the logits' scale (at least 1): float32 sums in another order
# (~1e-6), bfloat16 / float16 round every op
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = 5e-2


@torch.no_grad()
def check_against_transformers(model) -> float:
    """Run a fixed input through `model` and through transformers' GPT2LMHeadModel built on the very same tensors
    (no copy: its parameters are assigned ours); raise GPT2KitError where their logits differ beyond the dtype's
    tolerance. Returns the largest difference found."""
    try:
        import transformers
    except ImportError:
        raise GPT2KitError("--model-impl transformers checks the model against transformers' implementation, which "
                           "is not installed: pip install transformers, or use --model-impl auto.") from None
    cfg = model.config
    ref_cfg = transformers.GPT2Config(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    with torch.device("meta"):
        ref = transformers.GPT2LMHeadModel(ref_cfg)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise GPT2KitError(f"--model-impl transformers: transformers' GPT2LMHeadModel does not take this model's "
                           f"weights (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    ref.tie_weights()
    ref.eval()
    T = min(PROBE_TOKENS, cfg.n_positions)
    ids = (torch.arange(T, device=model.device) * 7919 % cfg.vocab_size)[None]  # (1, T) spread over the vocabulary
    ours = model(ids).logits.float()
    theirs = ref(input_ids=ids).logits.float()
    scale = max(1.0, float(theirs.abs().max()))
    diff = float((ours - theirs).abs().max())
    tol = TOLERANCE.get(model.dtype, LOW_PRECISION_TOLERANCE) * scale
    if not diff <= tol:  # also a NaN
        raise GPT2KitError(f"--model-impl transformers: gpt2kit's logits differ from transformers' GPT2LMHeadModel's by "
                           f"{diff:.3g} on these weights (tolerance {tol:.3g} in {str(model.dtype).split('.')[-1]}); not "
                           "serving. Report it, with the model, as a gpt2kit bug.")
    return diff
