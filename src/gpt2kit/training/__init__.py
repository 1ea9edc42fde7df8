"""Training and evaluation: data (token cache, window order), optim (AdamW groups), schedule (warmup +
cosine), loss (fused LM-head cross-entropy), loop (one process or torchrun), checkpointing, eval
(sliding-window perplexity)."""
