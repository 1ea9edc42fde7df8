"""Acceptance point 3: every checkpoint format and layout, each built by transformers itself (the Hub's
original GPT-2 layout by rewriting transformers' state dict as those files are laid out), loads with
identical logits; our save_pretrained output loads in transformers with identical logits; each kind of
bad checkpoint gets its clear error."""
import json
import os
import shutil

import pytest
import torch
import transformers
from model_helpers import TINY, perturb_
from safetensors.torch import save_file

from gpt2kit import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model
from gpt2kit.weights.formats import CheckpointFileError
from gpt2kit.weights.hub import ModelNotFoundError
from gpt2kit.weights.keymap import WeightsMismatchError

IDS = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


def hf_model(cls=transformers.GPT2LMHeadModel, seed=0, **cfg):
    torch.manual_seed(seed)
    return perturb_(cls(transformers.GPT2Config(**TINY, **cfg)), seed=seed).eval()


def logits(m):
    with torch.no_grad():
        out = m(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A transformers LM head model and its save_pretrained directory (model.safetensors)."""
    hf = hf_model()
    d = tmp_path_factory.mktemp("hf-lm")
    hf.save_pretrained(d)
    return hf, d


def write_dir(d, config: transformers.GPT2Config, state: dict, fmt="safetensors"):
    os.makedirs(d, exist_ok=True)
    config.save_pretrained(d)
    state = {k: v.clone().contiguous() for k, v in state.items()}  # tied tensors become separate copies
    if fmt == "safetensors":
        save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(d, "pytorch_model.bin"))
    return d


def hub_layout(hf) -> dict:
    """transformers' state dict as the Hub's original GPT-2 files hold it: no `transformer.` prefix, causal-mask
    buffers per layer, no lm_head (tied)."""
    n = hf.config.n_positions
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


# -- formats and layouts ------------------------------------------------------------------------------

def test_safetensors_from_transformers_is_memory_mapped(lm):
    hf, d = lm
    m = GPT2LMHeadModel.from_pretrained(d)
    assert torch.equal(logits(m), logits(hf))
    assert not m.training and m.lm_head.weight is m.transformer.wte.weight and m.dtype == torch.float32
    assert torch.nn.init.normal_.__module__ == "torch.nn.init"  # init switched off for the meta build only
    # the parameters view the file's pages (a private mapping), so loading made no copy of them
    assert os.path.realpath(os.path.join(d, "model.safetensors")) in open("/proc/self/maps").read()


def test_sharded_safetensors(lm, tmp_path):
    hf, _ = lm
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path)), logits(hf))


@pytest.mark.parametrize("layout", ["prefixed", "hub"])
def test_pytorch_model_bin(lm, tmp_path, layout):
    hf, _ = lm
    state = hf.state_dict() if layout == "prefixed" else hub_layout(hf)
    write_dir(tmp_path, hf.config, state, fmt="bin")
    m = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(logits(m), logits(hf))


def test_hub_layout_safetensors_into_lm_and_body(lm, tmp_path):
    hf, _ = lm
    write_dir(tmp_path, hf.config, hub_layout(hf))
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path)), logits(hf))
    body = GPT2Model.from_pretrained(tmp_path)
    assert torch.equal(logits(body), logits(hf.transformer))


def test_bare_gpt2model_checkpoint_loads_both_ways(tmp_path, caplog):
    body = hf_model(transformers.GPT2Model, seed=1)
    body.save_pretrained(tmp_path / "body")
    ours = GPT2Model.from_pretrained(tmp_path / "body")
    assert torch.equal(logits(ours), logits(body))
    lm = GPT2LMHeadModel.from_pretrained(tmp_path / "body")  # tied head: comes from wte
    with torch.no_grad():
        want = body(IDS).last_hidden_state @ body.wte.weight.T
    assert torch.allclose(logits(lm), want, atol=1e-5)
    # an LM checkpoint into a bare body: the head's weight is dropped with a notice
    hf = hf_model(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "lm")
    with caplog.at_level("WARNING", logger="gpt2kit.weights"):
        b = GPT2Model.from_pretrained(tmp_path / "lm")
    assert "lm_head.weight" in caplog.text
    assert torch.equal(logits(b), logits(hf.transformer))


def test_untied_head(tmp_path):
    hf = hf_model(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    m = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert torch.equal(logits(m), logits(hf))
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_dir(tmp_path / "nohead", hf.config, state)
    with pytest.raises(WeightsMismatchError, match="lm_head.weight.*tie_word_embeddings is False"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "nohead")


def test_classifier_from_lm_checkpoint_initialises_its_head(lm, caplog):
    _, d = lm
    with caplog.at_level("WARNING", logger="gpt2kit.weights"):
        m, info = transformers_free_classifier(d)
    assert "score.weight" in caplog.text and info["missing_keys"] == ["score.weight"]
    assert info["unexpected_keys"] == []  # the tied lm_head is simply absent from transformers' file
    assert m.config.num_labels == 3 and m.score.weight.shape == (3, TINY["n_embd"])
    assert 0.005 < m.score.weight.std().item() < 0.05  # GPT-2's init, std initializer_range
    with torch.no_grad():
        assert m(IDS[:1]).logits.shape == (1, 3)


def transformers_free_classifier(d):
    from gpt2kit import GPT2ForSequenceClassification

    return GPT2ForSequenceClassification.from_pretrained(d, num_labels=3, output_loading_info=True)


# -- saving -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_loads_in_transformers(tmp_path, tie):
    hf_model(tie_word_embeddings=tie).save_pretrained(tmp_path / "src")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["dtype"] == "float32"
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == 50256
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and ("lm_head.weight" in f.keys()) == (not tie)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(ref), logits(ours))


def test_save_sharded_and_bin_then_stale_files_are_removed(lm, tmp_path):
    hf, d = lm
    ours = GPT2LMHeadModel.from_pretrained(d)
    ours.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path)), logits(hf))
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "pytorch_model.bin"]
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path)), logits(hf))
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(TypeError, match="bogus"):
        ours.save_pretrained(tmp_path, bogus=1)
    with pytest.raises(ValueError, match="max_shard_size"):
        ours.save_pretrained(tmp_path / "x", max_shard_size="lots")


# -- options ------------------------------------------------------------------------------------------

def test_dtype_device_map_attn_and_overrides(lm, tmp_path):
    hf, d = lm
    m = GPT2LMHeadModel.from_pretrained(d, dtype=torch.bfloat16, device_map="cpu", attn_implementation="eager")
    assert m.dtype == torch.bfloat16 and m.config._attn_implementation == "eager" and m.config.dtype == torch.bfloat16
    assert torch.allclose(logits(m).float(), logits(hf), atol=0.1)
    m.save_pretrained(tmp_path)  # a bf16 checkpoint: "auto" keeps bf16, with or without config's dtype
    assert GPT2LMHeadModel.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert GPT2LMHeadModel.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert GPT2LMHeadModel.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(d, device_map="auto", resid_pdrop=0.0).config.resid_pdrop == 0.0
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(transformer.wpe.weight: checkpoint \[64, 32\] vs model \[32, 32\]\)"):
        GPT2LMHeadModel.from_pretrained(d, n_positions=32)
    with pytest.raises(ValueError, match="dtype must be"):
        GPT2LMHeadModel.from_pretrained(d, dtype="int8")
    with pytest.raises(TypeError, match="no_such_option"):
        GPT2LMHeadModel.from_pretrained(d, no_such_option=True)
    with pytest.raises(TypeError, match="quantization_config must be"):
        GPT2LMHeadModel.from_pretrained(d, quantization_config="int8")
    assert GPT2LMHeadModel.from_pretrained(d, quantization_config={"load_in_8bit": True}).is_loaded_in_8bit
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA.*Use 'cpu'"):
            GPT2LMHeadModel.from_pretrained(d, device_map="cuda")
    cfg_obj = GPT2Config.from_pretrained(d)
    m = GPT2LMHeadModel.from_pretrained(d, config=cfg_obj, output_attentions=True)
    assert m.config.output_attentions and not cfg_obj.output_attentions


def test_hub_name_resolves_from_cache_and_fails_clearly_offline(lm, tmp_path):
    _, d = lm
    snapshot = tmp_path / "models--someone--tiny-gpt2" / "snapshots" / ("a" * 40)
    shutil.copytree(d, snapshot)
    (tmp_path / "models--someone--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-gpt2" / "refs" / "main").write_text("a" * 40)
    m = GPT2LMHeadModel.from_pretrained("someone/tiny-gpt2", cache_dir=tmp_path, local_files_only=True)
    assert torch.equal(logits(m), logits(lm[0]))
    with pytest.raises(ModelNotFoundError, match="local directory"):
        GPT2LMHeadModel.from_pretrained("someone/not-cached", cache_dir=tmp_path)


# -- bad checkpoints ----------------------------------------------------------------------------------

def test_missing_unexpected_and_mis_shaped_keys_are_named(lm, tmp_path):
    hf, _ = lm
    state = hf.state_dict()
    write_dir(tmp_path / "missing", hf.config, {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"})
    with pytest.raises(WeightsMismatchError, match=r"missing keys \['transformer.h.1.mlp.c_fc.weight'\]"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "missing")
    write_dir(tmp_path / "extra", hf.config, {**state, "transformer.h.0.attn.rotary.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \['transformer.h.0.attn.rotary.weight'\]"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "extra")
    bad = dict(state)
    bad["transformer.wpe.weight"] = torch.zeros(TINY["n_positions"] + 1, TINY["n_embd"])
    write_dir(tmp_path / "shape", hf.config, bad)
    with pytest.raises(WeightsMismatchError, match=r"transformer.wpe.weight: checkpoint \[65, 32\] vs model \[64, 32\]"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "shape")


def test_truncated_and_corrupt_files_name_the_file(lm, tmp_path):
    hf, d = lm
    shutil.copytree(d, tmp_path / "cut")
    path = tmp_path / "cut" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFileError, match="model.safetensors.*truncated or corrupt"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "cut")
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointFileError, match="model.safetensors"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "cut")
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointFileError, match="pytorch_model.bin.*truncated or corrupt"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "bin")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointFileError, match="state dict"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "bin")


def test_bad_config_and_missing_weights(lm, tmp_path):
    _, d = lm
    shutil.copytree(d, tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text('{"n_layer": 2,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"n_embd": 30, "n_head": 4}))
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "cfg")
    (tmp_path / "noweights").mkdir()
    GPT2Config(**TINY).save_pretrained(tmp_path / "noweights")
    with pytest.raises(ModelNotFoundError, match="No weights found.*model.safetensors"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "noweights")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "nowhere")
    sharded = tmp_path / "sharded"
    lm[0].save_pretrained(sharded, max_shard_size="20KB")
    first = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))[0]
    os.remove(sharded / first)
    with pytest.raises(FileNotFoundError, match=first):
        GPT2LMHeadModel.from_pretrained(sharded)


def test_use_safetensors_chooses_the_format(lm, tmp_path):
    hf, d = lm
    other = hf_model(seed=5)
    shutil.copytree(d, tmp_path / "both")
    torch.save(other.state_dict(), tmp_path / "both" / "pytorch_model.bin")  # a different model, as .bin
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "both")), logits(hf))  # safetensors first
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "both", use_safetensors=False)), logits(other))
    os.remove(tmp_path / "both" / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="use_safetensors=True excludes pytorch_model.bin"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "both", use_safetensors=True)


def test_skipped_init_while_loading_is_confined_to_the_loading_thread():
    """from_pretrained turns torch.nn.init's fills into no-ops while it builds the model on meta; another thread
    initialising its own tensors meanwhile still gets real fills, and the originals come back afterwards."""
    import threading

    from gpt2kit.weights.checkpoint import _skip_init

    before = torch.nn.init.normal_
    seen = {}

    def other_thread():
        seen["filled"] = torch.nn.init.normal_(torch.zeros(64)).abs().sum().item()
        seen["ones"] = torch.nn.init.ones_(torch.zeros(4)).tolist()

    with _skip_init():
        mine = torch.nn.init.normal_(torch.zeros(64))
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert mine.abs().sum().item() == 0.0  # skipped here
    assert seen["filled"] > 0 and seen["ones"] == [1.0] * 4  # filled there
    assert torch.nn.init.normal_ is before
