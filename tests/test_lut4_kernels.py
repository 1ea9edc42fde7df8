"""gpt2kit_lut4_mm's NF4 / FP4 kernels (native/quantized.c), once per build this CPU runs: the packed one-row kernel
(codes read as dwords; AVX-512), the row-at-a-time kernel (2-7 rows), the tiled one (8 rows and more: a chunk decoded
once into float32, then multiplied by every row), and where the CPU has AMX the AMX one (32 rows and more: weights
and inputs split into three bf16 parts each, native/amx.h). Each is held against a float64 product with the dequantized weights,
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


def _module(N, K, quant_type, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    return Linear4bit(Q.quantize_4bit(w, quant_type, blocksize), torch.randn(N, generator=g) * 0.01), g


def _kernel(rows, N=1, K=1, bs=1):
    lib = native.library()
    if lib is None or rows > Linear4bit._max_rows(Linear4bit, lib):  # no build here / past its row limit: BLAS
        return "dequantize+mm"
    if lib.amx and rows >= lib.amx["lut4"] and N % 16 == 0 and K % 64 == 0 and bs % 64 == 0:  # AMX's shapes
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
