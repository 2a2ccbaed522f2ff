"""Whole SAE forward/backward passes through the kernels, as the architectures will call them:
TopK, binding (TopK over all slots and per-slot), BatchTopK and AuxK, against float64 truths."""
import pytest
import torch
from kernel_truth import TOL, binding_x_hat, dense_codes, f64, leaf, pre_activations, rel

from sae.core.kernels import auxk_reconstruct, batch_topk_encode, binding_decode, sparse_decode, topk_encode
from sae.core.kernels.pairs import CACHE


def _sae(B, d, n, seed, dev, scale_rows=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    if scale_rows is not None:
        x[scale_rows] *= 8.0
    W_enc = leaf(torch.randn(d, n, generator=g) / d**0.5, torch.float32, dev)
    b_enc = leaf(0.1 * torch.randn(n, generator=g), torch.float32, dev)
    b_dec = leaf(0.1 * torch.randn(d, generator=g), torch.float32, dev)
    return g, x.to(dev), W_enc, b_enc, b_dec


def _param(t, dev):
    return leaf(t, torch.float32, dev)


def test_topk_sae_step(backend, dev):
    B, d, n, k = 40, 24, 160, 5
    g, x, W_enc, b_enc, b_dec = _sae(B, d, n, 0, dev)
    W_dec = _param(torch.randn(n, d, generator=g), dev)
    values, indices = topk_encode(x, W_enc, b_enc, k, b_dec)
    x_hat = sparse_decode(values, indices, W_dec) + b_dec
    (x_hat - x).pow(2).sum().backward()
    if backend == "triton":
        assert len(CACHE.entries) == 1, "decoder and encoder backward should share one sort"

    leaves = f64(W_enc, b_enc, b_dec, W_dec)
    We, be, bd, Wd = leaves
    x64, indices = x.cpu().double(), indices.cpu()
    vals = pre_activations(x64, We, be, bd).gather(1, indices).relu()
    truth = dense_codes(vals, indices, n) @ Wd + bd
    assert rel(x_hat, truth) < TOL[torch.float32]
    (truth - x64).pow(2).sum().backward()
    for got, want in zip((W_enc, b_enc, b_dec, W_dec), leaves):
        assert rel(got.grad, want.grad) < TOL[torch.float32]


@pytest.mark.parametrize("per_slot", [False, True], ids=["topk-all-slots", "topk-per-slot"])
def test_binding_sae_step(backend, dev, per_slot):
    B, d, n, S, k = 32, 20, 48, 2, 3
    g, x, W_enc, b_enc, b_dec = _sae(B, d, S * n, 1, dev)
    D = _param(torch.randn(n, d, generator=g), dev)
    M = _param(torch.randn(S - 1, d, d, generator=g) / d**0.5, dev)
    if per_slot:
        values, indices = topk_encode(x, W_enc, b_enc, k, b_dec, groups=S)
        assert ((indices[:, :k] < n) & (indices[:, k:] >= n)).all()
    else:
        values, indices = topk_encode(x, W_enc, b_enc, k, b_dec)
    x_hat = binding_decode(values, indices, D, M) + b_dec
    (x_hat - x).pow(2).sum().backward()
    if backend == "triton":
        # The encoder backward reused the decoder's (atom, slot) sort.
        assert len(CACHE.entries) == 1 and CACHE.entries[0][3] == S

    leaves = f64(W_enc, b_enc, b_dec, D, M)
    We, be, bd, D64, M64 = leaves
    x64, indices = x.cpu().double(), indices.cpu()
    vals = pre_activations(x64, We, be, bd).gather(1, indices).relu()
    truth = binding_x_hat(vals, indices, D64, M64) + bd
    assert rel(x_hat, truth) < TOL[torch.float32]
    (truth - x64).pow(2).sum().backward()
    for got, want in zip((W_enc, b_enc, b_dec, D, M), leaves):
        assert rel(got.grad, want.grad) < TOL[torch.float32]


@pytest.mark.parametrize("cap", [None, 4], ids=["default-cap", "cap-grows"])
def test_batch_topk(backend, dev, cap):
    """The B*k largest relu pre-activations of the batch, whatever their rows. Rows 0 and 1 are
    scaled up so they hold far more than k of them (with cap=4 the first try overflows)."""
    B, d, n, k = 24, 16, 96, 4
    g, x, W_enc, b_enc, b_dec = _sae(B, d, n, 2, dev, scale_rows=[0, 1])
    values, indices = batch_topk_encode(x, W_enc, b_enc, k, b_dec, cap=cap)
    We, be, bd = f64(W_enc, b_enc, b_dec)
    acts = pre_activations(x.cpu().double(), We, be, bd).relu()
    top = acts.flatten().topk(B * k)
    truth = torch.zeros_like(acts.flatten()).scatter(0, top.indices, top.values).view(B, n)
    got = dense_codes(values.double(), indices, n)
    assert rel(got, truth) < TOL[torch.float32]
    assert (got[:2] > 0).sum(1).min() > k, "the scaled rows should hold more than k latents"
    G = torch.randn(B, n, generator=g, dtype=torch.float64)
    (values.double() * G.to(dev).gather(1, indices)).sum().backward()
    (truth * G).sum().backward()
    assert rel(W_enc.grad, We.grad) < TOL[torch.float32] and rel(b_dec.grad, bd.grad) < TOL[torch.float32]


@pytest.mark.parametrize("n_dead,k_aux", [(30, 6), (4, 10), (0, 5)], ids=["some-dead", "k_aux>n_dead", "none-dead"])
def test_auxk_reconstruct(backend, dev, n_dead, k_aux):
    B, d, n = 20, 16, 64
    g, x, W_enc, b_enc, b_dec = _sae(B, d, n, 3, dev)
    W_dec = _param(torch.randn(n, d, generator=g), dev)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n, generator=g)[:n_dead]] = True
    dead_ids = dead.nonzero().squeeze(1).to(dev)
    aux = auxk_reconstruct(x, W_enc, b_enc, k_aux, dead_ids, W_dec[dead_ids], b_dec)
    assert aux.shape == (B, d)
    if n_dead == 0:
        assert (aux == 0).all()
        return
    leaves = f64(W_enc, b_enc, b_dec, W_dec)
    We, be, bd, Wd = leaves
    pre = pre_activations(x.cpu().double(), We, be, bd).masked_fill(~dead, float("-inf"))
    top = pre.topk(min(k_aux, n_dead), dim=1)
    truth = dense_codes(top.values.relu(), top.indices, n) @ Wd
    assert rel(aux, truth) < TOL[torch.float32]
    G = torch.randn(B, d, generator=g)
    (aux * G.to(dev)).sum().backward()
    (truth * G.double()).sum().backward()
    for got, want in zip((W_enc, b_enc, b_dec, W_dec), leaves):
        assert rel(got.grad, want.grad) < TOL[torch.float32]
    assert (W_dec.grad.cpu()[~dead] == 0).all(), "AuxK must only train dead latents"


def test_backward_is_deterministic(backend, dev):
    """Two identical steps give bitwise-identical gradients (no atomics, stable sort)."""
    B, d, n, k = 32, 16, 64, 4
    results = []
    for _ in range(2):
        CACHE.clear()
        g, x, W_enc, b_enc, b_dec = _sae(B, d, n, 4, dev)
        W_dec = _param(torch.randn(n, d, generator=g), dev)
        values, indices = topk_encode(x, W_enc, b_enc, k, b_dec)
        (sparse_decode(values, indices, W_dec) + b_dec - x).pow(2).sum().backward()
        results.append([t.grad.clone() for t in (W_enc, b_enc, b_dec, W_dec)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
