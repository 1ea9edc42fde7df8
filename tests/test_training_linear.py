"""The float32 CPU training path of a projection (oneDNN forward and backward) against autograd through addmm,
and the fused LM-head loss in bfloat16 against the plain computation."""
import pytest
import torch
import torch.nn.functional as F

from gpt2kit.model import linear
from gpt2kit.model.linear import Projection
from gpt2kit.model.onednn import linear_available as onednn_linear_available
from gpt2kit.training import loss as loss_mod

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,d_in,d_out", [(7, 16, 48), (300, 64, 96)])
def test_training_linear_matches_addmm_and_its_gradients(rows, d_in, d_out, bias):
    torch.manual_seed(0)
    proj = Projection(d_in, d_out, bias=bias)
    with torch.no_grad():
        proj.weight.normal_()  # [in, out], GPT-2's layout
        if bias:
            proj.bias.normal_()
    x = torch.randn(rows, d_in, requires_grad=True)
    g = torch.randn(rows, d_out)
    y = proj(x)
    assert proj.last_path == linear.TRAIN  # the oneDNN training path really ran
    y.backward(g)
    params = [x, proj.weight] + ([proj.bias] if bias else [])
    ours = [y.detach()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    y_ref = torch.addmm(proj.bias, x, proj.weight) if bias else x @ proj.weight
    y_ref.backward(g)
    ref = [y_ref.detach()] + [p.grad for p in params]
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6 * rows)  # sums of `rows` products, another order


def test_training_linear_is_used_only_where_it_applies():
    proj = Projection(8, 3)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        proj(x)
        assert proj.last_path == linear.ADDMM  # inference keeps addmm (bit for bit the reference's)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proj(x)
        assert proj.last_path == linear.ADDMM  # autocast's own bf16 products
    proj(x)
    assert proj.last_path == linear.TRAIN


@pytest.mark.parametrize("limit", [None, 0])  # one weight-gradient GEMM at the end / one per chunk
def test_fused_loss_in_bfloat16_matches_the_plain_computation(monkeypatch, limit):
    if limit is not None:
        monkeypatch.setattr(loss_mod, "G_BUFFER_LIMIT_BYTES", limit)
    monkeypatch.setattr(loss_mod, "GRAD_W_SLAB", 100)  # 301 vocabulary rows: three whole slabs and a partial one
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = (0.5 * torch.randn(301, 32)).requires_grad_()
    t = torch.randint(0, 301, (40,))
    t[[3, 17]] = -100
    ours = loss_mod.linear_cross_entropy(h, w, t, chunk=16, compute_dtype=torch.bfloat16)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = (h.bfloat16() @ w.bfloat16().t()).float()
    ref = F.cross_entropy(logits, t, ignore_index=-100)
    ref.backward()
    assert gw.dtype == torch.float32 and gh.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    # bf16 products: compare at bf16's resolution, relative to the gradients' scale
    assert (gh - h.grad).abs().max() <= 2e-2 * h.grad.abs().max()
    assert (gw - w.grad).abs().max() <= 2e-2 * w.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_workspace_survives_two_forwards_before_backward(dtype):
    """A reused workspace holds only scratch: summing two losses made with it, then one backward, gives the
    gradients of the plain computation (nothing saved for backward is overwritten by the second forward)."""
    torch.manual_seed(1)
    w = (0.5 * torch.randn(97, 16)).requires_grad_()
    hs = [torch.randn(12, 16, requires_grad=True) for _ in range(2)]
    ts = [torch.randint(0, 97, (12,)) for _ in range(2)]
    ws = loss_mod.Workspace()
    total = sum(loss_mod.linear_cross_entropy(h, w, t, chunk=5, compute_dtype=dtype, workspace=ws) for h, t in zip(hs, ts))
    total.backward()
    ours = [w.grad.clone()] + [h.grad.clone() for h in hs]
    for p in [w] + hs:
        p.grad = None
    ref = sum(F.cross_entropy((h.to(dtype) @ w.to(dtype).t()).float(), t) for h, t in zip(hs, ts))
    ref.backward()
    for a, r in zip(ours, [w.grad] + [h.grad for h in hs]):
        assert (a - r).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * r.abs().max()


def test_fused_loss_backward_twice_and_scaled():
    """retain_graph=True then a second backward doubles the gradients; a scaled loss scales them (the mean's
    gradients are stored pre-divided and handed out as they are only for a plain loss.backward())."""
    torch.manual_seed(0)
    w = torch.randn(50, 8, requires_grad=True)
    ids, t = torch.randint(0, 50, (12,)), torch.randint(0, 50, (12,))

    def loss():  # tied: the same weight embeds the inputs and scores the outputs
        return loss_mod.linear_cross_entropy(F.embedding(ids, w) * 1.5, w, t)

    ref_loss = F.cross_entropy((F.embedding(ids, w) * 1.5) @ w.t(), t)
    (g_ref,) = torch.autograd.grad(ref_loss, w)
    first = loss()
    first.backward(retain_graph=True)
    torch.testing.assert_close(w.grad, g_ref)
    first.backward()
    torch.testing.assert_close(w.grad, 2 * g_ref)
    w.grad = None
    (3 * loss()).backward()
    torch.testing.assert_close(w.grad, 3 * g_ref)
