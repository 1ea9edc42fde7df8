"""Progress of long work on the terminal: tqdm bars that end on a line of their own, messages that
never land on a bar's line, and plain lines (no bar) where stderr is not a terminal (logs, pipes)."""
from __future__ import annotations

import sys


def interactive(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0, **kw):
    """A tqdm bar on stderr, shown only when `enabled` and stderr is a terminal; it stays (at 100%) when closed."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True,
                disable=not (enabled and interactive(sys.stderr)), **kw)


class StepProgress:
    """The bar over a training run's optimizer steps, and the channel for every message printed meanwhile."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = progress_bar(total, "training", "step", enabled, initial=done)

    def say(self, message: str) -> None:
        """A line above the bar (or a plain line without one)."""
        if self.bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            self.bar.write(message, file=sys.stderr)

    def step(self, loss: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
