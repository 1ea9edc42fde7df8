"""GPT2Config: the page's defaults, config.json in and out (unknown keys kept), interchange with
transformers' config.json both ways, and validation errors that say what is wrong."""
import json

import pytest
import transformers

from gpt2kit import AutoConfig, GPT2Config

PAGE_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                     activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                     layer_norm_epsilon=1e-5, initializer_range=0.02, summary_type="cls_index", summary_use_proj=True,
                     summary_activation=None, summary_proj_to_labels=True, summary_first_dropout=0.1,
                     scale_attn_weights=True, use_cache=True, bos_token_id=50256, eos_token_id=50256,
                     scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                     add_cross_attention=False, tie_word_embeddings=True)


def test_defaults_match_the_page_and_transformers():
    ours, ref = GPT2Config(), transformers.GPT2Config()
    for key, value in PAGE_DEFAULTS.items():
        assert getattr(ours, key) == value == getattr(ref, key), key
    assert ours.pad_token_id is None and ours.num_labels == 2 and ours.problem_type is None
    assert ours.hidden_size == 768 and ours.num_hidden_layers == 12 and ours.max_position_embeddings == 1024
    assert GPT2Config(hidden_size=64, num_attention_heads=4).n_embd == 64


def test_json_roundtrip_keeps_unknown_keys(tmp_path):
    cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, summary_first_dropout=0.2, my_custom_field={"a": [1, 2]},
                     task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}},
                     id2label={0: "neg", 1: "neu", 2: "pos"})
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["my_custom_field"] == {"a": [1, 2]} and raw["model_type"] == "gpt2" and raw["id2label"]["2"] == "pos"
    back = GPT2Config.from_pretrained(tmp_path)
    assert back == cfg and back.my_custom_field == {"a": [1, 2]} and back.num_labels == 3
    assert back.label2id == {"neg": 0, "neu": 1, "pos": 2}
    again = tmp_path / "again"
    back.save_pretrained(again)
    assert json.loads((again / "config.json").read_text()) == raw


def test_interchange_with_transformers_config_json(tmp_path):
    ref = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=40, activation_function="relu",
                                  reorder_and_upcast_attn=True, num_labels=3, unusual_key=7)
    ref.save_pretrained(tmp_path / "hf")
    ours = AutoConfig.from_pretrained(tmp_path / "hf")
    for key in ("n_layer", "n_embd", "n_inner", "activation_function", "reorder_and_upcast_attn", "num_labels"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.unusual_key == 7
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    assert back.to_diff_dict().items() >= {"n_inner": 40, "activation_function": "relu", "unusual_key": 7}.items()
    assert back.num_labels == 3 and back.model_type == "gpt2"


def test_from_pretrained_overrides(tmp_path):
    GPT2Config(n_layer=2).save_pretrained(tmp_path)
    cfg = GPT2Config.from_pretrained(tmp_path, n_layer=4, num_labels=5, attn_implementation="eager")
    assert cfg.n_layer == 4 and cfg.num_labels == 5 and cfg._attn_implementation == "eager"
    labels = GPT2Config.from_pretrained(tmp_path, id2label={"0": "a", "1": "b", "2": "c"})
    assert labels.num_labels == 3 and labels.label2id == {"a": 0, "b": 1, "c": 2} and labels.id2label[2] == "c"
    with pytest.raises(TypeError, match="no_such_field"):
        GPT2Config.from_pretrained(tmp_path, no_such_field=1)
    cfg, unused = GPT2Config.from_pretrained(tmp_path, return_unused_kwargs=True, foo=1)
    assert unused == {"foo": 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=100, n_head=12), "divisible by n_head"),
    (dict(activation_function="gelu_newest"), "Unknown activation_function"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(n_layer=2.5), "n_layer must be a positive integer"),
    (dict(resid_pdrop=1.5), "resid_pdrop must be a probability"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon must be positive"),
    (dict(n_inner=-4), "n_inner must be None or a positive integer"),
    (dict(summary_type="max"), "Unknown summary_type"),
    (dict(problem_type="ranking"), "Unknown problem_type"),
    (dict(attn_implementation="flash_attention_2"), "implementations here are .sdpa."),
    (dict(num_labels=3, id2label={0: "a"}), "disagrees with id2label"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(**kwargs)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        GPT2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPT2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        GPT2Config.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2Config.from_pretrained(tmp_path / "..")
    with pytest.raises(ValueError, match="gpt2"):
        AutoConfig.for_model("bert")
