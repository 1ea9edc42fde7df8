"""gpt2kit's float32 decode kernel (native/dense.c, linear.NATIVE): products in both weight layouts against a float64
reference, with the layer norm, GELU and residual it fuses, shapes with tails, bad arguments refused; and the
projections that take it."""
import pytest
import torch
import torch.nn.functional as F

from gpt2kit import native
from gpt2kit.model import linear
from gpt2kit.model.linear import LMHead, Projection

pytestmark = [pytest.mark.skipif(native.library() is None, reason="gpt2kit's native kernels are not built on this "
                                                                   "CPU (neither AVX2 nor AVX-512, or no compiler)"),
              pytest.mark.usefixtures("native_build")]  # each build this CPU runs (conftest.py)


def kernel(x, w, layout, bias=None, act=0, residual=None, ln=None):
    M, K = x.shape
    N = w.shape[1] if layout == 0 else w.shape[0]
    y = torch.empty(M, N)
    ln = native.NO_NORM if ln is None else (ln.weight, ln.bias, ln.eps)
    rc = native.call(native.library().gpt2kit_f32_mm, x, M, K, K, w, N, layout, bias, y, N, act, residual, *ln)
    return rc, y


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (2, 96, 50), (3, 37, 19), (16, 64, 33), (1, 3072, 768)])
def test_products_match_float64(layout, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn((K, N) if layout == 0 else (N, K), generator=g) * 0.05
    b = torch.randn(N, generator=g)
    rc, y = kernel(x, w, layout, b)
    ref = x.double() @ (w.double() if layout == 0 else w.double().t()) + b.double()
    assert rc == 0
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())


def test_prologue_and_epilogue_are_the_blocks_ops():
    g = torch.Generator().manual_seed(3)
    ln = torch.nn.LayerNorm(128)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=g)
        ln.bias.normal_(0, 0.1, generator=g)
    x, res = torch.randn(2, 128, generator=g) * 3 + 1, torch.randn(2, 200, generator=g)
    w, b = torch.randn(128, 200, generator=g) * 0.1, torch.randn(200, generator=g)
    rc, y = kernel(x, w, 0, b, act=1, residual=res, ln=ln)
    with torch.no_grad():
        ref = F.gelu(ln(x).double() @ w.double() + b.double(), approximate="tanh") + res.double()
    assert rc == 0
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)


def test_bad_arguments_are_refused():
    x, w = torch.randn(17, 32), torch.randn(32, 8)
    for args in ((x, w, 0), (x[:1], w, 2)):  # 17 rows (at most 16), an unknown layout
        with pytest.raises(RuntimeError, match="refused its arguments"):
            kernel(*args)


def test_projections_take_it_in_a_decode_step_of_two_rows():
    torch.manual_seed(0)
    proj, head = Projection(64, 96), LMHead(64, 300, bias=False)
    with torch.no_grad():
        proj.weight.normal_(0, 0.1), proj.bias.normal_(), head.weight.normal_(0, 0.1)
    norm = torch.nn.LayerNorm(64)
    x, res = torch.randn(2, 1, 64), torch.randn(2, 1, 96)
    with torch.no_grad():
        want = F.gelu(F.linear(norm(x), proj.weight.t(), proj.bias), approximate="tanh") + res
        with linear.decoding(1, rows=2):
            got = proj(x, "gelu_new", residual=res, norm=norm)
            assert proj.last_path == linear.NATIVE
            logits = head(x)
            assert head.last_path == linear.NATIVE
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, F.linear(x, head.weight), rtol=0, atol=1e-5)
        with linear.decoding(1, rows=3):  # more rows than the kernel pays for: oneDNN or MKL
            proj(torch.randn(3, 1, 64), "gelu_new")
            assert proj.last_path != linear.NATIVE


def bf16_kernel(x, w, layout, bias=None, act=0, residual=None, ln=None):
    M, K = x.shape
    N = w.shape[1] if layout == 0 else w.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    ln = native.NO_NORM if ln is None else (ln.weight, ln.bias, ln.eps)
    rc = native.call(native.library().gpt2kit_bf16_mm, x, M, K, K, w, N, layout, bias, y, N, act, residual, *ln)
    return rc, y


def within_one_bf16_ulp(got, want):
    """Each value equal to the exactly computed one rounded to bf16, or its neighbour (float32 sums in another
    order can cross a rounding boundary); nearly all equal."""
    want32 = want.float()
    ulp = torch.where(want32 == 0, torch.full_like(want32, 2.0 ** -133),
                      torch.exp2(torch.floor(torch.log2(want32.abs())) - 7))
    diff = (got.float() - want32).abs()
    assert bool((diff <= ulp * 1.001).all()), float((diff / ulp).max())
    assert float((diff == 0).float().mean()) > 0.95


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (2, 96, 50), (3, 37, 19)])
def test_bf16_products_round_as_the_exact_product(layout, M, K, N):
    g = torch.Generator().manual_seed(M * 7 + K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn((K, N) if layout == 0 else (N, K), generator=g) * 0.05).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    rc, y = bf16_kernel(x, w, layout, b)
    ref = (x.double() @ (w.double() if layout == 0 else w.double().t()) + b.double()).bfloat16()
    assert rc == 0
    within_one_bf16_ulp(y, ref)


def test_bf16_prologue_and_epilogue_round_where_the_modules_do():
    """The layer norm's output, the product with its bias and GELU, and the residual sum are each rounded to bf16,
    as a bf16 model's modules round them."""
    g = torch.Generator().manual_seed(5)
    ln = torch.nn.LayerNorm(128).bfloat16()
    with torch.no_grad():
        ln.weight.copy_(torch.rand(128, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(128, generator=g) * 0.1)
    x = (torch.randn(2, 128, generator=g) * 3 + 1).bfloat16()
    res = torch.randn(2, 200, generator=g).bfloat16()
    w, b = (torch.randn(128, 200, generator=g) * 0.1).bfloat16(), torch.randn(200, generator=g).bfloat16()
    rc, y = bf16_kernel(x, w, 0, b, act=1, residual=res, ln=ln)
    with torch.no_grad():
        h = ln(x)  # bf16, rounded as the module rounds it
        p = F.gelu(h.double() @ w.double() + b.double(), approximate="tanh").bfloat16()
        ref = (p.double() + res.double()).bfloat16()
    assert rc == 0
    within_one_bf16_ulp(y, ref)


def test_bf16_decode_takes_it_and_stays_within_bf16_of_forward(tmp_path):
    """A bfloat16 model's batch-1 decode step: every projection in the native kernel (widened weights), the
    logits within a few bf16 ulps of model.forward's."""
    from gpt2kit import GPT2Config, GPT2LMHeadModel, StaticCache

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=500)).eval().bfloat16()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        cache = StaticCache(model.config, 1, 16, dtype=torch.bfloat16)
        model.decode(ids[:, :4], cache)
        step = model.decode(ids[:, 4:], cache)[0, -1]
        assert model.transformer.h[0].attn.c_attn.last_path == linear.NATIVE
        assert model.lm_head.last_path == linear.NATIVE
        ref = model(ids).logits[0, -1].float()
    torch.testing.assert_close(step, ref, rtol=0, atol=4 * 2 ** -8 * ref.abs().max().item())
