"""A real `gpt2kit serve` process on 127.0.0.1 for the server tests, and the reference they compare to."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "src" / "gpt2kit" / "assets" / "default-model"
READY = re.compile(r"ready on http://([\d.]+):(\d+)")


class ServerProcess:
    """`python -m gpt2kit serve ARGS --port 0`; the port is read from the ready line."""

    def __init__(self, *args: str, env: dict | None = None, wait: bool = True):
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
        # one compute thread: on this shared 2-core machine, OpenMP threads that spin against other
        # processes make each step ~30x slower (measured); the server's behaviour does not depend on it
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.url = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False), daemon=True).start()
        if wait:
            self.wait_ready()

    def _read(self, stream, sink, watch):
        for line in stream:
            sink.append(line)
            m = READY.search(line) if watch else None
            if m:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
                self._ready.set()

    def wait_ready(self, timeout: float = 120.0) -> str:
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"gpt2kit serve did not get ready: {''.join(self.stderr)[-2000:]}")
        return self.url

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


_REF = {}


def reference():
    """transformers' GPT2LMHeadModel on the embedded checkpoint, in float32, and our tokenizer."""
    if not _REF:
        import torch
        import transformers

        from gpt2kit import GPT2Tokenizer

        model = transformers.GPT2LMHeadModel.from_pretrained(str(DEFAULT_MODEL), dtype=torch.float32).eval()
        _REF["model"], _REF["tok"] = model, GPT2Tokenizer.from_pretrained(str(DEFAULT_MODEL))
    return _REF["model"], _REF["tok"]


def reference_greedy(ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate, greedy, for this prompt alone; the new ids (it stops at eos, as the server does)."""
    import torch

    model, _ = reference()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=50256, eos_token_id=50256)
    new = out[0, len(ids):].tolist()
    return new[: new.index(50256)] if 50256 in new else new


def reference_logprobs(ids: list[int]):
    """log-softmax of transformers' logits for every position: (L, V) float32."""
    import torch

    model, _ = reference()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
