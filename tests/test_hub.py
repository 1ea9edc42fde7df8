"""Name resolution: local directories, and the clear offline error that names the local-directory way out."""
import os
import subprocess
import sys

import pytest

from gpt2kit.weights.hub import ModelNotFoundError, resolve_file


def test_local_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_file(tmp_path, "config.json") == str(tmp_path / "config.json")
    assert resolve_file(tmp_path, "model.safetensors", required=False) is None
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        resolve_file(tmp_path, "model.safetensors")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_file(str(tmp_path / "nope" / "model"), "config.json")


def test_offline_cache_miss_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline mode.*local directory"):
        resolve_file("someone/some-model", "config.json", cache_dir=str(tmp_path))
    assert resolve_file("someone/some-model", "config.json", cache_dir=str(tmp_path), required=False) is None


_DRIVER = """
import sys, time
import torch, huggingface_hub  # imported before the clock starts: the test times the Hub lookup, not imports
from gpt2kit.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(code, round(time.perf_counter() - start, 3))
"""


def _offline_env(tmp_path):
    """No network here: the Hub endpoint is a closed port on 127.0.0.1; the offline switches are off."""
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}


def test_an_unreachable_hub_fails_fast_with_one_line(tmp_path):
    """huggingface_hub alone retries with backoff for ~30 s, logging each retry; one probe of the
    endpoint makes it one line in well under 5 s."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER, "generate", "hi", "--model", "someone/some-model"],
                          capture_output=True, text=True, timeout=120, env=_offline_env(tmp_path))
    code, seconds = proc.stdout.split()
    assert code == "1" and float(seconds) < 5, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot be reached" in proc.stderr and "not in the local cache" in proc.stderr
    assert "local directory" in proc.stderr


def test_an_unreachable_hub_still_serves_the_local_cache(tmp_path):
    """A file already in huggingface_hub's cache loads while the Hub cannot be reached."""
    env = _offline_env(tmp_path)
    snapshot = tmp_path / "hf" / "hub" / "models--someone--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"n_positions": 7}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = ("import time; from gpt2kit.weights.hub import resolve_file; t = time.perf_counter(); "
            "print(open(resolve_file('someone/cached', 'config.json')).read(), time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    text, seconds = proc.stdout.rsplit(" ", 1)
    assert text == '{"n_positions": 7}' and float(seconds) < 5 and proc.stderr == ""
