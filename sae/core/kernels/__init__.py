"""Sparse encode/decode ops for the SAE hot path, chosen at one dispatch point.

Every op has a pure-PyTorch meaning (reference.py, also the CPU path); on CUDA the Triton kernels
compute the same thing without writing the B x n pre-activations or a B*k x d intermediate.
`SAE_KERNELS=triton` or `SAE_KERNELS=torch` forces a backend (triton on CPU runs in the Triton
interpreter). The first call of each kernel configuration checks the Triton path against the
reference (selfcheck.py): a mismatch or compile error warns once and sends that op to the reference
(an error under SAE_KERNELS=triton). Orientation follows SAELens: W_enc (d_in, n), W_dec (n, d_in), b_enc (n,), b_dec (d_in,).

    topk_encode(x, W_enc, b_enc, k, b_dec=None, *, groups=1) -> values (B, groups*k), indices int64
        top-k of relu((x - b_dec) @ W_enc + b_enc) per row (per group of n/groups latents when
        groups > 1); GEMM + bias + top-k fused; backward only over the B*k active pairs.
    sparse_decode(values, indices, W_dec) -> (B, d): sum_j values[b, j] W_dec[indices[b, j]], no bias.
    binding_decode(values, indices, dictionary (n, d), transforms (S-1, d, d)) -> (B, d):
        slot = index // n, atom = index % n, x_hat = y_1 + sum_{s>=2} y_s @ M_s.T.
    batch_topk_encode(x, W_enc, b_enc, k, b_dec=None, *, cap=None) -> values, indices (B, cap):
        BatchTopK (top B*k of the batch) from per-row fused top-cap candidates; values outside the
        batch top-k are 0. Exact (checked; cap grows if a row overflows).
    topk_encode_aux(x, W_enc, b_enc, k, dead, k_aux, b_dec=None) -> values, indices, aux_values, aux_indices:
        topk_encode plus AuxK's top-k_aux among the `dead` latents from the same pre-activations
        (reused on CPU; one more fused encoder over the dead columns on Triton); aux_indices index
        `dead`, so sparse_decode(aux_values, aux_indices, dead_rows) is AuxK's reconstruction.
    auxk_reconstruct(x, W_enc, b_enc, k_aux, dead, dead_rows, b_dec=None) -> (B, d), no bias:
        the same reconstruction for callers without the encoder at hand: pre-activations over the
        dead columns only, then the sparse decode.
    backend(t) -> 'triton' | 'torch'

Which call serves which architecture (x_hat = decode + b_dec in every case):
    TopK:          v, i = topk_encode(x, W_enc, b_enc, k, b_dec); x_hat = sparse_decode(v, i, W_dec) + b_dec
    BatchTopK:     v, i = batch_topk_encode(x, W_enc, b_enc, k, b_dec); same decode
    AuxK (TopK):   v, i, av, ai = topk_encode_aux(x, W_enc, b_enc, k, dead, k_aux, b_dec); x_hat as TopK;
                   e = (x - x_hat).detach(); aux = sparse_decode(av, ai, W_dec[dead])  (loss |aux - e|^2)
    Binding:       v, i = topk_encode(... n_total = S*n ...) (TopK over all slots), or with groups=S
                   (per-slot TopK), or batch_topk_encode; x_hat = binding_decode(v, i, D, M[1:]) + b_dec
    ReLU (L1), JumpReLU: no sparse kernel; their codes are not a fixed-k sparse set (dense torch ops).

The kernels read weights with any strides; on a GPU, keep W_enc stored (n, d)-major (e.g. a Parameter
made as torch.empty(n, d).t()): its columns are then contiguous rows for the sparse backward, and
the dW_enc the kernels write matches it without a transpose copy.
"""
from sae.core.kernels.dispatch import (auxk_reconstruct, backend, batch_topk_encode, binding_decode, sparse_decode,
                                      topk_encode, topk_encode_aux)
from sae.core.kernels.selfcheck import KernelCheckError, KernelCheckWarning

__all__ = ["backend", "topk_encode", "topk_encode_aux", "sparse_decode", "binding_decode", "batch_topk_encode",
           "auxk_reconstruct",
           "KernelCheckError", "KernelCheckWarning"]
