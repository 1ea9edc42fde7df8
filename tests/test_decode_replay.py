"""A decode step's blocks recorded as their kernel calls and replayed (model/replay.py): the replayed steps give
exactly the logits of the steps run through the modules, the replay really runs, and a step that is not only
gpt2kit's kernels, or whose kernels read a tensor from outside the step, is not replayed."""
import pytest
import torch

from gpt2kit import GPT2Config, GPT2LMHeadModel, StaticCache
from gpt2kit import native
from gpt2kit.generation import runner as runner_mod
from gpt2kit.model.replay import DecodeReplay
from gpt2kit.quantization import BitsAndBytesConfig, TorchAoConfig

needs_kernels = pytest.mark.skipif(native.library() is None, reason="gpt2kit's native kernels are not built on this "
                                   "CPU (neither AVX2 nor AVX-512, or no compiler)")
pytestmark = pytest.mark.usefixtures("native_build")  # each build this CPU runs (conftest.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2-replay")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_positions=128)).save_pretrained(d)
    return d


CONFIGS = {
    "int4-emb": lambda: TorchAoConfig("int4_weight_only", group_size=32, include_input_output_embeddings=True),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}


def steps(model, replay, B=1, n=8, starts=(7,)):
    """Logits of a prompt per row (rows at different lengths where `starts` differ), then n greedy steps."""
    cache = StaticCache(model.config, B, 64, dtype=model.transformer.wpe.weight.dtype)
    g = torch.Generator().manual_seed(1)
    out = []
    for b, s in enumerate(starts):
        ids = torch.randint(0, model.config.vocab_size, (1, s), generator=g)
        out.append(model.decode(ids, cache, rows=torch.tensor([b])))
    tok = torch.stack([o[0, -1].argmax() for o in out])[:, None]  # (B, 1)
    for _ in range(n):
        logits = model.decode(tok, cache, replay=replay)
        out.append(logits)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return out


@needs_kernels
@pytest.mark.parametrize("mode", sorted(CONFIGS))
@pytest.mark.parametrize("B,starts", [(1, (7,)), (3, (5, 9, 2))])
def test_replayed_steps_equal_module_steps(checkpoint, mode, B, starts):
    model = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=CONFIGS[mode]()).eval()
    replay = DecodeReplay()
    plain, replayed = steps(model, None, B, starts=starts), steps(model, replay, B, starts=starts)
    assert replay.refused is None and replay.replays == 7  # recorded at the first step, replayed at the next 7
    assert len(replay.calls) == 2 * 5  # per block: QKV, attention, output, MLP in, MLP out
    for a, b in zip(plain, replayed):
        assert torch.equal(a, b)


@needs_kernels
def test_generate_replays_its_steps(checkpoint, monkeypatch):
    made = []

    class Spy(DecodeReplay):
        def __init__(self):
            super().__init__()
            made.append(self)

    model = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=CONFIGS["int4-emb"]()).eval()
    ids = torch.randint(0, 50257, (1, 6), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(runner_mod, "DecodeReplay", Spy)
    fast = model.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert len(made) == 1 and made[0].replays == 8  # 10 tokens: the prefill's, a recorded step, 8 replays
    monkeypatch.setattr(runner_mod, "DecodeReplay", lambda: None)  # no replay: every step through the modules
    slow = model.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.logits, slow.logits):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_batch1_steps_are_replayed(checkpoint, dtype):
    """A float32 or bfloat16 step of one row: every product is gpt2kit's own kernel (linear.NATIVE), so it
    replays."""
    from gpt2kit.model import linear

    model = GPT2LMHeadModel.from_pretrained(checkpoint, dtype=dtype).eval()
    replay = DecodeReplay()
    plain, replayed = steps(model, None), steps(model, replay)
    assert replay.refused is None and replay.replays == 7 and len(replay.calls) == 2 * 5
    assert model.transformer.h[1].mlp.c_fc.last_path == linear.NATIVE
    for a, b in zip(plain, replayed):
        assert torch.equal(a, b)


def test_a_step_with_torch_ops_is_not_replayed(checkpoint):
    """Three rows of float32 run oneDNN's or MKL's products (PyTorch ops): no replay, the same logits."""
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    replay = DecodeReplay()
    plain, replayed = steps(model, None, 3, starts=(5, 9, 2)), steps(model, replay, 3, starts=(5, 9, 2))
    assert replay.replays == 0 and replay.calls is None
    assert replay.refused.startswith("aten.") or replay.refused.startswith("mkldnn.")  # the first op that computes
    for a, b in zip(plain, replayed):
        assert torch.equal(a, b)


@needs_kernels
def test_a_kernel_reading_a_tensor_from_outside_is_not_replayed(checkpoint):
    model = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=CONFIGS["int8"]()).eval()
    cache = StaticCache(model.config, 1, 16)
    model.decode(torch.tensor([[1, 2, 3]]), cache)
    plan = cache.plan(1)
    x = torch.randn(1, 1, 768)
    outside = torch.randn(1, 1, 3 * 768)  # made before the step: a replay would read it stale
    replay = DecodeReplay()
    y = replay.run(lambda x: cache.decode_attention(0, outside, plan, 0.125), x, cache, plan, model.transformer.h)
    assert y.shape == (1, 1, 768) and replay.calls is None and "made outside the step" in replay.refused
    assert native.RECORDING.calls is None


@needs_kernels
def test_new_cache_buffers_are_recorded_again(checkpoint):
    model = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=CONFIGS["int8"]()).eval()
    ref = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=CONFIGS["int8"]()).eval()
    replay = DecodeReplay()
    caches = [StaticCache(model.config, 2, 32), StaticCache(model.config, 2, 32)]
    for c in caches:
        ref.decode(torch.tensor([[4, 5], [6, 7]]), c) if c is caches[1] else model.decode(torch.tensor([[4, 5], [6, 7]]), c)
    tok = torch.tensor([[8], [9]])
    for _ in range(3):
        assert torch.equal(model.decode(tok, caches[0], replay=replay), ref.decode(tok, caches[1]))
    first = replay.calls
    for c in caches:  # row 1 leaves: the cache's buffers are new tensors
        c.select_rows(torch.tensor([1]))
    for _ in range(3):
        assert torch.equal(model.decode(tok[1:], caches[0], replay=replay), ref.decode(tok[1:], caches[1]))
    assert replay.calls is not first and replay.replays == 2 + 2


@needs_kernels
def test_a_failing_step_stops_recording(checkpoint):
    model = GPT2LMHeadModel.from_pretrained(checkpoint, quantization_config=CONFIGS["int8"]()).eval()
    cache = StaticCache(model.config, 1, 16)
    model.decode(torch.tensor([[1]]), cache)

    def blocks(x):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        DecodeReplay().run(blocks, torch.randn(1, 1, 768), cache, cache.plan(1), model.transformer.h)
    assert native.RECORDING.calls is None


@needs_kernels
def test_recording_does_not_import_dynamo(checkpoint):
    """The recording's dispatch mode opts out of PyTorch's torch._dynamo.disable wrapper, whose first call imports
    torch._dynamo and torch.distributed (~1.5 s added to a process's first generate()). Run in a fresh process, since
    this one may have imported them for other tests."""
    import subprocess
    import sys

    code = f"""
import sys, torch
from gpt2kit import GPT2LMHeadModel
from gpt2kit.model.replay import DecodeReplay
from gpt2kit.quantization import TorchAoConfig
assert "torch._dynamo" not in sys.modules, "imported before any recording: this test proves nothing"
model = GPT2LMHeadModel.from_pretrained({str(checkpoint)!r}, quantization_config=TorchAoConfig("int8_weight_only")).eval()
from gpt2kit import StaticCache
cache, replay = StaticCache(model.config, 1, 16), DecodeReplay()
tok = torch.tensor([[5]])
for _ in range(3):
    tok = model.decode(tok, cache, replay=replay)[:, -1].argmax(-1, keepdim=True)
assert replay.refused is None and replay.replays == 2, (replay.refused, replay.replays)
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "dynamo imported: False" in out.stdout
