"""Two-process data-parallel training on the CPU (torchrun, gloo) against one process with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from test_train import TEXT

ARGS = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--n-positions", "32", "--max-steps", "4",
        "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1",
        "--save-every", "0", "--no-progress", "--dtype", "float32"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None and shutil.which("torchrun") is None,
                    reason="torchrun is not installed")
def test_torchrun_two_processes_match_one_process(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    cache = str(tmp_path / "cache")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = str(tmp_path / "two")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gpt2kit", "train", str(text),
                           "--out", two, "--batch-size", "2", "--cache-dir", cache, *ARGS],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = str(tmp_path / "one")
    from gpt2kit.cli import main

    assert main(["train", str(text), "--out", one, "--batch-size", "4", "--cache-dir", cache, *ARGS]) == 0

    log2, log1 = read_log(two), read_log(one)
    assert log2[0]["world_size"] == 2 and log1[0]["world_size"] == 1
    assert log2[-1]["replicas_identical"] is True  # both processes hold the same weights, compared exactly
    losses2 = [r["loss"] for r in log2 if "loss" in r]
    losses1 = [r["loss"] for r in log1 if "loss" in r]
    assert len(losses1) == len(losses2) == 4
    # same samples per step; only the order of float additions differs (two half-batch means, averaged)
    torch.testing.assert_close(losses2, losses1, rtol=1e-5, atol=0)
    val2 = [r["val_loss"] for r in log2 if "val_loss" in r]
    val1 = [r["val_loss"] for r in log1 if "val_loss" in r]
    torch.testing.assert_close(val2, val1, rtol=1e-5, atol=0)

    from safetensors.torch import load_file

    w2, w1 = load_file(os.path.join(two, "model.safetensors")), load_file(os.path.join(one, "model.safetensors"))
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
