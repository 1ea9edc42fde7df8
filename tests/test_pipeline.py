"""The reference page's generation examples, run unchanged but for the import line and a local checkpoint
directory; pipeline("text-generation") against transformers' pipeline; stop strings and the checkpoint's
generation_config.json."""
import shutil

import pytest
import torch
import transformers

import gpt2kit
from gpt2kit import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[1] / "src" / "gpt2kit" / "tokenizer" / "assets"
PROMPT = "Hello, I'm a language model"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers, with the GPT-2 vocabulary files beside it."""
    d = tmp_path_factory.mktemp("gpt2-tiny")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4))
    with torch.no_grad():  # larger weights than the init, so the text is not one token repeated
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(d)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / f, d / f)
    return str(d)


@pytest.fixture(scope="module")
def hf_pair(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval(), transformers.AutoTokenizer.from_pretrained(ckpt)


# -- the page's examples ---------------------------------------------------------------------------

def test_page_example_pipeline(ckpt):
    if not torch.cuda.is_available():  # the page asks for GPU 0: here that must fail clearly, then run on the CPU
        with pytest.raises(RuntimeError, match="sees none"):
            pipeline(task="text-generation", model=ckpt, device=0)
        device = "cpu"
    else:
        device = 0
    pipe = pipeline(task="text-generation", model=ckpt, device=device)
    out = pipe("Hello, I'm a language model")
    assert isinstance(out, list) and len(out) == 1 and out[0]["generated_text"].startswith(PROMPT)
    assert len(out[0]["generated_text"]) > len(PROMPT)


def test_page_example_automodel_static_cache(ckpt, hf_pair):
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)

    input_ids = tokenizer("Hello, I'm a language model", return_tensors="pt").to(model.device)

    output = model.generate(**input_ids, cache_implementation="static")
    text = tokenizer.decode(output[0], skip_special_tokens=True)

    hf, hf_tok = hf_pair
    ref = hf.generate(**hf_tok(PROMPT, return_tensors="pt"), cache_implementation="static")
    assert torch.equal(output.cpu(), ref) and output.shape[1] == ref.shape[1]
    assert text == hf_tok.decode(ref[0], skip_special_tokens=True)


def test_page_example_quantized_generate(ckpt, hf_pair):
    """The 4-bit example's generate call (max_new_tokens=100). The quantization part needs bitsandbytes and a
    GPU; it runs here only where gpt2kit offers BitsAndBytesConfig and CUDA is present."""
    if hasattr(gpt2kit, "BitsAndBytesConfig") and torch.cuda.is_available():
        quantization_config = gpt2kit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype="float16",
                                                         bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quantization_config, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    inputs = tokenizer("Once upon a time, there was a magical forest", return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=100)
    text = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert outputs.shape[1] == inputs["input_ids"].shape[1] + 100
    hf, hf_tok = hf_pair
    ref = hf.generate(**hf_tok("Once upon a time, there was a magical forest", return_tensors="pt"), max_new_tokens=100)
    assert torch.equal(outputs.cpu(), ref) and text == hf_tok.decode(ref[0], skip_special_tokens=True)


# -- the pipeline against transformers' ------------------------------------------------------------

def test_pipeline_matches_transformers_greedy(ckpt):
    ours = pipeline("text-generation", model=ckpt, device="cpu")
    theirs = transformers.pipeline("text-generation", model=ckpt, device="cpu")
    theirs.tokenizer.pad_token_id = theirs.model.config.eos_token_id  # transformers needs this to batch
    prompts = ["Hello, I'm a language model", "Hi", "The quick brown fox jumps"]
    for kw in (dict(max_new_tokens=8, do_sample=False), dict(max_new_tokens=6, do_sample=False, return_full_text=False),
               dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)):
        assert ours(prompts[0], **kw) == theirs(prompts[0], **kw), kw
        assert ours(prompts, batch_size=2, **kw) == theirs(prompts, batch_size=2, **kw), kw


def test_pipeline_shapes_sampling_and_tensors(ckpt):
    pipe = pipeline("text-generation", model=ckpt, max_new_tokens=4)  # call defaults at construction
    out = pipe(["a", "b c"], num_return_sequences=3, do_sample=True, seed=0)
    assert len(out) == 2 and all(len(o) == 3 for o in out)
    assert all(r["generated_text"].startswith(p) for o, p in zip(out, ["a", "b c"]) for r in o)
    ids = pipe("a", return_tensors=True, do_sample=False)[0]["generated_token_ids"]
    assert isinstance(ids, list) and len(ids) == 1 + 4
    with pytest.raises(TypeError, match="unknown argument"):
        pipe("a", max_new_tokenz=3)


def test_pipeline_model_objects_dtype_and_errors(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, dtype="bfloat16")
    assert pipe.model.dtype == torch.bfloat16
    assert pipe("Hi", max_new_tokens=3)[0]["generated_text"].startswith("Hi")
    assert pipeline("text-generation", model=model, tokenizer=tok, device_map="auto").device.type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="Unsupported task"):
        pipeline("summarization", model=ckpt)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA|GPU"):
            pipeline("text-generation", model=ckpt, device="cuda")
    try:
        from gpt2kit.default_model import default_model_dir
    except ImportError:
        with pytest.raises(ValueError, match="model="):
            pipeline("text-generation")
        return
    try:
        default_model_dir()
    except FileNotFoundError:
        pytest.skip("the embedded default model is not in this checkout yet")
    out = pipeline("text-generation")("To be", max_new_tokens=3, do_sample=False)  # the embedded default model
    assert out[0]["generated_text"].startswith("To be")


# -- stop strings and generation_config.json ---------------------------------------------------------

def test_stop_strings_match_transformers(ckpt, hf_pair):
    hf, hf_tok = hf_pair
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    enc = tok(PROMPT, return_tensors="pt")
    full = model.generate(**enc, max_new_tokens=12)
    new = full[0, enc["input_ids"].shape[1]:].tolist()
    # a stop string that starts inside the 4th new token and ends inside the 5th
    before, t4, t5 = tok.decode(new[:3]), tok.decode(new[3:4]), tok.decode(new[4:5])
    stop = (t4[len(t4) // 2:] + t5[: max(1, len(t5) // 2)]) if len(t4) > 1 else t4 + t5[:1]
    assert stop and stop not in before
    ours = model.generate(**enc, max_new_tokens=12, stop_strings=stop, tokenizer=tok)
    ref = hf.generate(**hf_tok(PROMPT, return_tensors="pt"), max_new_tokens=12, stop_strings=stop, tokenizer=hf_tok)
    assert torch.equal(ours, ref) and ours.shape[1] <= enc["input_ids"].shape[1] + 5


def test_generation_config_json_round_trip(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.generation_config.eos_token_id == 50256  # read from transformers' generation_config.json
    model.generation_config = GenerationConfig(max_new_tokens=3, eos_token_id=50256, pad_token_id=50256)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.generation_config.max_new_tokens == 3
    enc = torch.tensor([[1, 2, 3]])
    assert again.generate(enc).shape == (1, 6)  # the saved default applies
    assert again.generate(enc, max_new_tokens=5).shape == (1, 8)  # kwargs override it
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).generation_config.max_new_tokens == 3


# -- defaults that must fit the model's context -----------------------------------------------------

@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """A tiny model whose context (n_positions 32) is shorter than the pipeline's default of 256 new tokens,
    as `gpt2kit train --n-positions 128` makes; GPT-2's vocabulary."""
    d = tmp_path_factory.mktemp("gpt2-32")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)) \
        .save_pretrained(d)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / f, d / f)
    return str(d)


@pytest.fixture
def fresh_notices(monkeypatch):
    from gpt2kit import utils

    monkeypatch.setattr(utils, "_SAID", set())


def test_pipeline_default_length_is_capped_to_the_context_once(short_ckpt, fresh_notices):
    pipe = pipeline("text-generation", model=short_ckpt)
    with pytest.warns(UserWarning, match=r"default max_new_tokens=256 does not fit .* n_positions=32") as notes:
        ids = pipe("the king", return_tensors=True, eos_token_id=None)[0]["generated_token_ids"]
        texts = pipe(["the king", "a longer prompt than the first"], batch_size=2, do_sample=False)
    assert len(ids) == 32  # the whole context: 2 prompt tokens + 30 new ones
    assert all(t[0]["generated_text"].startswith(p) for t, p in zip(texts, ["the king", "a longer"]))
    assert sum("does not fit" in str(n.message) for n in notes) == 1  # said once, not per call or batch
    # a value the caller gave is never changed: it must fit
    with pytest.raises(gpt2kit.errors.ContextLengthError, match="at most 30 new tokens"):
        pipe("the king", max_new_tokens=256)
    assert len(pipe("the king", max_new_tokens=7, do_sample=False, return_tensors=True)[0]["generated_token_ids"]) == 9


def test_a_model_default_length_is_capped_but_an_explicit_one_is_strict(short_ckpt, fresh_notices):
    model = AutoModelForCausalLM.from_pretrained(short_ckpt)
    model.generation_config.max_new_tokens = 500  # more than n_positions allows
    ids = torch.tensor([[464, 5822, 318]])
    with pytest.warns(UserWarning, match=r"generation_config sets max_new_tokens=500, which does not fit"):
        out = model.generate(ids, eos_token_id=None)
    assert out.shape == (1, 32)
    for kw in (dict(max_new_tokens=500), dict(generation_config=GenerationConfig(max_new_tokens=500))):
        with pytest.raises(gpt2kit.errors.ContextLengthError, match="n_positions=32"):
            model.generate(ids, **kw)
    with pytest.raises(gpt2kit.errors.ContextLengthError, match="max_length=300 is beyond"):
        model.generate(ids, max_length=300)  # the caller's max_length decides, not the model's max_new_tokens
    assert model.generate(ids, max_length=6, eos_token_id=None).shape == (1, 6)


def test_a_trained_model_saves_a_max_new_tokens_that_fits(tmp_path):
    from gpt2kit.training.loop import train
    from gpt2kit.training.settings import TrainConfig

    text = tmp_path / "t.txt"
    text.write_text("the king is dead, long live the king. " * 40)
    train(TrainConfig(files=[str(text)], out_dir=str(tmp_path / "run"), n_layer=1, n_embd=8, n_head=2, n_positions=16,
                      max_steps=1, batch_size=1, eval_every=1, progress=False, device="cpu"))
    saved = GenerationConfig.from_pretrained(tmp_path / "run")
    assert saved.max_new_tokens == 8  # half the 16-token context; 50 where the context allows
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "run").max_new_tokens == 8
    out = pipeline("text-generation", model=str(tmp_path / "run"))("the king", return_tensors=True)
    assert len(out[0]["generated_token_ids"]) <= 2 + 8
