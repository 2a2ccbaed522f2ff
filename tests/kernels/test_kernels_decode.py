"""sparse_decode and binding_decode against float64 dense truths, forward and gradients."""
import zlib

import pytest
import torch
from kernel_truth import TOL, binding_x_hat, dense_codes, f64, leaf, rel

from sae.core.kernels import binding_decode, sparse_decode

# (B, k, n, d, index pattern): sizes off the block multiples, k = 1, a wide k (several gather steps),
# repeated latents within and across rows, and a hot set of 3 latents that every token uses.
DECODE_CASES = {
    "odd-sizes": (29, 7, 53, 50, "random"),
    "k=1": (17, 1, 40, 24, "random"),
    "wide-k": (6, 300, 64, 16, "random"),
    "hot": (40, 6, 90, 32, "hot"),
}


def _codes(B, k, n, pattern, g):
    if pattern == "hot":
        indices = torch.randint(0, 3, (B, k), generator=g)
    else:
        indices = torch.randint(0, n, (B, k), generator=g)
    values = torch.randn(B, k, generator=g)
    values[torch.rand(B, k, generator=g) < 0.25] = 0.0  # zeros and negatives both occur
    return values, indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_sparse_decode_matches_float64(backend, dev, dtype, name):
    B, k, n, d, pattern = DECODE_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values, indices = _codes(B, k, n, pattern, g)
    values, W = leaf(values, dtype, dev), leaf(torch.randn(n, d, generator=g), dtype, dev)
    out = sparse_decode(values, indices.to(dev), W)
    assert out.shape == (B, d) and out.dtype == dtype
    v64, W64 = f64(values, W)
    truth = dense_codes(v64, indices, n) @ W64
    assert rel(out, truth) < TOL[dtype]

    G = torch.randn(B, d, generator=g)
    (out.float() * G.to(dev)).sum().backward()
    (truth * G.double()).sum().backward()
    assert values.grad.dtype == dtype and W.grad.dtype == dtype
    assert rel(values.grad, v64.grad) < TOL[dtype], "d values"
    assert rel(W.grad, W64.grad) < TOL[dtype], "d W_dec"


def test_sparse_decode_int32_indices_and_strided_weights(backend, dev):
    g = torch.Generator().manual_seed(5)
    values = leaf(torch.randn(10, 4, generator=g), torch.float32, dev)
    indices = torch.randint(0, 30, (10, 4), generator=g).to(torch.int32)
    W = torch.randn(16, 30, generator=g).to(dev).t().requires_grad_()  # (30, 16) with strides (1, 30)
    out = sparse_decode(values, indices.to(dev), W)
    v64, W64 = f64(values, W)
    truth = dense_codes(v64, indices, 30) @ W64
    assert rel(out, truth) < TOL[torch.float32]
    out.pow(2).sum().backward()
    truth.pow(2).sum().backward()
    assert rel(W.grad, W64.grad) < TOL[torch.float32] and rel(values.grad, v64.grad) < TOL[torch.float32]


def test_sparse_decode_gradient_to_one_input_only(backend, dev):
    """Frozen dictionary (only d values) and frozen values (only dW_dec)."""
    g = torch.Generator().manual_seed(6)
    values, W = torch.randn(8, 3, generator=g).to(dev), torch.randn(20, 12, generator=g).to(dev)
    indices = torch.randint(0, 20, (8, 3), generator=g).to(dev)
    v64, W64 = f64(values, W)
    truth = dense_codes(v64, indices, 20) @ W64
    truth.sum().backward()
    v = values.clone().requires_grad_()
    sparse_decode(v, indices, W).sum().backward()
    assert rel(v.grad, v64.grad) < TOL[torch.float32]
    Wl = W.clone().requires_grad_()
    sparse_decode(values, indices, Wl).sum().backward()
    assert rel(Wl.grad, W64.grad) < TOL[torch.float32]


# (B, k, n atoms, d, S)
BINDING_CASES = {"two-slots": (23, 5, 29, 24, 2), "three-slots": (16, 9, 20, 40, 3), "one-slot": (12, 4, 25, 16, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BINDING_CASES))
def test_binding_decode_matches_float64(backend, dev, dtype, name):
    B, k, n, d, S = BINDING_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values, indices = _codes(B, k, n * S, "random", g)
    indices[0, :2] = torch.tensor([0, (S - 1) * n])  # the same atom in the first and the last slot
    values = leaf(values, dtype, dev)
    D = leaf(torch.randn(n, d, generator=g), dtype, dev)
    M = leaf(torch.randn(S - 1, d, d, generator=g) / d**0.5, dtype, dev)
    out = binding_decode(values, indices.to(dev), D, M)
    assert out.shape == (B, d)
    v64, D64, M64 = f64(values, D, M)
    truth = binding_x_hat(v64, indices, D64, M64)
    assert rel(out, truth) < TOL[dtype]

    G = torch.randn(B, d, generator=g)
    (out.float() * G.to(dev)).sum().backward()
    (truth * G.double()).sum().backward()
    assert rel(values.grad, v64.grad) < TOL[dtype], "d values"
    assert rel(D.grad, D64.grad) < TOL[dtype], "d dictionary"
    if S > 1:
        assert rel(M.grad, M64.grad) < TOL[dtype], "d transforms"


def test_plain_decode_does_not_reuse_a_binding_sort(backend, dev):
    """The binding backward caches a sort of these indices keyed (atom, slot); a plain decode of the
    same indices afterwards needs segments per latent and must not take it."""
    n, S, d = 12, 2, 16
    g = torch.Generator().manual_seed(8)
    values, indices = _codes(10, 5, n * S, "random", g)
    values, indices = values.to(dev), indices.to(dev)
    D, M = torch.randn(n, d, generator=g).to(dev).requires_grad_(), torch.randn(S - 1, d, d, generator=g).to(dev)
    binding_decode(values, indices, D, M).sum().backward()
    W = leaf(torch.randn(n * S, d, generator=g), torch.float32, dev)
    v = values.clone().requires_grad_()
    G = torch.randn(10, d, generator=g)
    (sparse_decode(v, indices, W) * G.to(dev)).sum().backward()
    v64, W64 = f64(values, W)
    (dense_codes(v64, indices, n * S) @ W64 * G.double()).sum().backward()
    assert rel(W.grad, W64.grad) < TOL[torch.float32] and rel(v.grad, v64.grad) < TOL[torch.float32]
