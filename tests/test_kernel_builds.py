"""Choosing a build of gpt2kit's kernels (native/__init__.py): the best one the CPU runs, or the one
GPT2KIT_NATIVE_ISA names; a wrong name or a build this CPU cannot run is a user error that says what to do."""
import pytest

from gpt2kit import native
from gpt2kit.errors import InvalidInputError


def test_an_unknown_build_name_is_refused_with_the_names(monkeypatch):
    monkeypatch.setenv("GPT2KIT_NATIVE_ISA", "avx1024")
    with pytest.raises(InvalidInputError, match="avx1024.*avx512, avx2"):
        native.chosen_isa.__wrapped__()  # uncached: the process's own choice stays as it is


def test_a_build_this_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(native, "runnable_isas", lambda: ["avx2"])  # as on an AVX2-only CPU
    with pytest.raises(InvalidInputError, match="cannot run gpt2kit's 'avx512' kernels.*runs: avx2.*GPT2KIT_NATIVE_ISA"):
        native.load.__wrapped__("avx512")


def test_the_default_is_the_best_build_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("GPT2KIT_NATIVE_ISA", raising=False)
    monkeypatch.delenv("GPT2KIT_NATIVE_KERNELS", raising=False)
    runnable = native.runnable_isas()
    assert native.chosen_isa.__wrapped__() == (runnable[0] if runnable else None)
    monkeypatch.setenv("GPT2KIT_NATIVE_KERNELS", "0")
    assert native.chosen_isa.__wrapped__() is None


@pytest.mark.skipif(not native.runnable_isas(), reason="this CPU runs neither build")
def test_each_build_names_itself_and_its_integer_int4_kernel():
    for isa in native.runnable_isas():
        lib = native.load(isa)
        if lib is None:
            pytest.skip("no C compiler")
        assert lib.isa == isa
        assert lib.int4_integer in (("fused-int4-vnni", None) if isa == "avx512" else ("fused-int4-avx2",))


@pytest.mark.usefixtures("native_build")
@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_quantized_products_switch_to_blas_past_the_builds_row_limit(fmt):
    """The fused kernels (tiled at that many rows) run up to the build's row limit (measured in
    quantization/modules.py: affine int4 INT4_MAX_ROWS, 48 under AVX-512, 32 under AVX2; NF4 / FP4 LUT4_MAX_ROWS,
    48 / 48, or 256 where the AMX kernel runs; int8 INT8_MAX_ROWS, 256 / 64, none where AMX runs), decoding into
    float32 and BLAS past it, one block of output rows at a time (never the whole matrix again for each block), or
    for int8 where bf16 products are native PyTorch's packed int8 kernel (bf16 activations); all match the
    dequantized weights."""
    import torch

    from gpt2kit.model import onednn
    from gpt2kit.quantization import formats as Q
    from gpt2kit.quantization import modules as qm

    lib = native.library()
    if lib is None:
        pytest.skip("no build of the kernels here")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 256, generator=g) * 0.02, torch.randn(48, generator=g) * 0.01
    tol = 1e-5
    if fmt == "int4":
        m, limit, fused = qm.LinearInt4(w, b, 32), qm.INT4_MAX_ROWS[lib.isa], "fused-lut4-tiled"
    elif fmt == "nf4":
        m = qm.Linear4bit(Q.quantize_4bit(w, "nf4", 64), b)
        limit = qm.LUT4_MAX_ROWS[lib.isa + "-amx" if lib.amx else lib.isa]
        fused = "fused-lut4-amx" if lib.amx else "fused-lut4-tiled"
    else:
        m = qm.Linear8bit(*Q.quantize_int8_rowwise(w), b)
        if lib.amx:
            pytest.skip("where AMX runs the int8 kernel takes any number of rows")
        limit, fused = qm.INT8_MAX_ROWS[lib.isa], "fused-int8-tiled"
    past = "dequantize+mm"
    if fmt == "int8" and onednn.bf16_available():
        past, tol = "aten-int8pack", 1e-2  # bf16 activations
    m.dequantize = None  # past the limit the rows are decoded a block at a time, not from the whole matrix
    with torch.inference_mode():
        for rows, kernel in ((limit, fused), (limit + 1, past)):
            x = torch.randn(rows, 256, generator=g)
            y = m(x)
            assert m.last_kernel == kernel, (rows, m.last_kernel)
            want = x.double() @ type(m).dequantize(m).double().t() + m.bias.double()
            assert (y.double() - want).abs().max().item() < tol * want.abs().max().item()
