"""Each logits transform against transformers' own processor on random logits (ties and -inf included),
the order generate() applies them in, and GenerationConfig's files, defaults and checks."""
import json

import pytest
import torch
import transformers
import transformers.generation.logits_process as T

from gpt2kit.generation import GenerationConfig
from gpt2kit.generation import logits as L


def random_case(seed, B=4, V=60, L_=12):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, V, generator=g) * 3
    scores[0, :5] = scores[0, 5]  # ties at the top-k boundary
    scores[1, 7] = -float("inf")
    ids = torch.randint(0, 8, (B, L_), generator=g)  # a small alphabet, so n-grams repeat
    return ids, scores


PAIRS = [
    ("top-k", lambda: L.TopKLogitsWarper(5), lambda: T.TopKLogitsWarper(5)),
    ("top-k-keep", lambda: L.TopKLogitsWarper(2, min_tokens_to_keep=3), lambda: T.TopKLogitsWarper(2, min_tokens_to_keep=3)),
    ("top-p", lambda: L.TopPLogitsWarper(0.8), lambda: T.TopPLogitsWarper(0.8)),
    ("top-p-keep", lambda: L.TopPLogitsWarper(0.05, min_tokens_to_keep=2), lambda: T.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
    ("min-p", lambda: L.MinPLogitsWarper(0.1), lambda: T.MinPLogitsWarper(0.1)),
    ("min-p-keep", lambda: L.MinPLogitsWarper(0.9, min_tokens_to_keep=3), lambda: T.MinPLogitsWarper(0.9, min_tokens_to_keep=3)),
    ("typical-p", lambda: L.TypicalLogitsWarper(0.7), lambda: T.TypicalLogitsWarper(0.7)),
    ("typical-p-keep", lambda: L.TypicalLogitsWarper(0.2, min_tokens_to_keep=4), lambda: T.TypicalLogitsWarper(0.2, min_tokens_to_keep=4)),
    ("temperature", lambda: L.TemperatureLogitsWarper(0.7), lambda: T.TemperatureLogitsWarper(0.7)),
    ("repetition", lambda: L.RepetitionPenaltyLogitsProcessor(1.5), lambda: T.RepetitionPenaltyLogitsProcessor(1.5)),
    ("repetition-pads", lambda: L.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=torch.tensor([0, 3, 5, 1])),
     lambda: T.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=torch.tensor([0, 3, 5, 1]))),
    ("no-repeat-1", lambda: L.NoRepeatNGramLogitsProcessor(1), lambda: T.NoRepeatNGramLogitsProcessor(1)),
    ("no-repeat-2", lambda: L.NoRepeatNGramLogitsProcessor(2), lambda: T.NoRepeatNGramLogitsProcessor(2)),
    ("no-repeat-3", lambda: L.NoRepeatNGramLogitsProcessor(3), lambda: T.NoRepeatNGramLogitsProcessor(3)),
    ("no-repeat-long", lambda: L.NoRepeatNGramLogitsProcessor(20), lambda: T.NoRepeatNGramLogitsProcessor(20)),
    ("bad-words", lambda: L.NoBadWordsLogitsProcessor([[3], [1, 2], [4, 5, 6], [9]], eos_token_id=9),
     lambda: T.NoBadWordsLogitsProcessor([[3], [1, 2], [4, 5, 6], [9]], eos_token_id=9)),
    ("min-new-tokens", lambda: L.MinNewTokensLengthLogitsProcessor(8, 6, [2, 9]),
     lambda: T.MinNewTokensLengthLogitsProcessor(8, 6, torch.tensor([2, 9]))),
    ("min-length", lambda: L.MinLengthLogitsProcessor(13, 4), lambda: T.MinLengthLogitsProcessor(13, 4)),
]


@pytest.mark.parametrize("name,ours,theirs", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processor_matches_transformers(name, ours, theirs, seed):
    ids, scores = random_case(seed)
    expected = theirs()(ids, scores.clone())
    got = ours()(ids, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), name
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _hf_order(hf_model, **settings):
    cfg = transformers.GenerationConfig(**settings)
    cfg.update(**transformers.GenerationConfig._get_default_generation_params(), defaults_only=True)
    hf_model._prepare_special_tokens(cfg, device="cpu")
    procs = hf_model._get_logits_processor(cfg, input_ids_seq_length=5, device="cpu")
    return [type(p).__name__ for p in procs]


def test_processors_are_applied_in_the_reference_order():
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50))
    settings = dict(repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=[[3]], min_new_tokens=2,
                    do_sample=True, temperature=0.5, top_k=7, top_p=0.9, min_p=0.05, typical_p=0.8,
                    renormalize_logits=True, eos_token_id=4)
    cfg = GenerationConfig(**settings).fill_defaults()
    ours = [type(p).__name__ for p in L.build_processors(cfg, 5, torch.tensor([4]))]
    assert ours == _hf_order(hf, **settings)


def test_generation_config_files_and_defaults(tmp_path):
    cfg = GenerationConfig(max_new_tokens=7, do_sample=True, top_k=3, eos_token_id=[1, 2], my_custom=5)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "generation_config.json").read_text())
    assert data["max_new_tokens"] == 7 and data["my_custom"] == 5 and "temperature" not in data
    back = GenerationConfig.from_pretrained(tmp_path)
    assert back == cfg and back.my_custom == 5
    # transformers reads ours, and we read transformers'
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert theirs.max_new_tokens == 7 and theirs.eos_token_id == [1, 2]
    transformers.GenerationConfig(num_beams=4, length_penalty=0.5, early_stopping="never").save_pretrained(tmp_path / "hf")
    mine = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (mine.num_beams, mine.length_penalty, mine.early_stopping) == (4, 0.5, "never")
    # unset fields are None; the defaults of transformers 5 fill them at generation time
    assert GenerationConfig().max_length is None
    filled = GenerationConfig(top_k=0).fill_defaults()
    assert (filled.max_length, filled.top_k, filled.num_beams, filled.do_sample) == (20, 0, 1, False)
    assert GenerationConfig.from_model_config(transformers.GPT2Config()).to_diff_dict()["eos_token_id"] == 50256


@pytest.mark.parametrize("bad", [dict(early_stopping="sometimes"), dict(max_new_tokens=0), dict(num_beams=-1),
                                 dict(cache_implementation="paged"), dict(bad_words_ids=[3]), dict(streamer=object())])
def test_generation_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_combination_checks_wait_for_generate():
    cfg = GenerationConfig(num_return_sequences=3)  # fine alone: do_sample may come later
    with pytest.raises(ValueError, match="num_return_sequences"):
        cfg.validate(combinations=True)
    with pytest.raises(ValueError, match="smaller or equal"):
        GenerationConfig(num_beams=2, num_return_sequences=3).validate(combinations=True)
