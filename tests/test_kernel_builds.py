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
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_4bit_products_switch_to_blas_past_the_builds_row_limit(fmt):
    """The fused 4-bit lookup kernel (tiled at that many rows) runs up to the build's row limit (affine int4:
    INT4_MAX_ROWS, 48 under AVX-512, 24 under AVX2, where the lookup costs more; NF4 / FP4: LUT4_MAX_ROWS, the same,
    or 256 where the AMX kernel runs: measured in quantization/modules.py), decoding into float32 and BLAS past it;
    both match the dequantized weights."""
    import torch

    from gpt2kit.quantization import formats as Q
    from gpt2kit.quantization.modules import INT4_MAX_ROWS, LUT4_MAX_ROWS, Linear4bit, LinearInt4

    lib = native.library()
    if lib is None:
        pytest.skip("no build of the kernels here")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 256, generator=g) * 0.02, torch.randn(48, generator=g) * 0.01
    if fmt == "int4":
        m, limit, fused = LinearInt4(w, b, 32), INT4_MAX_ROWS[lib.isa], "fused-lut4-tiled"
    else:
        m = Linear4bit(Q.quantize_4bit(w, "nf4", 64), b)
        limit = LUT4_MAX_ROWS[lib.isa + "-amx" if lib.amx else lib.isa]
        fused = "fused-lut4-amx" if lib.amx else "fused-lut4-tiled"
    with torch.inference_mode():
        for rows, kernel in ((limit, fused), (limit + 1, "dequantize+mm")):
            x = torch.randn(rows, 256, generator=g)
            y = m(x)
            assert m.last_kernel == kernel, (rows, m.last_kernel)
            want = x.double() @ m.dequantize().double().t() + m.bias.double()
            assert (y.double() - want).abs().max().item() < 1e-5 * want.abs().max().item()
