"""generate() refuses what cannot succeed: a batch whose buffers cannot fit in memory (before any work, with
the figures), and a model whose logits turn NaN or infinite (at the step it happens, for every search)."""
import math

import pytest
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel
from gpt2kit.errors import InsufficientMemoryError, NonFiniteLogitsError
from gpt2kit.generation import guards
from model_helpers import TINY, perturb_

GiB = 1 << 30


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_(GPT2LMHeadModel(GPT2Config(**TINY))).eval()


def no_forward(*a, **k):
    raise AssertionError("the model ran before the memory check")


def meminfo_total():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/meminfo here: the memory check is skipped on this system")


# -- memory ---------------------------------------------------------------------------------------

def test_the_estimate_counts_the_kv_cache_and_the_score_rows(model):
    cfg = model.config
    parts = guards.generation_memory(cfg, torch.float32, rows=6, prompt_len=5, max_length=20, beams=False,
                                     sampling=True, kept_outputs=0)
    assert parts["KV cache"] == 2 * cfg.n_layer * 6 * 20 * cfg.n_embd * 4
    assert parts["next-token scores"] == 4 * 6 * cfg.vocab_size * 4  # logits, scores, next logits, probabilities
    half = guards.generation_memory(cfg, torch.bfloat16, rows=6, prompt_len=5, max_length=20, beams=False,
                                    sampling=True, kept_outputs=0)
    assert half["KV cache"] * 2 == parts["KV cache"]
    kept = guards.generation_memory(cfg, torch.float32, rows=6, prompt_len=5, max_length=20, beams=False,
                                    sampling=True, kept_outputs=2)
    assert kept["kept scores/logits"] == 2 * 15 * 6 * cfg.vocab_size * 4


def test_a_generation_that_cannot_fit_is_refused_before_any_work(model, monkeypatch):
    """Far more rows than this machine's whole memory could hold: refused at once, with the figures."""
    total = meminfo_total()
    available = guards.available_memory(torch.device("cpu"))
    assert 0 < available <= total
    ids = torch.tensor([[5, 6, 7]])
    per_row = sum(guards.generation_memory(model.config, torch.float32, 1, 3, 13, beams=False, sampling=True,
                                           kept_outputs=0).values())
    rows = 2 * total // per_row  # twice the machine's memory
    monkeypatch.setattr(model.transformer, "forward", no_forward)
    with pytest.raises(InsufficientMemoryError) as err:
        model.generate(ids, max_new_tokens=10, do_sample=True, num_return_sequences=rows)
    message = str(err.value)
    assert isinstance(err.value, MemoryError)
    assert f"{rows} rows = 1 prompt(s) x {rows} return sequences" in message
    need = float(message.split("needs at least ")[1].split(" GiB")[0])
    assert math.isclose(need, rows * per_row / GiB, abs_tol=0.06) and need * GiB > total
    assert "GiB is available on cpu" in message and "Reduce num_return_sequences or max_new_tokens (now 10)" in message


def test_the_refusal_names_what_to_reduce_and_what_would_fit(model, monkeypatch):
    monkeypatch.setattr(guards, "available_memory", lambda device: 100 << 20)  # 100 MiB left
    monkeypatch.setattr(model.transformer, "forward", no_forward)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kw = dict(max_new_tokens=50, num_beams=2000, return_dict_in_generate=True, output_scores=True)
    with pytest.raises(InsufficientMemoryError, match="Reduce num_beams, the prompts per batch, max_new_tokens "
                                                      r"\(now 50\) or output_scores/output_logits\.") as err:
        model.generate(ids, **kw)
    parts = guards.generation_memory(model.config, torch.float32, 4000, 3, 53, beams=True, sampling=False,
                                     kept_outputs=1)
    fit = int(err.value.args[0].split("(about ")[1].split(" rows")[0])
    assert fit == (100 << 20) * 4000 // sum(parts.values())
    monkeypatch.undo()
    small = model.generate(ids, max_new_tokens=3, num_beams=2)  # what fits runs as before
    assert small.shape == (2, 6)


def test_no_check_where_the_available_memory_is_unknown(model, monkeypatch):
    monkeypatch.setattr(guards, "available_memory", lambda device: None)
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=2).shape == (1, 4)


# -- NaN / inf ------------------------------------------------------------------------------------

def broken(model, where, value=float("nan"), dtype=torch.float32):
    m = GPT2LMHeadModel(model.config).eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        where(m).fill_(value)
    return m.to(dtype)


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, seed=0), dict(num_beams=3),
                                dict(cache_implementation="dynamic"), dict(do_sample=True, num_beams=2, seed=0)],
                         ids=["greedy", "sampling", "beams", "dynamic-cache", "beam-sampling"])
def test_nan_logits_stop_generation_at_their_step(model, kw):
    ids = torch.tensor([[5, 6, 7]])
    # the position embedding of the first generated token: the prompt's logits are fine (step 1), the next not
    m = broken(model, lambda m: m.transformer.wpe.weight[3])
    with pytest.raises(NonFiniteLogitsError, match=r"NaN/inf logits at step 2 \(new token 2\).*corrupt"):
        m.generate(ids, max_new_tokens=6, **kw)
    m = broken(model, lambda m: m.transformer.ln_f.bias[0], float("inf"))  # inf from the first step
    with pytest.raises(NonFiniteLogitsError, match="at step 1 "):
        m.generate(ids, max_new_tokens=6, **kw)


def test_nan_in_float16_names_the_overflow(model):
    m = broken(model, lambda m: m.transformer.h[0].mlp.c_fc.weight[0, :3], dtype=torch.float16)
    with pytest.raises(RuntimeError, match="overflow in float16 \\(load the model in float32 or bfloat16\\)"):
        m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the deferred check runs on a GPU")
def test_nan_logits_on_a_gpu_are_caught_without_a_read_back_per_step(model):
    """On a GPU the flag is read back with the "all done?" check (every 8 steps) or at the end."""
    m = broken(model, lambda m: m.transformer.wpe.weight[4]).cuda()
    ids = torch.tensor([[5, 6, 7]], device="cuda")
    for kw in (dict(), dict(do_sample=True, seed=0), dict(eos_token_id=0, do_sample=True, seed=0)):
        with pytest.raises(NonFiniteLogitsError, match="at step 3 "):
            m.generate(ids, max_new_tokens=20, **kw)
    fine = GPT2LMHeadModel(model.config).eval().cuda()
    fine.load_state_dict(model.state_dict())
    assert torch.equal(fine.generate(ids, max_new_tokens=9).cpu(), model.generate(ids.cpu(), max_new_tokens=9))


def test_nonfinite_rows_names_exactly_the_rows_with_a_nan_or_inf():
    logits = torch.randn(6, 50257) * 30  # large finite values: the one-sum rule must not overflow on them
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, -1] = float("-inf")
    logits[4, 5], logits[4, 9] = float("inf"), float("-inf")  # their sum is NaN, still caught
    expected = ~torch.isfinite(logits).all(-1)
    assert guards.nonfinite_rows(logits).tolist() == expected.tolist() == [False, True, True, True, True, False]
