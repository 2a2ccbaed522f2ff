"""Sparse encode/decode ops for the SAE hot path, chosen at one dispatch point.

Every op has a pure-PyTorch meaning (the reference); on CUDA the Triton kernels compute the same
thing without writing the B x n pre-activations or a B*k x d intermediate. `SAE_KERNELS=triton`
or `SAE_KERNELS=torch` forces a backend (triton on CPU runs in the Triton interpreter).

Orientation follows SAELens: W_enc (d_in, n), W_dec (n, d_in), b_enc (n,), b_dec (d_in,).
"""
from .dispatch import backend, binding_decode, sparse_decode, topk_encode

__all__ = ["backend", "topk_encode", "sparse_decode", "binding_decode"]
