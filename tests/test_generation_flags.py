"""The generation flags of `gpt2kit generate`: the same ranges as the API (one rule each, in
GenerationConfig), flags that contradict each other refused, and those that combine passed through."""
import pytest

from gpt2kit import GPT2LMHeadModel, GenerationConfig
from gpt2kit.cli import build_parser, main
from gpt2kit.generation.config import RULES

from test_eval import make_checkpoint


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_accepts(flag, value, capsys) -> bool:
    try:
        build_parser().parse_args(["generate", "hi", flag, str(value)])
    except SystemExit:
        capsys.readouterr()
        return False
    return True


def api_accepts(field, value) -> bool:
    try:
        GenerationConfig(**{field: value, "do_sample": True}).validate(combinations=True)
    except ValueError:
        return False
    return True


FLAGS = {  # flag -> (GenerationConfig field, values around each bound)
    "--temperature": ("temperature", [-1.0, 0.0, 1e-3, 0.7, 5.0]),
    "--top-k": ("top_k", [-1, 0, 1, 50]),
    "--top-p": ("top_p", [-0.1, 0.0, 0.5, 1.0, 1.5]),
    "--typical-p": ("typical_p", [-0.1, 0.0, 0.5, 1.0, 1.5]),
    "--min-p": ("min_p", [-0.1, 0.0, 0.5, 1.0, 1.5]),
    "--repetition-penalty": ("repetition_penalty", [-1.0, 0.0, 0.5, 1.3]),
    "--no-repeat-ngram-size": ("no_repeat_ngram_size", [-1, 0, 3]),
    "--num-beams": ("num_beams", [-1, 0, 1, 4]),
    "--max-new-tokens": ("max_new_tokens", [-1, 0, 1, 9]),
    "--num-return-sequences": ("num_return_sequences", [0, 1]),
}


@pytest.mark.parametrize("flag", list(FLAGS))
def test_the_command_and_the_api_accept_the_same_values(flag, capsys):
    field, values = FLAGS[flag]
    for v in values:
        assert cli_accepts(flag, v, capsys) == api_accepts(field, v), (flag, v)
    bad = next(v for v in values if not api_accepts(field, v))
    code, _, err = run(["generate", "hi", flag, str(bad)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"expected {RULES[field][1]}, got" in err and f"argument {flag}" in err


def test_temperature_zero_suggests_greedy(capsys):
    code, out, err = run(["generate", "hi", "--temperature", "0"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--temperature: expected a strictly positive number when sampling, got 0" in err and "use --greedy" in err
    with pytest.raises(ValueError, match="do_sample=False"):  # the API says the same in its own terms
        GenerationConfig(temperature=0.0, do_sample=True).validate(combinations=True)


@pytest.mark.parametrize("argv, expected", [
    (["--greedy", "--do-sample"], "argument --do-sample: not allowed with argument --greedy"),
    (["--do-sample", "--greedy"], "argument --greedy: not allowed with argument --do-sample"),
    (["--greedy", "--top-k", "5"], "--top-k only applies when sampling, but --greedy was given"),
    (["--top-p", "0.9", "--greedy", "--temperature", "0.5"], "--temperature, --top-p only apply when sampling"),
])
def test_contradicting_flags_are_refused(argv, expected, capsys):
    code, out, err = run(["generate", "hi", *argv], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), n_layer=1, n_embd=16, n_head=2, n_positions=24)


@pytest.mark.parametrize("argv, passed", [
    (["--num-beams", "3", "--do-sample"], dict(num_beams=3, do_sample=True)),  # beam sampling, as the API offers
    (["--num-beams", "3", "--greedy"], dict(num_beams=3, do_sample=False)),
    (["--top-k", "5"], dict(top_k=5, do_sample=True)),  # a sampling flag asks for sampling
    (["--temperature", "0.5", "--num-beams", "2"], dict(temperature=0.5, num_beams=2, do_sample=True)),
])
def test_flags_that_combine_reach_generate(tiny_model, argv, passed, capsys, monkeypatch):
    seen = {}
    real = GPT2LMHeadModel.generate

    def spy(self, *a, **kw):
        seen.update(kw)
        return real(self, *a, **kw)

    monkeypatch.setattr(GPT2LMHeadModel, "generate", spy)
    code, out, err = run(["generate", "The king", "--model", tiny_model, "--max-new-tokens", "3", "--seed", "0",
                          *argv], capsys)
    assert code == 0, err
    assert {k: seen.get(k) for k in passed} == passed and out.startswith("The king")
