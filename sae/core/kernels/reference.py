"""Pure-PyTorch meaning of every sparse op, and the CPU training path.

Each function here is the definition the Triton kernels are tested against, written so that it is
also a sensible CPU implementation: the top-k backward never builds a dense B x n gradient, decodes
go through `embedding_bag` (no dense B x n codes), and everything is deterministic on CPU.

Shapes: x (B, d), W_enc (d, n), b_enc (n,), b_dec (d,), W_dec (n, d), values/indices (B, k).

The CPU backward of every sparse op is built from two primitives (both deterministic):
  segment_rows   dR[i] = sum over the pairs (b, j) with indices[b, j] == i of coef[b, j] * G[b]:
                 the pairs sorted by latent once (pairs.CACHE, shared by the decoder and encoder
                 backward of a step), then one `embedding_bag` forward with one bag per latent.
                 (Autograd's own embedding_bag backward is ~8x slower on CPU; a COO sparse.mm ~3x.)
  gather_dot     dcoef[b, j] = <G[b], R[indices[b, j]]>: a sampled dense-dense product (CSR
                 sampled_addmm) when codes are sparse, one GEMM + gather when they are dense enough
                 that the GEMM's throughput wins (AuxK over few dead latents).
"""
import contextlib
import threading
import warnings

import torch
import torch.nn.functional as F

from sae.core.kernels.pairs import CACHE

# gather_dot takes the GEMM + gather when k * _DENSE_DOT >= n: a CPU GEMM does ~12x more
# multiply-adds per second than the sampled product (measured at d = 768, see BENCHMARKS.md).
_DENSE_DOT = 12


# ---------------------------------------------------------------------------------------------
# Encoder: values, indices = top-k over latents of relu((x - b_dec) @ W_enc + b_enc)
# ---------------------------------------------------------------------------------------------
def preactivations(x, W_enc, b_enc, b_dec=None):
    """(x - b_dec) @ W_enc + b_enc, the B x n matrix the fused kernel never writes."""
    xc = x if b_dec is None else x - b_dec
    return torch.addmm(b_enc, xc, W_enc)


_SCRATCH = threading.local()


def _scratch_preactivations(x, W_enc, b_enc, b_dec):
    """preactivations() into a B x n buffer kept between calls on CPU: the encoders' pre-activations
    never leave their forward, and a fresh B x n buffer page-faults in every step (~1 ms per 2 MB
    here). One buffer per thread, replaced when the shape or dtype changes. Not under autocast
    (its dtype is the autocast's) and not off the CPU (the caching allocator reuses memory there)."""
    xc = x if b_dec is None else x - b_dec
    dtype = torch.promote_types(torch.promote_types(xc.dtype, W_enc.dtype), b_enc.dtype)
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.is_grad_enabled() and (
            xc.requires_grad or W_enc.requires_grad or b_enc.requires_grad):
        return torch.addmm(b_enc, xc, W_enc)
    shape = (x.shape[0], W_enc.shape[1])
    buf = getattr(_SCRATCH, "pre", None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = _SCRATCH.pre = torch.empty(shape, dtype=dtype)
    return torch.addmm(b_enc.to(dtype), xc.to(dtype), W_enc.to(dtype), out=buf)


class _TopKEncode(torch.autograd.Function):
    """Top-k of the pre-activations with a backward restricted to the B*k active pairs.

    Autograd through `pre.topk` would scatter the gradient into a dense B x n matrix and run two
    dense GEMMs; here the gradient is a sparse (B, n) matrix with B*k entries instead.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, groups):
        pre = _scratch_preactivations(x, W_enc, b_enc, b_dec)
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
        return _encoder_backward(ctx.needs_input_grad[:4], x, W_enc, b_dec, [(values, indices, d_values)]) + (None, None)


def _acc_dtype(*tensors):
    """Accumulate in >= fp32 (float64 when any operand is float64)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _encoder_backward(needs, x, W_enc, b_dec, parts):
    """dx, dW_enc, db_enc, db_dec of pre = (x - b_dec) @ W_enc + b_enc restricted to sparse pairs.

    parts: (values, indices, d_values[, latents]) per set of selected pairs; values are relu'd
    pre-activations (only positive ones pass a gradient), indices address W_enc's columns directly,
    or, with `latents` (m,), columns latents[indices] (AuxK's selection among dead latents)."""
    need_x, need_W, need_benc, need_bdec = needs
    n = W_enc.shape[1]
    acc = _acc_dtype(x, W_enc)
    dx = dW = db_enc = db_dec = None
    d_pres = [torch.where(p[0] > 0, p[2].to(acc), 0.0) for p in parts]
    if need_x:
        rows = W_enc.t().to(acc)  # (n, d): latent i's column as a row
        for p, d_pre in zip(parts, d_pres):
            r = rows if len(p) == 3 else rows.index_select(0, p[3])
            part = F.embedding_bag(p[1], r, per_sample_weights=d_pre, mode="sum")
            dx = part if dx is None else dx.add_(part)
        dx = dx.to(x.dtype)
    if need_W:
        xc = (x if b_dec is None else x - b_dec).to(acc)
        dWt = None  # (n, d): row i is latent i's column
        for p, d_pre in zip(parts, d_pres):
            if len(p) == 3:
                part = segment_rows(p[1], d_pre, xc, n)
                dWt = part if dWt is None else dWt.add_(part)
            else:  # rows of the m latents selected from, added into theirs
                if dWt is None:
                    dWt = torch.zeros(n, xc.shape[1], dtype=acc, device=x.device)
                dWt.index_add_(0, p[3], segment_rows(p[1], d_pre, xc, p[3].shape[0]))
        dW = dWt.t().to(W_enc.dtype)  # (d, n) view of (n, d) rows: matches an (n, d)-major W_enc without a copy
    if need_benc or need_bdec:
        # Summing over the batch first: s[i] = sum of d_pre over the pairs that use latent i.
        s = torch.zeros(n, dtype=acc, device=x.device)
        for p, d_pre in zip(parts, d_pres):
            if len(p) == 3:
                s.index_add_(0, p[1].reshape(-1), d_pre.reshape(-1))
            else:
                m = p[3].shape[0]
                s.index_add_(0, p[3], torch.zeros(m, dtype=acc, device=x.device).index_add_(
                    0, p[1].reshape(-1), d_pre.reshape(-1)))
        if need_benc:
            db_enc = s.to(W_enc.dtype)
        if need_bdec:
            # pre = (x - b_dec) W + b  =>  dL/db_dec = -W @ s: one mat-vec, no B x d pass.
            db_dec = -(W_enc.to(acc) @ s).to(b_dec.dtype)
    return dx, dW, db_enc, db_dec


def segment_rows(indices, coef, G, n_rows):
    """(n_rows, d) with row i = sum over pairs (b, j) with indices[b, j] == i of coef[b, j] * G[b]
    (a transposed sparse product), in G's dtype; pairs are summed in token order (deterministic)."""
    B, k = indices.shape
    order, offsets, _ = CACHE.get(indices, n_rows)
    tokens = order.div(k, rounding_mode="floor")
    return F.embedding_bag(tokens, G, offsets[:-1], per_sample_weights=coef.reshape(-1)[order].to(G.dtype),
                           mode="sum")


def gather_dot(G, R, indices):
    """(B, k) with entry (b, j) = <G[b], R[indices[b, j]]>, in G's dtype (fp32 or fp64)."""
    B, k = indices.shape
    n = R.shape[0]
    R = R.to(G.dtype)
    if k * _DENSE_DOT >= n:
        return (G @ R.t()).gather(1, indices)
    crow = torch.arange(0, B * k + 1, k, device=G.device)
    with _quiet_once():
        mask = torch.sparse_csr_tensor(crow, indices.reshape(-1), torch.zeros(B * k, dtype=G.dtype, device=G.device),
                                       (B, n), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, G, R.t(), beta=0.0).values().view(B, k)


_CSR_WARNED = threading.Event()


@contextlib.contextmanager
def _quiet_once():
    """Silence torch's "sparse CSR support is in beta" warning, given once per process: only the
    first CSR tensor needs the warnings filter (entering one resets Python's warning caches)."""
    if _CSR_WARNED.is_set():
        yield
        return
    _CSR_WARNED.set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def topk_encode(x, W_enc, b_enc, k, b_dec=None, groups=1):
    """values, indices (B, groups*k): per row (and per group of n/groups consecutive latents), the
    top-k of pre = (x - b_dec) @ W_enc + b_enc; values = relu(pre[indices]); indices int64 in 0..n-1."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W_enc, b_enc, b_dec)):
        return _TopKEncode.apply(x, W_enc, b_enc, b_dec, k, groups)
    with torch.no_grad():
        return _TopKEncode.forward(_NoCtx(), x, W_enc, b_enc, b_dec, k, groups)


class _TopKEncodeAux(torch.autograd.Function):
    """topk_encode plus AuxK's selection from the same pre-activations: the top-k_aux among the
    `dead` latents (m,), as values and indices into `dead` (0..m-1). One backward for both sets of
    pairs: the dead latents' rows are summed per latent over the aux pairs and added into theirs."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, dead, k_aux):
        pre = _scratch_preactivations(x, W_enc, b_enc, b_dec)
        top = pre.topk(k, dim=-1, sorted=False)
        values, indices = top.values.relu(), top.indices
        aux = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
        aux_values, aux_indices = aux.values.relu(), aux.indices
        ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices, dead)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, d_values, _d_indices, d_aux_values, _d_aux_indices):
        x, W_enc, b_dec, values, indices, aux_values, aux_indices, dead = ctx.saved_tensors
        parts = [(values, indices, d_values), (aux_values, aux_indices, d_aux_values, dead)]
        return _encoder_backward(ctx.needs_input_grad[:4], x, W_enc, b_dec, parts) + (None, None, None)


def topk_encode_aux(x, W_enc, b_enc, k, b_dec, dead, k_aux):
    """values, indices (B, k) as topk_encode, and aux_values, aux_indices (B, k_aux): the top-k_aux
    of the same pre-activations among the latents `dead` (int64 ids (m,), k_aux <= m), relu'd;
    aux_indices index `dead`. The pre-activations are computed once for both."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W_enc, b_enc, b_dec)):
        return _TopKEncodeAux.apply(x, W_enc, b_enc, b_dec, k, dead, k_aux)
    with torch.no_grad():
        return _TopKEncodeAux.forward(_NoCtx(), x, W_enc, b_enc, b_dec, k, dead, k_aux)


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

    Output dtype = promote_types(values.dtype, W_dec.dtype). Backward: dW_dec by segment_rows
    (pairs sorted by latent), d values by gather_dot; no dense B x n or B*k x d intermediate."""
    if torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad):
        return _SparseDecode.apply(values, indices, W_dec)
    dtype = torch.promote_types(values.dtype, W_dec.dtype)
    return F.embedding_bag(indices, W_dec.to(dtype), per_sample_weights=values.to(dtype), mode="sum")


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec):
        dtype = torch.promote_types(values.dtype, W_dec.dtype)
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec.to(dtype), per_sample_weights=values.to(dtype), mode="sum")

    @staticmethod
    def backward(ctx, d_out):
        values, indices, W_dec = ctx.saved_tensors
        need_values, _, need_W = ctx.needs_input_grad
        G = d_out.to(_acc_dtype(values, W_dec))
        d_values = gather_dot(G, W_dec, indices).to(values.dtype) if need_values else None
        dW = segment_rows(indices, values, G, W_dec.shape[0]).to(W_dec.dtype) if need_W else None
        return d_values, None, dW


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
