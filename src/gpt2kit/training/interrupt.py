"""Ctrl-C during training: the run stops at the next step boundary with a checkpoint, never mid-step."""
from __future__ import annotations

import signal
import threading


class StopRequest:
    """Ctrl-C during the step loop of a one-process run: finish the step under way, write a checkpoint and
    stop (a state saved mid-step would not resume exactly). A second Ctrl-C stops at once, without one."""

    def __init__(self, say, enabled: bool):
        self.requested, self.say, self.previous = False, say, None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        # a process started with SIGINT ignored (nohup, `cmd &` in a script) keeps ignoring it
        self.enabled = self.enabled and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN

    def __enter__(self):
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:
            self.say("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to stop without one)")
        except RuntimeError:  # the signal arrived inside a write to stderr: the message after the step says it all
            pass

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)
        return False
