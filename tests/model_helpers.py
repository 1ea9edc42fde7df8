"""Builders shared by the model tests: tiny configs and a transformers twin with the same weights."""
import torch

TINY = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)


def perturb_(model, scale=0.1, seed=0):
    """Add noise to every parameter so that biases and layer norms are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def twin(ours_cls, hf_cls, attn="eager", seed=0, **cfg):
    """(transformers model, gpt2kit model) with identical random weights, both in eval mode."""
    import transformers

    from gpt2kit import GPT2Config

    kw = {**TINY, **cfg}
    torch.manual_seed(seed)
    hf = hf_cls(transformers.GPT2Config(**kw, attn_implementation=attn)).eval()
    perturb_(hf, seed=seed)
    ours = ours_cls(GPT2Config(**kw, attn_implementation=attn)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours
