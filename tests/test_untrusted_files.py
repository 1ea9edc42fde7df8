"""Hostile files: a pickle planted in any file gpt2kit reads never runs, and the error says what the file is.

The payload is a pickle whose unpickling creates a marker file (checked live below with pickle.loads). It is
planted, in each of the three pickle layouts (torch.save's zip, torch.save's legacy format, a bare pickle),
in every file of a model directory and of a training checkpoint: the weights (pytorch_model.bin, a shard of
a sharded one), the training state (training_state.pt, which also holds the optimizer state) and the JSON
and text files beside them.
"""
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from gpt2kit import GPT2LMHeadModel
from gpt2kit.cli import main
from gpt2kit.errors import CheckpointFileError, GPT2KitError, UnsafeCheckpointError
from gpt2kit.training.checkpointing import STATE_NAME, latest_checkpoint
from gpt2kit.training.loop import train
from gpt2kit.training.settings import TrainConfig

from test_eval import make_checkpoint
from test_train import TEXT, TINY_RUN

LAYOUTS = ("zip", "legacy", "bare")


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the unpickler ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker, layout):
    obj = {"transformer.wte.weight": Payload(marker)}
    if layout == "zip":
        torch.save(obj, path)
    elif layout == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: without the protection the planted file does create the marker."""
    marker = tmp_path / "marker"
    for layout in LAYOUTS:
        plant(tmp_path / "f", marker, layout)
        if layout == "bare":
            with open(tmp_path / "f", "rb") as f:
                pickle.load(f)
        else:
            torch.load(tmp_path / "f", weights_only=False)
        assert marker.exists(), layout
        marker.unlink()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run with two kept checkpoints (steps 1 and 2) and its final model."""
    root = tmp_path_factory.mktemp("run")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    cfg = dict(files=[str(root / "corpus.txt")], max_steps=3, save_every=1, cache_dir=str(root / "cache"), **TINY_RUN)
    train(TrainConfig(out_dir=str(root / "out"), **cfg))
    return root, cfg


def fresh_copy(run_dir, tmp_path):
    root, cfg = run_dir
    shutil.copytree(root / "out", tmp_path / "out")
    return str(tmp_path / "out"), cfg


def assert_unsafe_refusal(err, path):
    text = str(err)
    assert isinstance(err, UnsafeCheckpointError), repr(err)
    assert repr(str(path)) in text and "run code" in text
    assert "weights_only" not in text and "truncated" not in text


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("changed", [False, True], ids=["same-settings", "changed-settings"])
def test_resume_never_runs_a_planted_training_state(run_dir, tmp_path, layout, changed):
    """Also when the resume would be refused for other settings anyway: the state is read safely first."""
    out, cfg = fresh_copy(run_dir, tmp_path)
    marker = tmp_path / "marker"
    state = os.path.join(latest_checkpoint(out), STATE_NAME)
    plant(state, marker, layout)
    cfg = {**cfg, "max_steps": 7} if changed else cfg
    with pytest.raises(UnsafeCheckpointError) as info:
        train(TrainConfig(out_dir=out, resume=True, **cfg))
    assert not marker.exists()
    assert_unsafe_refusal(info.value, state)
    assert "delete this checkpoint directory" in str(info.value) and "--overwrite" in str(info.value)


def test_every_file_of_a_checkpoint_and_a_model_is_read_without_running_code(run_dir, tmp_path):
    """Each file of the latest checkpoint (resume) and of the final model (from_pretrained, the CLI's eval and
    generate command) replaced by the payload: no marker, and either a gpt2kit error naming the file or a normal run
    (a file that path does not read)."""
    root, _ = run_dir
    marker = tmp_path / "marker"
    checkpoint_files = sorted(os.listdir(latest_checkpoint(str(root / "out"))))
    assert {"model.safetensors", STATE_NAME, "config.json", "vocab.json", "merges.txt"} <= set(checkpoint_files)
    for name in checkpoint_files:
        case = tmp_path / f"ckpt-{name}"
        case.mkdir()
        out, cfg = fresh_copy(run_dir, case)
        plant(os.path.join(latest_checkpoint(out), name), marker, "zip")
        try:
            train(TrainConfig(out_dir=out, resume=True, **cfg))
        except GPT2KitError as e:
            assert name in str(e), (name, e)
        assert not marker.exists(), name
    model_files = sorted(f for f in os.listdir(root / "out") if f.endswith((".json", ".txt", ".safetensors")))
    for name in model_files:
        model = tmp_path / f"model-{name}"
        shutil.copytree(root / "out", model, ignore=shutil.ignore_patterns("checkpoints", "log.jsonl", "loss.png"))
        plant(model / name, marker, "zip")
        # generate and eval load a model the same way (cli.load_model_and_tokenizer)
        code = main(["generate", "hi", "--model", str(model), "--max-new-tokens", "1"])
        assert code in (0, 1), name  # 1: a one-line gpt2kit error, never a traceback
        assert not marker.exists(), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pickle_only_pytorch_model_bin_is_refused_for_what_it_is(tmp_path, layout, capsys):
    """Point 7: not 'truncated or corrupt', no advice to turn off weights_only, no torch warning, one line."""
    model = make_checkpoint(tmp_path / "m", n_layer=1, n_embd=16, n_head=2, n_positions=16)
    os.remove(os.path.join(model, "model.safetensors"))
    marker = tmp_path / "marker"
    plant(os.path.join(model, "pytorch_model.bin"), marker, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked UserWarning fails the test
        with pytest.raises(UnsafeCheckpointError) as info:
            GPT2LMHeadModel.from_pretrained(model)
    assert_unsafe_refusal(info.value, os.path.join(model, "pytorch_model.bin"))
    assert "model.safetensors" in str(info.value) and "tool you trust" in str(info.value)
    assert main(["generate", "hi", "--model", model]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pytorch_model.bin" in err and "weights_only" not in err
    assert not marker.exists()


def test_a_planted_shard_of_a_sharded_bin_is_refused(tmp_path):
    model = make_checkpoint(tmp_path / "m", n_layer=1, n_embd=16, n_head=2, n_positions=16)
    GPT2LMHeadModel.from_pretrained(model).save_pretrained(tmp_path / "sharded", safe_serialization=False,
                                                          max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "pytorch_model.bin.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    marker = tmp_path / "marker"
    plant(tmp_path / "sharded" / shard, marker, "legacy")
    with pytest.raises(UnsafeCheckpointError) as info:
        GPT2LMHeadModel.from_pretrained(tmp_path / "sharded")
    assert_unsafe_refusal(info.value, tmp_path / "sharded" / shard)
    assert not marker.exists()


def test_damaged_files_stay_corrupt_not_unsafe(tmp_path):
    """A file that is not a pickle at all is reported as damaged, not as hostile."""
    model = make_checkpoint(tmp_path / "m", n_layer=1, n_embd=16, n_head=2, n_positions=16)
    os.remove(os.path.join(model, "model.safetensors"))
    good = GPT2LMHeadModel.from_pretrained(make_checkpoint(tmp_path / "g", n_layer=1, n_embd=16, n_head=2,
                                                           n_positions=16)).state_dict()
    torch.save(good, os.path.join(model, "pytorch_model.bin"))
    data = open(os.path.join(model, "pytorch_model.bin"), "rb").read()
    open(os.path.join(model, "pytorch_model.bin"), "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match="pytorch_model.bin.*truncated or corrupt") as info:
        GPT2LMHeadModel.from_pretrained(model)
    assert "PytorchStreamReader" not in str(info.value)


def test_nothing_in_the_package_unpickles_except_through_torchfile():
    """torchfile.load_torch_file holds the one torch.load of the package, with weights_only=True; no module
    calls pickle/marshal/numpy loaders or imports dill or joblib."""
    import ast
    import pathlib

    import gpt2kit

    root = pathlib.Path(gpt2kit.__file__).parent
    loads, imports = [], []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads"):
                owner = ast.unparse(node.func.value)
                if owner in ("torch", "pickle", "np", "numpy", "marshal", "dill", "joblib"):
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    loads.append((str(path.relative_to(root)), f"{owner}.{node.func.attr}", keywords.get("weights_only")))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                imports += [(str(path.relative_to(root)), n) for n in names if n in ("pickle", "dill", "joblib", "marshal")]
    assert loads == [("torchfile.py", "torch.load", "True")]
    assert imports == [("torchfile.py", "pickle")]  # for pickle.UnpicklingError only
