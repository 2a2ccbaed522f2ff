"""Triton kernels for the sparse side: a gather-sum and a sorted segment pass.

Two kernels serve every sparse op of the training step:

  gather_sum   out[b, s] = sum_j [slot(b, j) == s] coef[b, j] * R[atom(b, j)]
               - decoder forward (R = W_dec, one slot), binding decoder forward (R = D, S slots),
               - encoder backward dx (R = W_enc^T, coef = d pre).
  segment      for each latent i, over the pairs p that use it (sorted once, see pairs.py):
               dR[i] = sum_p coef[p] * G[row(p)]       and, optionally,
               dcoef[p] = <G[row(p)], R[i]>            and csum[i] = sum_p coef[p]
               - decoder backward: dW_dec and d values in one pass (G = d x_hat),
               - encoder backward: dW_enc^T and db_enc (G = x - b_dec, coef = d pre).

Why this shape: each weight row is read once and its gradient row written once by a single program,
so there are no atomics and no B*k x d intermediate; the gathered rows of G (B x d, small) come
mostly from L2. Pure-PyTorch meaning of each: reference.py; the autograd Functions at the bottom.

Importing this module imports triton; with TRITON_INTERPRET=1 set first, the kernels run on CPU
tensors in the interpreter (all loads are upcast to fp32 before arithmetic, which the interpreter
needs for bf16 and the GPU does anyway for fp32 accumulation).
"""
import os

import torch
import triton
import triton.language as tl

from sae.core.kernels.pairs import CACHE

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(x):
    return triton.next_power_of_2(max(int(x), 1))


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """fp32 x to DTYPE, rounding to nearest even. The interpreter truncates fp32 -> bf16 (stores
    included), so there the rounding is done on the bits first and the cast is then exact."""
    if INTERP:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# ---------------------------------------------------------------------------------------------
# gather-sum
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gather_sum_kernel(
    coef_ptr, idx_ptr, r_ptr, out_ptr,
    K, D, N_ATOMS,
    stride_rn, stride_rd, stride_ob, stride_os,
    SLOTS: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, INTERP: tl.constexpr,
):
    """Program (b, column block, s): out[b, s, cols] = sum_j [idx // N_ATOMS == s] coef * R[idx % N_ATOMS, cols].
    coef and idx are contiguous (B, K)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    s = tl.program_id(2)
    col_ok = cols < D
    acc = tl.full((BD,), 0.0, tl.float32)
    for j0 in range(0, K, BJ):
        js = j0 + tl.arange(0, BJ)
        j_ok = js < K
        idx = tl.load(idx_ptr + b * K + js, mask=j_ok, other=0).to(tl.int64)
        c = tl.load(coef_ptr + b * K + js, mask=j_ok, other=0).to(tl.float32)
        if SLOTS == 1:
            atom = idx
            use = j_ok & (c != 0)
        else:
            slot = idx // N_ATOMS
            atom = idx - slot * N_ATOMS
            use = j_ok & (c != 0) & (slot == s)
        # Masked loads move no memory: pairs with a zero coefficient (relu'd latents, other slots) are free.
        rows = tl.load(r_ptr + atom[:, None] * stride_rn + cols[None, :] * stride_rd,
                       mask=use[:, None] & col_ok[None, :], other=0).to(tl.float32)
        acc += tl.sum(c[:, None] * rows, axis=0)
    tl.store(out_ptr + b * stride_ob + s * stride_os + cols, _cast(acc, out_ptr.dtype.element_ty, INTERP), mask=col_ok)


def gather_blocks(D, K):
    """(BJ pairs, BD columns, warps) per step; the interpreter takes few, wide steps."""
    BD = min(_pow2(D), 256)
    if INTERPRET:
        return min(_pow2(K), 128), BD, 4
    return max(1, min(_pow2(K), 4096 // BD)), BD, 4


def gather_sum(coef, idx, R, n_slots=1, out_dtype=None):
    """(B, S, d) fp32-accumulated; R (n_atoms, d) with any strides; coef, idx (B, k)."""
    B, K = idx.shape
    n_atoms, D = R.shape
    coef, idx = coef.contiguous(), idx.contiguous()
    out = torch.empty((B, n_slots, D), dtype=out_dtype or R.dtype, device=R.device)
    if B == 0 or D == 0:
        return out
    BJ, BD, warps = gather_blocks(D, K)
    grid = (B, triton.cdiv(D, BD), n_slots)
    _gather_sum_kernel[grid](coef, idx, R, out, K, D, n_atoms,
                             R.stride(0), R.stride(1), out.stride(0), out.stride(1),
                             SLOTS=n_slots, BJ=BJ, BD=BD, INTERP=INTERPRET, num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------------
# sorted segment pass
# ---------------------------------------------------------------------------------------------
@triton.jit
def _segment_kernel(
    order_ptr, offsets_ptr, idx_ptr, coef_ptr, g_ptr, r_ptr, dr_ptr, dcoef_ptr, csum_ptr,
    K, D, N_ATOMS,
    stride_g, stride_rn, stride_rd, stride_dr,
    SLOTS: tl.constexpr, PER_ATOM: tl.constexpr, DCOEF: tl.constexpr, CSUM: tl.constexpr,
    BP: tl.constexpr, BD: tl.constexpr, INTERP: tl.constexpr,
):
    """One program per output row, holding the whole row (BD >= D) in registers.

    Segments are keyed atom * SLOTS + slot. PER_ATOM (decoder): program a covers keys a*S .. a*S+S-1,
    G rows are (token, slot) rows of dY viewed (B*S, d), output row a of dD. Otherwise (encoder):
    program q covers key q, G rows are tokens, output row is latent (q % S) * N_ATOMS + q // S.
    """
    q = tl.program_id(0)
    if PER_ATOM:
        lo = tl.load(offsets_ptr + q * SLOTS)
        hi = tl.load(offsets_ptr + q * SLOTS + SLOTS)
        out_row = q
    else:
        lo = tl.load(offsets_ptr + q)
        hi = tl.load(offsets_ptr + q + 1)
        out_row = (q % SLOTS) * N_ATOMS + q // SLOTS
    cols = tl.arange(0, BD)
    col_ok = cols < D
    if DCOEF:
        r_row = tl.load(r_ptr + out_row.to(tl.int64) * stride_rn + cols * stride_rd, mask=col_ok, other=0).to(tl.float32)
    acc = tl.full((BD,), 0.0, tl.float32)
    csum = tl.full((BP,), 0.0, tl.float32)
    for p0 in range(lo, hi, BP):
        ps = p0 + tl.arange(0, BP)
        p_ok = ps < hi
        pos = tl.load(order_ptr + ps, mask=p_ok, other=0)  # flat position b * K + j
        c = tl.load(coef_ptr + pos, mask=p_ok, other=0).to(tl.float32)
        grow = pos // K
        if SLOTS > 1:
            if PER_ATOM:
                grow = grow * SLOTS + tl.load(idx_ptr + pos, mask=p_ok, other=0) // N_ATOMS
        if DCOEF:
            need = p_ok  # every pair needs its d coef, even with coef == 0
        else:
            need = p_ok & (c != 0)
        g = tl.load(g_ptr + grow[:, None] * stride_g + cols[None, :], mask=need[:, None] & col_ok[None, :],
                    other=0).to(tl.float32)
        acc += tl.sum(c[:, None] * g, axis=0)
        if DCOEF:
            dc = tl.sum(g * r_row[None, :], axis=1)
            tl.store(dcoef_ptr + pos, _cast(dc, dcoef_ptr.dtype.element_ty, INTERP), mask=p_ok)
        if CSUM:
            csum += c
    tl.store(dr_ptr + out_row.to(tl.int64) * stride_dr + cols, _cast(acc, dr_ptr.dtype.element_ty, INTERP), mask=col_ok)
    if CSUM:
        tl.store(csum_ptr + out_row, tl.sum(csum, axis=0))


def segment_blocks(D):
    """(BP pairs, BD >= D columns, warps): one whole row per program."""
    BD = _pow2(D)
    if INTERPRET:
        return 32, BD, 4  # short steps so tests reach the multi-step path
    # ~16K fp32 live values in the (BP, BD) tile; wide rows get more warps.
    return max(1, min(64, 16384 // BD)), BD, (8 if BD >= 2048 else 4)


def segment_pass(indices, coef, G, n_atoms, n_slots, R=None, per_atom=True, dr_dtype=torch.float32,
                 want_csum=False, dcoef_dtype=None):
    """Run the segment kernel. Returns (dR, dcoef or None, csum or None).

    per_atom=True : dR (n_atoms, d) rows of the dictionary; G is (B * n_slots, d) (slot rows of dY).
    per_atom=False: dR (n_atoms * n_slots, d) rows per latent; G is (B, d)."""
    B, K = indices.shape
    D = G.shape[1]
    order, offsets, key_slots = CACHE.get(indices, n_atoms, n_slots, any_slots=not per_atom)
    if key_slots != n_slots:  # the encoder reusing a binding decoder's sort: keys are (atom, slot)
        n_atoms, n_slots = n_atoms // key_slots, key_slots
    n_rows = n_atoms if per_atom else n_atoms * n_slots
    G = G if G.stride(1) == 1 else G.contiguous()
    coef = coef.contiguous()
    idx = indices.contiguous()
    dR = torch.empty((n_rows, D), dtype=dr_dtype, device=G.device)
    dcoef = torch.empty((B, K), dtype=dcoef_dtype, device=G.device) if R is not None else None
    csum = torch.empty((n_rows,), dtype=torch.float32, device=G.device) if want_csum else None
    if n_rows == 0 or D == 0:
        return dR, dcoef, csum
    BP, BD, warps = segment_blocks(D)
    dummy = dR  # unused pointer arguments
    _segment_kernel[(n_rows,)](
        order, offsets, idx, coef, G, R if R is not None else dummy, dR,
        dcoef if dcoef is not None else dummy, csum if csum is not None else dummy,
        K, D, n_atoms,
        G.stride(0), R.stride(0) if R is not None else 0, R.stride(1) if R is not None else 0, dR.stride(0),
        SLOTS=n_slots, PER_ATOM=per_atom, DCOEF=R is not None, CSUM=want_csum,
        BP=BP, BD=BD, INTERP=INTERPRET, num_warps=warps)
    return dR, dcoef, csum


# ---------------------------------------------------------------------------------------------
# autograd: decoder (plain and binding) on the sparse path
# ---------------------------------------------------------------------------------------------
class SlotDecode(torch.autograd.Function):
    """Y (B, S, d): Y[b, s] = sum_j [idx // n == s] values * D[idx % n]  (S = 1: the plain sparse decode).

    Backward: one segment pass per dictionary row gives dD and d values together."""

    @staticmethod
    def forward(ctx, values, indices, dictionary, n_slots):
        out_dtype = torch.promote_types(values.dtype, dictionary.dtype)
        Y = gather_sum(values, indices, dictionary, n_slots=n_slots, out_dtype=out_dtype)
        ctx.save_for_backward(values, indices, dictionary)
        ctx.n_slots = n_slots
        return Y

    @staticmethod
    def backward(ctx, dY):
        values, indices, dictionary = ctx.saved_tensors
        S = ctx.n_slots
        need_values, _, need_dict = ctx.needs_input_grad[:3]
        B, _, d = dY.shape
        dG = dY.reshape(B * S, d)
        dD, dvals, _ = segment_pass(indices, values, dG, dictionary.shape[0], S,
                                    R=dictionary if need_values else None, per_atom=True,
                                    dr_dtype=dictionary.dtype, dcoef_dtype=values.dtype)
        # A frozen dictionary still takes this path (its dD is dropped): rare, and it keeps one kernel.
        return dvals, None, dD if need_dict else None, None

