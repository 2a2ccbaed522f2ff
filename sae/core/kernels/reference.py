"""Pure-PyTorch meaning of every sparse op, and the CPU training path.

Each function here is the definition the Triton kernels are tested against, written so that it is
also a sensible CPU implementation: the top-k backward never builds a dense B x n gradient, decodes
go through `embedding_bag` (no dense B x n codes), and everything is deterministic on CPU.

Shapes: x (B, d), W_enc (d, n), b_enc (n,), b_dec (d,), W_dec (n, d), values/indices (B, k).
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Encoder: values, indices = top-k over latents of relu((x - b_dec) @ W_enc + b_enc)
# ---------------------------------------------------------------------------------------------
def preactivations(x, W_enc, b_enc, b_dec=None):
    """(x - b_dec) @ W_enc + b_enc, the B x n matrix the fused kernel never writes."""
    xc = x if b_dec is None else x - b_dec
    return torch.addmm(b_enc, xc, W_enc)


class _TopKEncode(torch.autograd.Function):
    """Top-k of the pre-activations with a backward restricted to the B*k active pairs.

    Autograd through `pre.topk` would scatter the gradient into a dense B x n matrix and run two
    dense GEMMs; here the gradient is a sparse (B, n) matrix with B*k entries instead.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, groups):
        pre = preactivations(x, W_enc, b_enc, b_dec)
        B, n = pre.shape
        top = pre.view(B, groups, n // groups).topk(k, dim=-1, sorted=False)
        offset = torch.arange(groups, device=x.device).mul_(n // groups).view(1, groups, 1)
        values = top.values.relu().reshape(B, groups * k)
        indices = (top.indices + offset).reshape(B, groups * k)
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, d_values, _d_indices):
        x, W_enc, b_dec, values, indices = ctx.saved_tensors
        B, n = x.shape[0], W_enc.shape[1]
        acc = torch.float64 if W_enc.dtype == torch.float64 else torch.float32  # accumulate in >= fp32
        # relu: only latents with a positive value pass a gradient back to their pre-activation.
        d_pre = torch.where(values > 0, d_values.to(acc), 0.0)
        need_x, need_W, need_benc, need_bdec = ctx.needs_input_grad[:4]
        dx = dW = db_enc = db_dec = None
        if need_x:
            # dx[b] = sum_j d_pre[b, j] * W_enc[:, indices[b, j]]: a gather-sum over columns of W_enc.
            dx = F.embedding_bag(indices, W_enc.t().to(acc), per_sample_weights=d_pre, mode="sum").to(x.dtype)
        if need_W:
            xc = (x if b_dec is None else x - b_dec).to(acc)
            rows = torch.arange(B, device=x.device).repeat_interleave(indices.shape[1])
            d_pre_t = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), rows]), d_pre.reshape(-1), (n, B),
                                              check_invariants=False)
            dW = torch.sparse.mm(d_pre_t, xc).t().to(W_enc.dtype)  # (d, n) = xc^T @ d_pre as a dense B x n
        if need_benc or need_bdec:
            # Summing over the batch first: s[i] = sum of d_pre over the pairs that use latent i.
            s = torch.zeros(n, dtype=acc, device=x.device).index_add_(0, indices.reshape(-1), d_pre.reshape(-1))
            if need_benc:
                db_enc = s.to(W_enc.dtype)
            if need_bdec:
                # pre = (x - b_dec) W + b  =>  dL/db_dec = -W @ s: one mat-vec, no B x d pass.
                db_dec = -(W_enc.to(acc) @ s).to(b_dec.dtype)
        return dx, dW, db_enc, db_dec, None, None


def topk_encode(x, W_enc, b_enc, k, b_dec=None, groups=1):
    """values, indices (B, groups*k): per row (and per group of n/groups consecutive latents), the
    top-k of pre = (x - b_dec) @ W_enc + b_enc; values = relu(pre[indices]); indices int64 in 0..n-1."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W_enc, b_enc, b_dec)):
        return _TopKEncode.apply(x, W_enc, b_enc, b_dec, k, groups)
    with torch.no_grad():
        return _TopKEncode.forward(_NoCtx(), x, W_enc, b_enc, b_dec, k, groups)


class _NoCtx:
    """Stand-in ctx so inference skips building an autograd node."""

    def save_for_backward(self, *a):
        pass

    def mark_non_differentiable(self, *a):
        pass


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------
def sparse_decode(values, indices, W_dec):
    """(B, d) with row b = sum_j values[b, j] * W_dec[indices[b, j]]  (no bias).

    Output dtype = promote_types(values.dtype, W_dec.dtype)."""
    dtype = torch.promote_types(values.dtype, W_dec.dtype)
    return F.embedding_bag(indices, W_dec.to(dtype), per_sample_weights=values.to(dtype), mode="sum")


def slot_decode(values, indices, dictionary, n_slots):
    """Y (B, S, d) with Y[b, s] = sum over j with indices[b, j] // n == s of values[b, j] * D[indices[b, j] % n].

    One embedding_bag over (token, slot) bags: the pairs are reordered so each bag is contiguous."""
    B, k = indices.shape
    n = dictionary.shape[0]
    dtype = torch.promote_types(values.dtype, dictionary.dtype)
    flat = indices.reshape(-1)
    slot, atom = flat.div(n, rounding_mode="floor"), flat.remainder(n)
    bag = torch.arange(B, device=flat.device).repeat_interleave(k) * n_slots + slot
    order = torch.argsort(bag, stable=True)
    offsets = torch.searchsorted(bag[order], torch.arange(B * n_slots, device=flat.device))
    Y = F.embedding_bag(atom[order], dictionary.to(dtype), offsets,
                        per_sample_weights=values.reshape(-1)[order].to(dtype), mode="sum")
    return Y.view(B, n_slots, -1)


def combine_slots(Y, transforms):
    """x_hat = Y[:, 0] + sum_{s>=1} Y[:, s] @ M_s.T, as one GEMM over the stacked slots (the sum is
    the GEMM's reduction). transforms: (S-1, d, d), M_s = transforms[s-1]."""
    B, S, d = Y.shape
    if S == 1:
        return Y[:, 0]
    stacked = transforms.transpose(1, 2).reshape((S - 1) * d, d).to(Y.dtype)  # [M_2^T; M_3^T; ...]
    return torch.addmm(Y[:, 0], Y[:, 1:].reshape(B, (S - 1) * d), stacked)


def binding_decode(values, indices, dictionary, transforms):
    """Matrix-binding decode: slot s = index // n, atom = index % n, y_s = sparse decode of slot s
    against the shared dictionary D (n, d); x_hat = y_1 + sum_{s>=2} y_s @ M_s.T, transforms (S-1, d, d)."""
    return combine_slots(slot_decode(values, indices, dictionary, transforms.shape[0] + 1), transforms)
