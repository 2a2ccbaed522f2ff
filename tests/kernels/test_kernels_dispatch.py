"""Dispatch, input checks and the pair sort: one clear error for bad input, before any kernel runs
(an out-of-bounds access in the interpreter kills the process instead of raising)."""
import os
import subprocess
import sys

import pytest
import torch

from sae.core.kernels import backend, binding_decode, sparse_decode, topk_encode
from sae.core.kernels.pairs import CACHE, sort_pairs


def test_backend_default_and_forced(monkeypatch):
    monkeypatch.delenv("SAE_KERNELS", raising=False)
    assert backend(torch.zeros(1)) == "torch"  # CPU tensors take the reference by default
    monkeypatch.setenv("SAE_KERNELS", "triton")
    assert backend(torch.zeros(1)) == "triton"
    monkeypatch.setenv("SAE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SAE_KERNELS"):
        backend(torch.zeros(1))


def test_import_is_light():
    """Importing sae.core.kernels pulls in neither triton nor the heavy optional packages."""
    code = ("import sys, sae.core.kernels; bad = [m for m in ('triton', 'transformer_lens', 'wandb', 'datasets') "
            "if m in sys.modules]; assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "SAE_KERNELS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


B, D, N = 6, 8, 20


def _enc():
    return torch.randn(B, D), torch.randn(D, N), torch.zeros(N)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: dict(a, x=torch.randn(B, D + 1)), "features"),
    (lambda a: dict(a, x=torch.randn(B)), "dimensions"),
    (lambda a: dict(a, b_enc=torch.zeros(N + 1)), "b_enc"),
    (lambda a: dict(a, b_dec=torch.zeros(D + 2)), "b_dec"),
    (lambda a: dict(a, k=N + 1), "k="),
    (lambda a: dict(a, k=0), "k="),
    (lambda a: dict(a, k=2.0), "int"),
    (lambda a: dict(a, groups=3), "groups"),
    (lambda a: dict(a, x=torch.randn(B, D, dtype=torch.float16)), "share a dtype"),
    (lambda a: dict(a, x=torch.randint(0, 3, (B, D))), "dtype"),
    (lambda a: dict(a, W_enc=torch.randn(D, N, device="meta")), "meta"),
], ids=["d-mismatch", "1d-x", "b_enc", "b_dec", "k>n", "k=0", "k-float", "groups", "mixed-dtype", "int-x", "device"])
def test_topk_encode_rejects_bad_input(backend, mutate, match):
    x, W, b = _enc()
    args = mutate(dict(x=x, W_enc=W, b_enc=b, b_dec=None, k=3, groups=1))
    with pytest.raises(ValueError, match=match):
        topk_encode(args["x"], args["W_enc"], args["b_enc"], args["k"], args["b_dec"], groups=args["groups"])


@pytest.mark.parametrize("bad", [-1, N], ids=["negative", "past-end"])
def test_decode_rejects_out_of_range_indices(backend, bad):
    values, indices = torch.randn(B, 3), torch.randint(0, N, (B, 3))
    indices[2, 1] = bad
    with pytest.raises(ValueError, match="indices must lie in"):
        sparse_decode(values, indices, torch.randn(N, D))


def test_decode_rejects_bad_shapes(backend):
    W = torch.randn(N, D)
    with pytest.raises(ValueError, match="same"):
        sparse_decode(torch.randn(B, 3), torch.zeros(B, 4, dtype=torch.int64), W)
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode(torch.randn(B, 3), torch.zeros(B, 3), W)


def test_binding_decode_checks_slot_range(backend, dev):
    n, S = 10, 2
    D_, M = torch.randn(n, D, device=dev), torch.randn(S - 1, D, D, device=dev)
    values = torch.randn(B, 2, device=dev)
    ok = torch.tensor([[0, n * S - 1]] * B, device=dev)
    assert binding_decode(values, ok, D_, M).shape == (B, D)
    with pytest.raises(ValueError, match="indices must lie in"):
        binding_decode(values, ok + 1, D_, M)
    with pytest.raises(ValueError, match="transforms"):
        binding_decode(values, ok, D_, torch.randn(S - 1, D, D + 1, device=dev))


def test_indices_from_topk_encode_skip_the_range_check(backend, dev, monkeypatch):
    """Indices the encoder produced are known to be in range: decoding them needs no device sync."""
    x, W, b = (t.to(dev) for t in _enc())
    values, indices = topk_encode(x, W, b, 3)
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    sparse_decode(values, indices, torch.randn(N, D, device=dev))
    assert not calls
    indices.add_(0)  # an in-place change: no longer trusted
    sparse_decode(values, indices, torch.randn(N, D, device=dev))
    assert calls


def test_sort_pairs_segments():
    g = torch.Generator().manual_seed(0)
    n, S = 7, 3
    indices = torch.randint(0, n * S, (11, 4), generator=g)
    order, offsets = sort_pairs(indices, n, S)
    flat = indices.reshape(-1)
    key = (flat % n) * S + flat // n
    assert offsets.shape == (n * S + 1,) and offsets[0] == 0 and offsets[-1] == flat.numel()
    for q in range(n * S):
        seg = order[offsets[q]:offsets[q + 1]]
        assert (key[seg] == q).all()
        assert (seg.diff() > 0).all(), "stable: token order kept inside a segment"
    assert sorted(order.tolist()) == list(range(flat.numel()))


def test_sort_cache_follows_in_place_changes():
    CACHE.clear()
    indices = torch.tensor([[3, 1], [1, 0]])
    first = CACHE.get(indices, 4)
    assert CACHE.get(indices, 4)[0] is first[0]
    indices[0, 0] = 2
    order, offsets, _ = CACHE.get(indices, 4)
    assert torch.equal(offsets, torch.tensor([0, 1, 3, 4, 4]))
