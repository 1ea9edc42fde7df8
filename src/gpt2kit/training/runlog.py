"""The run's record: one JSON object per line in OUT/log.jsonl, and a PNG loss curve drawn from it."""
from __future__ import annotations

import json
import os
import sys


class RunLog:
    def __init__(self, out_dir: str, enabled: bool = True, keep_until_step: int | None = None, say=None):
        """`keep_until_step`: on resume, drop records past the checkpoint (they are about to be redone).
        `say` prints a record's echo line (default: a line on stderr)."""
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled = enabled
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if keep_until_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= keep_until_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict, echo: str | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            self.say(echo)


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(log_path: str, png_path: str) -> bool:
    """Train and validation loss against step. Returns False (drawing nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from ..utils import atomic_path

    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True
