"""The float32 head's argmax through its int8 screen (LMHead.argmax, native/dense.c gpt2kit_head_argmax): the
index the full logits' argmax gives, for every build of the kernels this CPU runs, on ties, near-ties below
the screen's resolution and banned ids; and greedy generation through it gives transformers' tokens. At more
rows (any_rows, the server's), through the bf16 screen: the argmax of the native row kernel's logits."""
import pytest
import torch

from gpt2kit import GPT2LMHeadModel
from gpt2kit.model import linear, onednn

transformers = pytest.importorskip("transformers")

from model_helpers import twin  # noqa: E402


def head_of(V, C, seed=0):
    torch.manual_seed(seed)
    head = linear.LMHead(C, V, bias=False).eval()
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    return head


def full_argmax(head, x, banned=None):
    """What a decode step's logits give (the same policy context), with banned ids at -inf as a processor sets."""
    with torch.no_grad(), linear.decoding(1, dtype=torch.float32, rows=x.shape[0]):
        logits = head(x)
    if banned is not None:
        logits[:, banned] = float("-inf")
    return logits.argmax(-1)


def screened(head, x, banned=None):
    with torch.no_grad(), linear.decoding(1, dtype=torch.float32, rows=x.shape[0]):
        return head.argmax(x, banned)


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("B", [1, 2])
def test_screened_argmax_is_the_logits_argmax(B):
    from gpt2kit import native

    head = head_of(50257, 768)  # GPT-2's head
    g = torch.Generator().manual_seed(1)
    counts = []
    for trial in range(40):
        x = torch.randn(B, 768, generator=g) * (1 + trial % 5)
        got = screened(head, x)
        if native.library() is None:
            assert got is None  # no kernel: the caller computes the logits
            return
        assert head.last_path == linear.ARGMAX_SCREEN
        assert torch.equal(got, full_argmax(head, x)), trial
        counts += head.last_candidates
    assert max(counts) < 100  # the screen rules out all but a few outputs (else it would not pay)


@pytest.mark.usefixtures("native_build")
def test_ties_near_ties_and_banned_ids():
    from gpt2kit import native

    if native.library() is None:
        pytest.skip("no native kernels: LMHead.argmax declines (covered above)")
    head = head_of(3000, 768, seed=2)
    w = head.weight

    def edit(value):  # in place on the parameter: its version moves, so the int8 copy is rebuilt
        with torch.no_grad():
            w[2500] = value

    x = (w[100] * 50).detach().clone()[None]  # output 100 is far ahead of the rest
    edit(w[100])  # an exact tie at a higher index: the first wins, as argmax
    assert int(screened(head, x)) == 100 == int(full_argmax(head, x))
    copy = head._screen[3]
    for factor in (1 + 3e-7, 1 - 3e-7):  # exact float32 logits a few ulps apart, far below the screen's resolution
        edit(w[100] * factor)
        assert int(screened(head, x)) == int(full_argmax(head, x)), factor
        assert head._screen[3] is not copy  # rebuilt after the edit
        assert head.last_candidates[0] >= 2  # both had to be summed again
    edit(w[100] * 0.5)  # far behind now: the screen rules it out without summing it again
    assert int(screened(head, x)) == 100 and head.last_candidates[0] == 1
    banned = torch.tensor([100, 2500])
    assert int(screened(head, x, banned)) == int(full_argmax(head, x, banned)) not in (100, 2500)
    assert screened(head, x, torch.arange(3000)) is None  # everything banned: left to the logits
    bad = x.clone()
    bad[0, 7] = float("nan")
    assert screened(head, bad) is None  # a NaN: the logits path reports it
    assert screened(head, torch.randn(3, 768)) is None  # 3 rows: not the native head path this screens


@pytest.mark.usefixtures("native_build")
def test_greedy_generation_through_the_head_argmax_gives_transformers_tokens():
    """Batch 1 and 2 (the rows the screen takes), eos banned until min_new_tokens (the ban the screen applies)
    and an eos that ends a row: the tokens of transformers' generate."""
    from gpt2kit import native

    hf, ours = twin(GPT2LMHeadModel, transformers.GPT2LMHeadModel, attn="sdpa", seed=5, vocab_size=2000, n_embd=64)
    g = torch.Generator().manual_seed(3)
    for B in (1, 2):
        ids = torch.randint(1, 2000, (B, 6), generator=g)
        free = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        eos = int(free[0, 6 + 2])  # emitted at step 2: banned below, ending the row where allowed
        for kw in (dict(), dict(eos_token_id=eos, min_new_tokens=6), dict(eos_token_id=eos)):
            a = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
            ours.lm_head.__dict__["last_path"] = None
            b = ours.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
            assert torch.equal(a, b), (B, kw)
            want = linear.ARGMAX_SCREEN if native.library() is not None else linear.PACKED
            assert ours.lm_head.last_path == want, (B, kw)


def row_kernel_argmax(head, x, banned=None):
    """Each row's argmax over the logits the native kernel gives it alone (gpt2kit_f32_mm at one row: the
    arithmetic of a 1-row decode step), banned ids at -inf."""
    from gpt2kit import native

    V, K = head.weight.shape
    y = torch.empty(x.shape[0], V)
    for m in range(x.shape[0]):
        native.call(native.library().gpt2kit_f32_mm, x[m:m + 1].contiguous(), 1, K, K, head.weight, V, 1, None,
                    y[m:m + 1], V, 0, None, None, None, 0.0)
    if banned is not None:
        y[:, banned] = float("-inf")
    return y.argmax(-1)


def screened_rows(head, x, banned=None, rows_hint=32):
    with torch.no_grad(), linear.decoding(rows_hint, dtype=torch.float32, rows=x.shape[0]):
        return head.argmax(x, banned, any_rows=True)


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("B", [3, 8, 32])
def test_bf16_screen_at_more_rows_is_the_row_kernels_argmax(B):
    from gpt2kit import native

    head = head_of(50257, 768)  # GPT-2's head
    if native.library() is None or not onednn.bf16_native():
        assert screened_rows(head, torch.randn(B, 768)) is None  # no bf16 hardware or kernels: the logits
        return
    g = torch.Generator().manual_seed(4)
    counts = []
    for trial in range(6):
        x = torch.randn(B, 768, generator=g) * (1 + trial % 3)
        got = screened_rows(head, x)
        assert head.last_path == linear.ARGMAX_SCREEN_BF16
        assert torch.equal(got, row_kernel_argmax(head, x)), trial
        counts += head.last_candidates
    assert max(counts) < 200
    assert screened(head, torch.randn(B, 768)) is None  # without any_rows (generate): declined, as before


@pytest.mark.usefixtures("native_build")
def test_bf16_screen_ties_near_ties_bans_and_nan():
    from gpt2kit import native

    if native.library() is None or not onednn.bf16_native():
        pytest.skip("the bf16 screen needs bf16 hardware (AVX512-BF16 or AMX) and the native kernels")
    head = head_of(3000, 768, seed=2)
    w = head.weight

    def edit(value):
        with torch.no_grad():
            w[2500] = value

    x = torch.cat([(w[100] * 50).detach()[None], torch.randn(3, 768)])  # row 0: output 100 far ahead
    edit(w[100])  # an exact tie at a higher index: the first wins
    assert int(screened_rows(head, x)[0]) == 100
    copy = head._screen16[4]
    for factor in (1 + 3e-7, 1 - 3e-7):  # logits a few float32 ulps apart: far below bf16's resolution
        edit(w[100] * factor)
        got = screened_rows(head, x)
        assert torch.equal(got, row_kernel_argmax(head, x)), factor
        assert head._screen16[4] is not copy and head.last_candidates[0] >= 2  # rebuilt; both summed again
    banned = torch.tensor([100, 2500])
    assert torch.equal(screened_rows(head, x, banned), row_kernel_argmax(head, x, banned))
    bad = x.clone()
    bad[2, 7] = float("nan")
    assert screened_rows(head, bad) is None  # a NaN: the logits path reports it
