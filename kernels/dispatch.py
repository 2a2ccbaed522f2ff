"""The one place that decides which implementation runs (placeholder: references only for now)."""
import os

import torch


def backend(t: torch.Tensor) -> str:
    forced = os.environ.get("SAE_KERNELS", "")
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"SAE_KERNELS must be 'triton' or 'torch', got {forced!r}")
    return forced or "torch"


def topk_encode(x, W_enc, b_enc, k, b_dec=None):
    """values, indices = top-k over latents of relu((x - b_dec) @ W_enc + b_enc), per row."""
    if b_dec is not None:
        x = x - b_dec
    pre = x @ W_enc + b_enc
    top = pre.topk(k, dim=-1, sorted=False)
    return top.values.relu(), top.indices


def sparse_decode(values, indices, W_dec):
    """(B, d) = sum_j values[b, j] * W_dec[indices[b, j]] (no bias)."""
    return torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def binding_decode(values, indices, dictionary, transforms):
    """Matrix-binding decode: slot s = index // n, atom = index % n; y_s = sparse decode against
    the shared dictionary D (n, d); x_hat = y_1 + sum_{s>=2} y_s @ M_s.T with transforms (S-1, d, d)."""
    n = dictionary.shape[0]
    slot, atom = indices // n, indices % n
    out = sparse_decode(values * (slot == 0), atom, dictionary)
    for s in range(1, transforms.shape[0] + 1):
        out = out + sparse_decode(values * (slot == s), atom, dictionary) @ transforms[s - 1].T
    return out
