"""Float64 ground truth for the kernel tests, written densely so it is obviously right.

Each truth takes float64 leaves (the same rounded numbers the op under test saw) and the indices
the op chose, so gradients are compared for the same selection even where near-ties could flip it.
"""
import torch

# Relative-error bounds against float64: fp32 computes and stores in fp32; fp16/bf16 store values
# and gradients in the low precision (every kernel accumulates in fp32).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel(out, ref):
    """||out - ref|| / ||ref|| in float64 (NaN when out holds NaN, so poisoned outputs fail)."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    den = ref.norm().item()
    return ((out - ref).norm() / (den if den > 0 else 1.0)).item()


def leaf(t, dtype, device="cpu", grad=True):
    """t rounded to dtype on device, as a fresh leaf."""
    return t.detach().to(device=device, dtype=dtype).requires_grad_(grad)


def f64(*ts):
    """float64 CPU leaves holding exactly the values of ts."""
    return [None if t is None else t.detach().cpu().double().requires_grad_(True) for t in ts]


def pre_activations(x, W_enc, b_enc, b_dec=None):
    return (x if b_dec is None else x - b_dec) @ W_enc + b_enc


def dense_codes(values, indices, n):
    """(B, n) codes with values scattered at indices (repeated indices add up)."""
    B, k = indices.shape
    rows = torch.arange(B)[:, None].expand(B, k)
    return torch.zeros(B, n, dtype=values.dtype).index_put((rows, indices.cpu().long()), values, accumulate=True)


def binding_x_hat(values, indices, D, transforms):
    """sum_s (codes of slot s) @ D @ M_s^T with M_1 = I, from dense per-slot codes."""
    n = D.shape[0]
    S = transforms.shape[0] + 1
    indices = indices.cpu()
    out = 0
    for s in range(S):
        in_slot = (indices.long() // n) == s
        codes = dense_codes(values * in_slot, indices.long() % n, n)
        y = codes @ D
        out = out + (y if s == 0 else y @ transforms[s - 1].T)
    return out

