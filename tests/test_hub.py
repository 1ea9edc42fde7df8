"""Name resolution: local directories, and the clear offline error that names the local-directory way out."""
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
