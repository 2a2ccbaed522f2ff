"""topk_encode against a float64 dense truth: selection, values and all four gradients."""
import zlib

import pytest
import torch
from kernel_truth import TOL, f64, leaf, pre_activations, rel

from sae.core.kernels import topk_encode

# (B, d, n, k, groups, b_dec, chunk, hot): sizes off the block multiples; k = 1 and k = n; per-group
# top-k; chunk forces several column chunks and the merge kernel; hot = a few latents with a large
# bias so every token picks them (long latent segments in the backward).
CASES = {
    "odd-sizes": (37, 50, 300, 7, 1, True, None, False),
    "k=1": (20, 24, 70, 1, 1, True, None, False),
    "k=n": (9, 16, 40, 40, 1, True, None, False),
    "merge": (33, 40, 300, 6, 1, False, 64, False),
    "groups": (21, 32, 96, 5, 3, True, 16, False),
    "hot-latents": (64, 32, 128, 4, 1, True, None, True),
}


def _inputs(case, dtype, seed, dev):
    B, d, n, k, groups, with_bdec, chunk, hot = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W = torch.randn(d, n, generator=g) / d**0.5
    b = 0.3 * torch.randn(n, generator=g)
    if hot:
        b[[3, 50, 77]] = 20.0
    bd = 0.3 * torch.randn(d, generator=g) if with_bdec else None
    return leaf(x, dtype, dev), leaf(W, dtype, dev), leaf(b, dtype, dev), None if bd is None else leaf(bd, dtype, dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_topk_encode_matches_float64(backend, dev, dtype, name):
    case = CASES[name]
    B, d, n, k, groups, _, chunk, _ = case
    x, W, b, bd = _inputs(case, dtype, zlib.crc32(name.encode()), dev)
    values, indices = topk_encode(x, W, b, k, bd, groups=groups, _chunk=chunk)
    indices = indices.cpu()

    assert values.shape == indices.shape == (B, groups * k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    x64, W64, b64, bd64 = f64(x, W, b, bd)
    pre = pre_activations(x64, W64, b64, bd64)
    n_g = n // groups
    for g in range(groups):
        idx = indices[:, g * k:(g + 1) * k]
        assert ((idx >= g * n_g) & (idx < (g + 1) * n_g)).all(), "index outside its group"
        assert (idx.sort(1).values.diff(dim=1) > 0).all(), "repeated latent in a row"
        # A valid top-k: the chosen pre-activations are the k largest (compared as sorted values,
        # so a near-tie resolved the other way still passes).
        chosen = pre.gather(1, idx).sort(1, descending=True).values
        best = pre[:, g * n_g:(g + 1) * n_g].topk(k, dim=1).values
        assert rel(chosen, best) < TOL[dtype], f"group {g} did not select a top-k"
    truth_values = pre.gather(1, indices).relu()
    assert rel(values, truth_values) < TOL[dtype]
    assert (values >= 0).all()

    G = torch.randn(values.shape, generator=torch.Generator().manual_seed(1))
    (values.float() * G.to(dev)).sum().backward()
    (truth_values * G.double()).sum().backward()
    for name_, got, want in [("x", x, x64), ("W_enc", W, W64), ("b_enc", b, b64), ("b_dec", bd, bd64)]:
        if got is None:
            continue
        assert got.grad.dtype == dtype and got.grad.shape == got.shape
        assert rel(got.grad, want.grad) < TOL[dtype], f"d{name_}"


def test_negative_preactivations_give_zero_values_and_no_gradient(backend, dev):
    """All pre-activations negative: values are exactly 0 and nothing flows back."""
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(12, 16, generator=g), torch.float32, dev)
    W = leaf(torch.randn(16, 48, generator=g) / 4, torch.float32, dev)
    b = leaf(torch.full((48,), -50.0), torch.float32, dev)
    values, indices = topk_encode(x, W, b, 5)
    assert (values == 0).all()
    values.sum().backward()
    assert (x.grad == 0).all() and (W.grad == 0).all() and (b.grad == 0).all()


def test_zero_batch(backend, dev):
    x = torch.zeros(0, 16, device=dev)
    values, indices = topk_encode(x, torch.randn(16, 32, device=dev), torch.zeros(32, device=dev), 4)
    assert values.shape == indices.shape == (0, 4)


def test_inference_without_grad(backend, dev):
    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(8, 16, generator=g), torch.randn(16, 64, generator=g), torch.randn(64, generator=g)
    with torch.no_grad():
        values, indices = topk_encode(x.to(dev), W.to(dev), b.to(dev), 4)
    pre = pre_activations(x.double(), W.double(), b.double())
    assert rel(values, pre.gather(1, indices.cpu()).relu()) < TOL[torch.float32]
    assert not values.requires_grad


def test_non_contiguous_weights(backend, dev):
    """W_enc stored (n, d)-major (a transposed view), as recommended on the GPU."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 24, generator=g)
    W = leaf(torch.randn(80, 24, generator=g) / 5, torch.float32, dev).detach().t().requires_grad_()  # strides (1, 24)
    b = torch.zeros(80, device=dev, requires_grad=True)
    values, indices = topk_encode(x.to(dev), W, b, 3)
    values.sum().backward()
    W64, b64 = f64(W, b)
    pre = pre_activations(x.double(), W64, b64)
    pre.gather(1, indices.cpu()).relu().sum().backward()
    assert rel(W.grad, W64.grad) < TOL[torch.float32]


def test_autocast_rounds_operands_in_kernel(backend, dev):
    """The GPU training path: fp32 master weights under bf16 autocast. The GEMM operands are rounded
    to bf16 (in-kernel for Triton), products accumulate in fp32, values come back in bf16."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 40, generator=g)
    W = leaf(torch.randn(40, 200, generator=g) / 6, torch.float32, dev)
    b = leaf(0.1 * torch.randn(200, generator=g), torch.float32, dev)
    bd = leaf(0.1 * torch.randn(40, generator=g), torch.float32, dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        values, indices = topk_encode(x.to(dev), W, b, 6, bd)
    assert values.dtype == torch.bfloat16
    indices = indices.cpu()
    W64, b64, bd64 = f64(W, b, bd)
    # truth on the rounded operands, as the tensor cores see them
    xr = (x - bd.detach().cpu()).to(torch.bfloat16).double()
    pre = xr @ W64.to(torch.bfloat16).double() + b64
    chosen = pre.gather(1, indices).sort(1, descending=True).values
    # Triton selects on the fp32 accumulator; the reference on bf16-rounded pre-activations (near-ties)
    assert rel(chosen, pre.topk(6, dim=1).values) < (1e-6 if backend == "triton" else TOL[torch.bfloat16])
    assert rel(values, pre.gather(1, indices).relu()) < TOL[torch.bfloat16]
    values.float().sum().backward()
    pre64 = pre_activations(x.double(), W64, b64, bd64)
    pre64.gather(1, indices).relu().mul(values.detach().cpu() > 0).sum().backward()
    assert rel(W.grad, W64.grad) < TOL[torch.bfloat16] and rel(bd.grad, bd64.grad) < TOL[torch.bfloat16]
