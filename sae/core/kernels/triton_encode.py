"""Fused encoder: GEMM + bias + top-k in one kernel, so the B x n pre-activations never reach memory.

Pure-PyTorch meaning (reference.topk_encode):
    pre = (x - b_dec) @ W_enc + b_enc                       # (B, n), never materialised here
    values, indices = pre.view(B, G, n/G).topk(k); values = relu(values)

How: program (row block, column chunk) computes its pre-activation tiles one BN-wide tile at a time
(fp32 accumulate) and folds each tile into a running per-row top-k set held in registers. A value
and its column are packed into one int64 key (order-preserving float bits << 32 | column), so one
max-reduction finds a value and its index together, and keys are unique. Folding a tile: count, per
row, the tile keys above the row's current k-th best; then that many times (the largest count over
the rows, at most k) move the tile's best key into the slot of the current minimum. After the first
tile few keys beat the k-th best, so most tiles take a handful of steps. (tl.topk's bitonic network
is ~50x slower in the interpreter and does a full log^2 sort of every tile.) Each chunk leaves k
candidates per row; a small merge kernel folds the chunks of each group the same way (when a group
has one chunk, the first kernel writes the result directly). The set is kept in K = next power of
two >= k slots; slots past k hold +inf keys so they are never the minimum and never replaced.

Backward (restricted to the B*k active pairs, see triton_decode):
    d pre = d values * (values > 0)
    dW_enc^T, db_enc = segment pass over pairs sorted by latent, rows x - b_dec
    dx = gather-sum of W_enc columns;   db_dec = -W_enc @ db_enc  (batch summed first, one mat-vec)
"""

import torch
import triton
import triton.language as tl

from sae.core.kernels.triton_decode import INTERPRET, _cast, _pow2, gather_sum, segment_pass

# A chunk's k candidates per row leave the first kernel as int64 keys: the value's float bits,
# made sign-ordered, in the high word and the column in the low word (one store, one load).
_EMPTY_KEY = tl.constexpr(-2139095041 << 32)  # _pack(-inf, 0): no candidate


@triton.jit
def _pack(v, cols):
    bits = v.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | cols.to(tl.int64)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _empty_set(BM: tl.constexpr, K: tl.constexpr, k):
    """Running top-k set (values, columns): k slots at -inf, then K - k slots at +inf that are never
    the minimum and so never replaced."""
    js = tl.arange(0, K)
    row = tl.where(js < k, float("-inf"), float("inf"))
    rv = tl.full((BM, K), 0.0, tl.float32) + row[None, :]
    rc = tl.full((BM, K), 0, tl.int32)
    return rv, rc, tl.min(rv, axis=1)


@triton.jit
def _fold(rv, rc, run_min, vals, cols, k, K: tl.constexpr):
    """Fold candidates (vals (BM, W) fp32, cols (W,) or (BM, W) int32; -inf = no candidate) into the
    running set; run_min is each row's current k-th best. Steps: the most candidates any row has
    above its k-th best (at most k); each moves every row's best candidate into its minimum slot."""
    js = tl.arange(0, K)
    steps = tl.minimum(tl.max(tl.sum((vals > run_min[:, None]).to(tl.int32), axis=1), axis=0), k)
    for _ in range(0, steps):
        best = tl.max(vals, axis=1)
        best_col = tl.min(tl.where(vals == best[:, None], cols, 2147483647), axis=1)  # ties: lowest column
        take = best > run_min
        slot = tl.min(tl.where(rv == run_min[:, None], js[None, :], K), axis=1)
        put = (js[None, :] == slot[:, None]) & take[:, None]
        rv = tl.where(put, best[:, None], rv)
        rc = tl.where(put, best_col[:, None], rc)
        vals = tl.where(cols == best_col[:, None], float("-inf"), vals)
        run_min = tl.min(rv, axis=1)
    return rv, rc, run_min


@triton.jit
def _store_result(rv, rc, rows, js, B, k_out, col0, vals_ptr, idx_ptr, stride_vb, stride_ib, INTERP: tl.constexpr):
    v = tl.maximum(rv, 0.0)  # relu after selection, as the reference does
    ok = (rows < B)[:, None] & (js < k_out)[None, :]
    tl.store(vals_ptr + rows[:, None] * stride_vb + col0 + js[None, :], _cast(v, vals_ptr.dtype.element_ty, INTERP),
             mask=ok)
    tl.store(idx_ptr + rows[:, None] * stride_ib + col0 + js[None, :], rc.to(tl.int64), mask=ok)


@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, benc_ptr, bdec_ptr, keys_ptr, vals_ptr, idx_ptr,
    B, D, N_GROUP, CHUNK, CHUNKS_PER_GROUP, k_out,
    stride_xb, stride_xd, stride_wd, stride_wn, stride_kb, stride_kc, stride_vb, stride_ib,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_BDEC: tl.constexpr, DOT: tl.constexpr, FINAL: tl.constexpr, INTERP: tl.constexpr,
):
    """Program (row block, chunk c of group g): top-k keys of its rows over columns
    [g * N_GROUP + lc * CHUNK, min(g * N_GROUP + (lc + 1) * CHUNK, (g + 1) * N_GROUP))."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    g = c // CHUNKS_PER_GROUP
    lc = c - g * CHUNKS_PER_GROUP
    col_lo = g * N_GROUP + lc * CHUNK
    col_hi = tl.minimum(col_lo + CHUNK, (g + 1) * N_GROUP)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < B
    js = tl.arange(0, K)
    rv, rc, run_min = _empty_set(BM, K, k_out)
    for n0 in range(col_lo, col_hi, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < col_hi
        acc = tl.full((BM, BN), 0.0, tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < D
            a = tl.load(x_ptr + rows[:, None] * stride_xb + ks[None, :] * stride_xd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0)
            if HAS_BDEC:
                # subtract in fp32 then round once, as (x - b_dec) in the input dtype would
                a = _cast(a.to(tl.float32) - tl.load(bdec_ptr + ks, mask=k_ok, other=0).to(tl.float32)[None, :],
                          a.dtype, INTERP)
            w = tl.load(w_ptr + ks[:, None] * stride_wd + cols[None, :] * stride_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0)
            acc = _dot(a, w, acc, DOT, INTERP)
        acc += tl.load(benc_ptr + cols, mask=col_ok, other=0).to(tl.float32)[None, :]
        acc = tl.where(row_ok[:, None] & col_ok[None, :], acc, float("-inf"))
        rv, rc, run_min = _fold(rv, rc, run_min, acc, cols[None, :], k_out, K)
    if FINAL:
        _store_result(rv, rc, rows, js, B, k_out, g * k_out, vals_ptr, idx_ptr, stride_vb, stride_ib, INTERP)
    else:
        tl.store(keys_ptr + rows[:, None] * stride_kb + c * stride_kc + js[None, :], _pack(rv, rc),
                 mask=row_ok[:, None] & (js < k_out)[None, :])


@triton.jit
def _dot(a, w, acc, DOT: tl.constexpr, INTERP: tl.constexpr):
    """acc += a @ w with operands rounded to the dot dtype. DOT: 0 fp32 (ieee), 1 tf32, 2 bf16, 3 fp16.
    The interpreter computes bf16/fp16 products wrongly, so there the operands are rounded (to
    nearest even, see _cast) and multiplied in fp32: exact, as a product of two 8- or 11-bit
    mantissas fits in fp32, which is what the tensor cores compute."""
    if INTERP:
        if DOT == 2:
            a = _cast(a.to(tl.float32), tl.bfloat16, INTERP)
            w = _cast(w.to(tl.float32), tl.bfloat16, INTERP)
        elif DOT == 3:
            a = a.to(tl.float16)
            w = w.to(tl.float16)
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if DOT == 2:
        return tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
    if DOT == 3:
        return tl.dot(a.to(tl.float16), w.to(tl.float16), acc)
    if DOT == 1:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32")
    return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _merge_kernel(
    keys_ptr, vals_ptr, idx_ptr, B, CHUNKS_PER_GROUP, k_out,
    stride_kb, stride_kc, stride_vb, stride_ib,
    K: tl.constexpr, BM: tl.constexpr, INTERP: tl.constexpr,
):
    """Program (row block, group g): top-k over the chunk candidates of group g; writes values, indices."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < B
    js = tl.arange(0, K)
    rv, rc, run_min = _empty_set(BM, K, k_out)
    for lc in range(0, CHUNKS_PER_GROUP):
        c = g * CHUNKS_PER_GROUP + lc
        key = tl.load(keys_ptr + rows[:, None] * stride_kb + c * stride_kc + js[None, :],
                      mask=row_ok[:, None] & (js < k_out)[None, :], other=_EMPTY_KEY)
        vals, cols = _unpack(key)
        rv, rc, run_min = _fold(rv, rc, run_min, vals, cols, k_out, K)
    _store_result(rv, rc, rows, js, B, k_out, g * k_out, vals_ptr, idx_ptr, stride_vb, stride_ib, INTERP)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def encode_blocks(K, elt_size=2):
    """GPU tiles (BM, BN, BK, warps, stages) for a running set of K slots and weights of elt_size
    bytes (bf16 or fp32 storage compile to the same choice). Chosen so the fp32 tile, the (BM, K)
    running set and the wgmma operands fit without register spills on sm_90: `python -m
    sae.core.kernels.compile_check` prints registers and spills per configuration. Not yet tuned by
    timing on a GPU (see BENCHMARKS.md)."""
    if K <= 64:
        return 128, 128, 32, 8, 3
    if K <= 128:
        return 64, 128, 32, 8, 3
    if K <= 256:
        return 32, 64, 32, 8, 3
    return 16, 64, 32, 4, 3


def encode_config(B, d, n_group, groups, K, device, elt_size=2, chunk=None):
    """Block sizes plus the column-chunk width: enough chunks to fill the GPU with programs.
    `chunk` overrides the width (tests use it to reach the merge kernel; the interpreter otherwise
    takes one chunk per group, its cheapest schedule)."""
    if INTERPRET:
        BM, BN, BK, warps, stages = min(64, max(16, _pow2(B))), min(256, max(16, _pow2(n_group))), \
            min(128, max(16, _pow2(d))), 4, 1
    else:
        BM, BN, BK, warps, stages = encode_blocks(K, elt_size)
    if chunk is not None:
        BN = min(BN, max(16, _pow2(chunk)))
    tiles_per_group = triton.cdiv(n_group, BN)
    if chunk is not None:
        chunk = triton.cdiv(chunk, BN) * BN
    elif INTERPRET:
        chunk = tiles_per_group * BN
    else:
        row_blocks = triton.cdiv(B, BM)
        want_chunks = triton.cdiv(4 * _num_sms(device), row_blocks * groups)
        chunks = max(1, min(tiles_per_group, want_chunks))
        chunk = triton.cdiv(tiles_per_group, chunks) * BN
    return dict(BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages, chunk=chunk,
                chunks_per_group=triton.cdiv(n_group, chunk))


def merge_blocks(K):
    """(rows, warps) of the merge kernel: a (rows, K) running set and a (rows, K) candidate block."""
    return max(1, min(32, 1024 // K)), 4


def dot_code(compute_dtype, device):
    if compute_dtype == torch.bfloat16:
        return 2
    if compute_dtype == torch.float16:
        return 3
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 1
    return 0


def encode_forward(x, W_enc, b_enc, b_dec, k, groups, compute_dtype, out_dtype, chunk=None):
    """values (B, groups*k) in out_dtype, indices (B, groups*k) int64."""
    B, d = x.shape
    n = W_enc.shape[1]
    n_group = n // groups
    K = _pow2(k)
    cfg = encode_config(B, d, n_group, groups, K, x.device, max(x.element_size(), W_enc.element_size()), chunk)
    values = torch.empty((B, groups * k), dtype=out_dtype, device=x.device)
    indices = torch.empty((B, groups * k), dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    b_enc = b_enc.contiguous()
    final = cfg["chunks_per_group"] == 1
    n_chunks = cfg["chunks_per_group"] * groups
    keys = indices if final else torch.empty((B, n_chunks, K), dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(B, cfg["BM"]), n_chunks)
    _encode_kernel[grid](
        x, W_enc, b_enc, b_dec if b_dec is not None else b_enc, keys, values, indices,
        B, d, n_group, cfg["chunk"], cfg["chunks_per_group"], k,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        keys.stride(0), keys.stride(1) if not final else 0, values.stride(0), indices.stride(0),
        K=K, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], HAS_BDEC=b_dec is not None,
        DOT=dot_code(compute_dtype, x.device), FINAL=final, INTERP=INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if not final:
        BMm, warps = merge_blocks(K) if not INTERPRET else (min(64, max(16, _pow2(B))), 4)
        _merge_kernel[(triton.cdiv(B, BMm), groups)](
            keys, values, indices, B, cfg["chunks_per_group"], k,
            keys.stride(0), keys.stride(1), values.stride(0), indices.stride(0),
            K=K, BM=BMm, INTERP=INTERPRET, num_warps=warps)
    return values, indices


class TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, groups, compute_dtype, out_dtype, chunk):
        values, indices = encode_forward(x, W_enc, b_enc, b_dec, k, groups, compute_dtype, out_dtype, chunk)
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, d_values, _d_indices):
        x, W_enc, b_dec, values, indices = ctx.saved_tensors
        need_x, need_W, need_benc, need_bdec = ctx.needs_input_grad[:4]
        d_pre = torch.where(values > 0, d_values.float(), 0.0)
        n = W_enc.shape[1]
        dx = dW = db_enc = db_dec = None
        if need_W or need_benc or need_bdec:
            xc = x if b_dec is None else x - b_dec
            # Segments per latent (reusing the decoder's sort of these indices when it ran first).
            dWt, _, s = segment_pass(indices, d_pre, xc, n, 1, R=None, per_atom=False,
                                     dr_dtype=W_enc.dtype, want_csum=True)
            if need_W:
                dW = dWt.t()  # (d, n) view of the (n, d) rows; matches an (n, d)-major W_enc without a copy
            if need_benc:
                db_enc = s.to(W_enc.dtype)
            if need_bdec:
                db_dec = -(W_enc @ s.to(W_enc.dtype)).to(b_dec.dtype)
        if need_x:
            dx = gather_sum(d_pre, indices, W_enc.t(), n_slots=1, out_dtype=x.dtype)[:, 0]
        return dx, dW, db_enc, db_dec, None, None, None, None, None
