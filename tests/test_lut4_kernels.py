"""gpt2kit_lut4_mm's NF4 / FP4 kernels (native/quantized.c), once per build this CPU runs: the packed one-row kernel
(codes read as dwords; AVX-512), the row-at-a-time kernel (2-7 rows), the tiled one (8 rows and more: a chunk decoded
once into float32, then multiplied by every row), and where the CPU has AMX the AMX one (32 rows and more: weights
and inputs split into three bf16 parts each, native/amx.h; with a bfloat16 / float16 compute dtype one / two parts, from
8 / 16 rows, held against a float64 emulation of those parts). Each is held against a float64 product with the dequantized weights,
at shapes with a partial last chunk (inputs not a multiple of 128, or of the tile's 512), output and input rows left
over past the tiles, blocks of 32 to 256, and with the layer norm prologue and the GELU + residual epilogue."""
import math

import pytest
import torch

from gpt2kit import native
from gpt2kit.model.linear import decoding
from gpt2kit.quantization import formats as Q
from gpt2kit.quantization.modules import Linear4bit

pytestmark = pytest.mark.usefixtures("native_build")


def _module(N, K, quant_type, blocksize, seed, parts=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    dtype = {3: None, 2: torch.float16, 1: torch.bfloat16}[parts]
    return Linear4bit(Q.quantize_4bit(w, quant_type, blocksize), torch.randn(N, generator=g) * 0.01, dtype), g


def _kernel(rows, N=1, K=1, bs=1, parts=3):
    lib = native.library()
    if lib is None or rows > _module(16, 64, "nf4", 64, 0, parts)[0]._max_rows(lib):  # none here / past its limit: BLAS
        return "dequantize+mm"
    if lib.amx and rows >= lib.amx["lut4"][parts] and N % 16 == 0 and K % 64 == 0 and bs % 64 == 0:  # AMX's shapes
        return "fused-lut4-amx"
    return lib.lut4_one_row if rows == 1 else "fused-lut4" if rows < 8 else "fused-lut4-tiled"


# (out, in, block): 1600 and 320 inputs end in a chunk of 64 (the packed kernel's masked half chunk), 1600 in a partial
# tile chunk; 10 / 13 / 7 output rows leave 2 / 1 / 3 past the groups of four
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 1600, 64), (10, 320, 64), (13, 320, 32), (7, 768, 128), (12, 1024, 256),
                                   (48, 1152, 128)])
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16, 33, 64])
def test_kernel_matches_the_float64_product(quant_type, shape, rows):
    N, K, bs = shape
    m, g = _module(N, K, quant_type, bs, seed=N + K + bs)
    x = torch.randn(rows, K, generator=g) * 3
    x[0, 5] = 40.0  # an outlier, as a layer norm's output has
    want = x.double() @ m.dequantize().double().t() + m.bias.double()
    got = m(x)
    assert m.last_kernel == _kernel(rows, N, K, bs)
    assert (got.double() - want).abs().max().item() / want.abs().max().item() < 2e-6  # measured ~1-5e-7


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_kernel_with_the_layer_norm_prologue_and_epilogue(rows):
    if _kernel(rows) == "dequantize+mm":
        pytest.skip(f"{rows} rows are past this build's fused row limit: BLAS, which has no prologue")
    m, g = _module(3072, 768, "nf4", 64, seed=2)
    norm = torch.nn.LayerNorm(768)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_(0, 0.1)
    x = torch.randn(rows, 1, 768, generator=g) * 4
    res = torch.randn(rows, 1, 3072, generator=g)
    with torch.inference_mode(), decoding(rows, pack=False):
        got = m(x, "gelu_new", residual=res, norm=norm)
        if native.library() is not None:
            assert (m.last_kernel, m.last_prologue, m.last_epilogue) == (_kernel(rows, 3072, 768, 64), "layer_norm",
                                                                                 "gelu+residual")
        h = norm(x).double() @ m.dequantize().double().t() + m.bias.double()
        want = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))) + res.double()
        assert (got.double() - want).abs().max().item() / want.abs().max().item() < 2e-6


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_kernel_propagates_nan_and_inf(rows):
    m, g = _module(16, 320, "nf4", 64, seed=1)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(rows, 320, generator=g)
        x[rows - 1, 17] = bad
        got = m(x)
        assert m.last_kernel == _kernel(rows, 16, 320, 64)
        assert not torch.isfinite(got[rows - 1]).any()
        assert torch.isfinite(got[: rows - 1]).all()  # the other rows are their own


def _parts(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """t's first n bf16 parts (float64), each the nearest bf16 to the float32 remainder of the ones before: amx.h's
    split"""
    out, rest = [], t.float()
    for _ in range(n):
        p = rest.to(torch.bfloat16).float()
        out.append(p.double())
        rest = rest - p
    return out


# a bfloat16 / float16 compute dtype: AMX's one- / two-part products, against float64 sums of exactly those products
# (bf16 x bf16 is exact in float32: what is left is float32 summation), and far from the float32 product for one part
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 1600, 64), (48, 1152, 128), (32, 768, 256)])
@pytest.mark.parametrize("rows", [8, 16, 40, 300])
def test_amx_lower_precision_matches_its_emulation(parts, quant_type, shape, rows):
    lib = native.library()
    if lib is None or not lib.amx:
        pytest.skip("no AMX on this CPU (or GPT2KIT_AMX=0): every compute dtype runs the float32 kernels")
    N, K, bs = shape
    m, g = _module(N, K, quant_type, bs, seed=N + K + parts, parts=parts)
    x = torch.randn(rows, K, generator=g) * 3
    x[0, 5] = 40.0
    got = m(x)
    assert m.last_kernel == _kernel(rows, N, K, bs, parts)
    if m.last_kernel != "fused-lut4-amx":
        return  # fewer rows than this precision's AMX threshold: the float32 kernels (the tests above)
    q = Q.unpack_codes(m.weight).view(N, K).long()
    scale = m.absmax.double().repeat_interleave(bs).view(N, K)
    xs, cs = _parts(x, parts), _parts(m.quant_map, parts)
    want = sum(xs[j] @ (cs[i][q] * scale).t() for i in range(parts) for j in range(parts) if i + j < parts)
    want = want + m.bias.double()
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err < 2e-6
    exact = x.double() @ m.dequantize().double().t() + m.bias.double()
    off = (got.double() - exact).abs().max().item() / exact.abs().max().item()
    assert off < (1e-2 if parts == 1 else 5e-5)  # bf16's precision; bf16x2's, above float16's 2^-11
    if parts == 1:
        assert off > 1e-5  # the precision asked for: not a float32 product


@pytest.mark.parametrize("parts", [1, 2])
def test_batch_invariant_products_are_float32_exact_at_every_row_count(parts):
    """replace.batch_invariant (a server's engine sets it): a bfloat16 / float16 compute dtype no longer runs AMX's
    fewer-part products, so each row's result is the float32 product whatever the rows beside it; the flag drops
    the cached kernel arguments (they hold the part count)."""
    from gpt2kit.quantization.replace import batch_invariant

    m, g = _module(32, 1024, "nf4", 64, seed=parts, parts=parts)
    assert m.amx_parts == parts
    x = torch.randn(40, 1024, generator=g)
    lib = native.library()
    m._kernel_args()  # what a decode step caches
    assert "_kernel" in m.__dict__
    assert batch_invariant(torch.nn.Sequential(m)) == 1
    assert m.amx_parts == 3 and "_kernel" not in m.__dict__
    got = m(x)
    exact = x.double() @ m.dequantize().double().t() + m.bias.double()
    assert (got.double() - exact).abs().max().item() < 2e-6 * exact.abs().max().item()
    if lib is not None and lib.amx:  # 40 rows: AMX at three parts, float32-exact
        assert m.last_kernel == _kernel(40, 32, 1024, 64, 3)
        one = m(x[:1])  # a row alone: the one-row kernel, within float32 rounding of its row in the batch
        assert (one.double() - got[:1].double()).abs().max().item() < 2e-6 * exact.abs().max().item()
