"""The integer int4 kernels (native/quantized.c, one input row: AVX512-VNNI's in the avx512 build of a CPU with VNNI,
AVX2's in the avx2 build): x split into three 7-bit pieces, codes multiplied by vpdpbusd / vpmaddubsw. Held against a
float64 product with the dequantized weights, and against the float kernel (GPT2KIT_VNNI=0) on the same module, once
per build this CPU runs."""
import math

import pytest
import torch

from gpt2kit import native
from gpt2kit.model.linear import decoding
from gpt2kit.quantization.modules import LinearInt4

pytestmark = pytest.mark.usefixtures("native_build")


@pytest.fixture(autouse=True)
def integer_kernel(native_build):
    """The name of the integer kernel this build has (skips where it has none: the avx512 build without VNNI)."""
    lib = native.library()
    if lib is None or lib.int4_integer is None:
        pytest.skip(f"the {native_build} build has no integer int4 kernel here")
    return lib.int4_integer


def _module(out_features, in_features, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    return LinearInt4(w, torch.randn(out_features, generator=g) * 0.01, group_size), g


def _float_kernel(monkeypatch, m, *args, **kwargs):
    monkeypatch.setenv("GPT2KIT_VNNI", "0")
    try:
        y = m(*args, **kwargs)
        assert m.last_kernel == "fused-lut4"
        return y
    finally:
        monkeypatch.delenv("GPT2KIT_VNNI")


# (out, in, group): GPT-2 small's and XL's shapes (1600 / 2 bytes: a masked last chunk of 64 bytes under VNNI), rows
# left over past the groups of four, groups of 64 and 128, 288 / 2 bytes (a partial last chunk of 32 under AVX2)
@pytest.mark.parametrize("shape", [(2304, 768, 32), (768, 3072, 32), (4802, 1600, 32), (10, 256, 64), (7, 512, 128),
                                   (9, 288, 32)])
def test_integer_kernel_matches_the_float64_product(monkeypatch, shape, integer_kernel):
    N, K, gs = shape
    m, g = _module(N, K, gs, seed=N + K)
    x = torch.randn(1, K, generator=g) * 3
    x[0, 5] = 40.0  # an outlier, as a layer norm's output has: the pieces are relative to max |x|
    want = x.double() @ m.dequantize().double().t() + m.bias.double()
    got = m(x)
    assert m.last_kernel == integer_kernel
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item() / scale
    assert err < 2e-5, err  # measured 2-4e-6 (the float kernel: ~2e-7)
    flt = _float_kernel(monkeypatch, m, x)
    assert (flt.double() - want).abs().max().item() / scale < 1e-6


def test_integer_kernel_propagates_nan_and_inf(monkeypatch):
    m, g = _module(64, 256, 32, seed=1)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 256, generator=g)
        x[0, 17] = bad
        got = m(x)
        assert m.last_kernel == "fused-lut4"  # the integer split refuses it; the float kernel propagates it
        assert not torch.isfinite(got).all()


def test_integer_kernel_with_the_layer_norm_prologue_and_epilogue(monkeypatch, integer_kernel):
    m, g = _module(3072, 768, 32, seed=2)
    norm = torch.nn.LayerNorm(768)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_(0, 0.1)
    x = torch.randn(1, 1, 768, generator=g) * 4
    res = torch.randn(1, 1, 3072, generator=g)
    with torch.inference_mode(), decoding(1, pack=False):
        got = m(x, "gelu_new", residual=res, norm=norm)
        assert (m.last_kernel, m.last_prologue, m.last_epilogue) == (integer_kernel, "layer_norm", "gelu+residual")
        h = norm(x).double() @ m.dequantize().double().t() + m.bias.double()
        want = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))) + res.double()
        assert (got.double() - want).abs().max().item() / want.abs().max().item() < 2e-5
        flt = _float_kernel(monkeypatch, m, x, "gelu_new", residual=res, norm=norm)
        assert (flt - got).abs().max().item() / want.abs().max().item() < 2e-5


def test_the_decode_call_follows_replaced_tensors_and_refuses_a_wrong_shape():
    """The lean decode path caches the kernel's addresses: a buffer replaced by assignment, a weight's storage
    swapped, or a move must not leave it reading the old memory; a wrong input size is an error, not a read past
    the tensor."""
    from gpt2kit.errors import InvalidInputError

    m, g = _module(64, 256, 32, seed=3)
    x = torch.randn(1, 256, generator=g)
    with torch.inference_mode(), decoding(1, pack=False):
        y0 = m(x)
        assert m.last_call == "lean"
        m.scales = m.scales * 2  # nn.Module.__setattr__ puts it in _buffers: the cached address is stale
        y1 = m(x)
        assert m.last_call == "lean"
        want = x.double() @ m.dequantize().double().t() + m.bias.double()
        assert (y1.double() - want).abs().max().item() < 2e-5 * want.abs().max().item()
        assert not torch.allclose(y0, y1)
        codes = m.weight.clone()
        m.weight.data = torch.zeros_like(codes)  # the storage swapped under the same tensor
        y2 = m(x)
        assert m.last_call == "lean"
        want = x.double() @ m.dequantize().double().t() + m.bias.double()
        assert (y2.double() - want).abs().max().item() < 2e-5 * want.abs().max().item()
        with pytest.raises(InvalidInputError, match="256 features"):
            m(torch.randn(1, 255))
