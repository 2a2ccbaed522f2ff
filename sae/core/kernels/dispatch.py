"""The one place that decides which implementation runs, and checks inputs once for both.

backend(t): 'triton' when t is on CUDA and triton is installed, 'torch' (reference.py) otherwise;
SAE_KERNELS=triton|torch forces either. Forced 'triton' on CPU tensors runs the kernels in the
Triton interpreter (TRITON_INTERPRET=1 is set here before the kernels are first imported).
float64 always takes the reference (the kernels accumulate in fp32).

The Triton path cannot be silently wrong: the first call of each kernel configuration in a process
checks it against the reference on a small random problem (selfcheck.py); after a mismatch or a
compile error the op warns once and runs on the reference, or raises under SAE_KERNELS=triton.

Inputs are validated in Python with one clear ValueError: an out-of-bounds access in a kernel
kills the interpreter process (and is an illegal address on a GPU). Index ranges cost a device sync
to check, so indices produced by topk_encode here are remembered as in range and not re-checked.
"""
import functools
import importlib.util
import os
import sys
import weakref

import torch

from sae.core.kernels import reference, selfcheck

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_LIMIT = 2**31  # kernels use 32-bit offsets into weight matrices


@functools.lru_cache(maxsize=1)
def _has_triton():
    return importlib.util.find_spec("triton") is not None


# Device types the automatic choice sends to Triton. Private seam: the self-check tests add "cpu" to
# run the automatic path (checked, warning rather than raising) through the interpreter.
_AUTO_DEVICES = ("cuda",)


def backend(t: torch.Tensor) -> str:
    forced = os.environ.get("SAE_KERNELS", "")
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"SAE_KERNELS must be 'triton' or 'torch', got {forced!r}")
    if forced:
        return forced
    return "triton" if t.device.type in _AUTO_DEVICES and _has_triton() else "torch"


# Forced Triton without a GPU means the interpreter, which must be on before triton is first imported
# (torch imports triton itself, e.g. when an optimizer is built): switch it on as early as possible.
if os.environ.get("SAE_KERNELS") == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton(device):
    """Import the Triton-path modules lazily (importing sae.core.kernels must not need triton)."""
    if device.type != "cuda" and "sae.core.kernels.triton_decode" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from sae.core.kernels import triton_decode, triton_encode  # noqa: PLC0415 (import triton: only on this path)

    if device.type != "cuda":
        import triton.language as tl  # noqa: PLC0415 (optional dependency, checked here)

        std = getattr(getattr(tl, "standard", None), "max", None)
        if not triton_decode.INTERPRET or (std is not None and type(std).__name__ != "InterpretedFunction"):
            raise ValueError("Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before "
                             "triton is first imported (torch imports it, e.g. when an optimizer is created)")
    return triton_encode, triton_decode


def _use_triton(*tensors):
    t = tensors[0]
    return backend(t) == "triton" and all(x is None or x.dtype != torch.float64 for x in tensors)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _fail(msg):
    raise ValueError(msg)


def _check_tensor(name, t, ndim, dtypes, device=None):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        _fail(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        _fail(f"{name} is on {t.device} but the other inputs are on {device}")


def _check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(f"{name} must be an int, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        _fail(f"{name}={v} is out of range [{lo}, {hi}]")


def _check_encode(x, W_enc, b_enc, k, b_dec, groups):
    _check_tensor("x", x, 2, _FLOATS)
    dev = x.device
    _check_tensor("W_enc", W_enc, 2, _FLOATS, dev)
    d, n = W_enc.shape
    if x.shape[1] != d:
        _fail(f"x has {x.shape[1]} features but W_enc is (d_in={d}, n={n}) (SAELens orientation: W_enc (d_in, n))")
    _check_tensor("b_enc", b_enc, 1, _FLOATS, dev)
    if b_enc.shape[0] != n:
        _fail(f"b_enc has shape {tuple(b_enc.shape)}, expected ({n},)")
    if b_dec is not None:
        _check_tensor("b_dec", b_dec, 1, _FLOATS, dev)
        if b_dec.shape[0] != d:
            _fail(f"b_dec has shape {tuple(b_dec.shape)}, expected ({d},)")
    _check_int("groups", groups, 1)
    if n % groups:
        _fail(f"groups={groups} must divide the number of latents n={n}")
    _check_int("k", k, 1, n // groups)
    if not torch.is_autocast_enabled(dev.type):
        dtypes = {t.dtype for t in (x, W_enc, b_enc, b_dec) if t is not None}
        if len(dtypes) > 1:
            _fail(f"x, W_enc, b_enc, b_dec must share a dtype outside autocast, got {sorted(map(str, dtypes))}")


def _check_decode(values, indices, W, what="W_dec", n_valid=None):
    _check_tensor("values", values, 2, _FLOATS)
    dev = values.device
    _check_tensor("indices", indices, 2, (torch.int64, torch.int32), dev)
    _check_tensor(what, W, 2, _FLOATS, dev)
    if values.shape != indices.shape:
        _fail(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have the same (B, k) shape")
    n_valid = W.shape[0] if n_valid is None else n_valid
    if indices.numel() and not _trusted(indices, n_valid):
        lo, hi = torch.aminmax(indices)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n_valid:
            _fail(f"indices must lie in [0, {n_valid}) for {what} with {W.shape[0]} rows, found [{lo}, {hi}]")


# Index tensors this module produced, with the bound they are known to respect.
_TRUSTED = {}


def _trust(indices, bound):
    if indices.is_inference():  # no version counter to tell later in-place edits: always check
        return indices
    key = id(indices)
    _TRUSTED[key] = (weakref.ref(indices, lambda _r, key=key: _TRUSTED.pop(key, None)), indices._version, bound)
    return indices


def _trusted(indices, n_valid):
    if indices.is_inference():
        return False
    entry = _TRUSTED.get(id(indices))
    return (entry is not None and entry[0]() is indices and entry[1] == indices._version
            and entry[2] <= n_valid)


def _compute_dtype(x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------
def topk_encode(x, W_enc, b_enc, k, b_dec=None, *, groups=1, _chunk=None):
    """values, indices (B, groups*k): top-k over latents of relu((x - b_dec) @ W_enc + b_enc), per row.

    groups > 1 takes the top-k within each of `groups` consecutive blocks of n/groups latents
    (per-slot TopK of a binding SAE); indices are global (0..n-1), values >= 0, indices int64.
    Differentiable w.r.t. x, W_enc, b_enc, b_dec; the backward touches only the B*k active pairs.
    Under autocast the GEMM runs in the autocast dtype (operands cast in-kernel) and values come
    back in it. `_chunk` (tests only) sets the column-chunk width of the fused kernel."""
    _check_encode(x, W_enc, b_enc, k, b_dec, groups)
    values, indices = _encode("topk_encode", x, W_enc, b_enc, k, b_dec, groups, _chunk)
    return values, _trust(indices, W_enc.shape[1])


def _encode(op, x, W_enc, b_enc, k, b_dec, groups, chunk=None):
    """The encoder of topk_encode and batch_topk_encode; `op` names whose first-use check and
    fallback apply (each op keeps its own)."""
    if _use_triton(x, W_enc, b_enc, b_dec):
        if W_enc.numel() >= _INT32_LIMIT or x.numel() >= _INT32_LIMIT:
            _fail("the Triton path supports tensors of fewer than 2**31 elements")
        cdt = _compute_dtype(x)
        dev = x.device
        spec = selfcheck.EncodeSpec(
            dev, x.dtype, W_enc.dtype, b_enc.dtype, None if b_dec is None else b_dec.dtype, cdt,
            dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,  # what dot_code reads
            W_enc.stride(-1) != 1, x.shape[1], k, groups)
        if selfcheck.passes(op, spec, _encode_triton):
            return _encode_triton(x, W_enc, b_enc, b_dec, k, groups, cdt, chunk)
    return reference.topk_encode(x, W_enc, b_enc, k, b_dec, groups)


def _encode_triton(x, W_enc, b_enc, b_dec, k, groups, compute_dtype, chunk):
    """The Triton encoder; compute_dtype is explicit so the self-check (run outside autocast) can
    reproduce a call made under autocast."""
    enc, _ = _triton(x.device)
    return enc.TopKEncode.apply(x, W_enc, b_enc, b_dec, k, groups, compute_dtype, compute_dtype, chunk)


def _slot_decode_triton(values, indices, dictionary, n_slots):
    """Y (B, S, d): the Triton part of both decoders."""
    _, dec = _triton(values.device)
    return dec.SlotDecode.apply(values, indices, dictionary, n_slots)


def _decode_on_triton(op, values, indices, dictionary, n_slots):
    """True when `op` runs on Triton: the dispatch chose it and its first-use check passed."""
    if not _use_triton(values, dictionary):
        return False
    spec = selfcheck.DecodeSpec(values.device, values.dtype, indices.dtype, dictionary.dtype,
                                dictionary.stride(-1) != 1, n_slots, indices.shape[1], dictionary.shape[1])
    return selfcheck.passes(op, spec, _slot_decode_triton)


def sparse_decode(values, indices, W_dec):
    """(B, d) = sum_j values[b, j] * W_dec[indices[b, j]] (no bias); dtype promote(values, W_dec).

    Differentiable w.r.t. values and W_dec; the Triton backward sorts pairs by latent once and
    writes dW_dec and d values in one pass."""
    _check_decode(values, indices, W_dec)
    if _decode_on_triton("sparse_decode", values, indices, W_dec, 1):
        return _slot_decode_triton(values, indices, W_dec, 1)[:, 0]
    return reference.sparse_decode(values, indices, W_dec)


def binding_decode(values, indices, dictionary, transforms):
    """Matrix-binding decode: slot s = index // n, atom = index % n, y_s = sparse decode of slot s
    against the shared dictionary D (n, d); x_hat = y_1 + sum_{s>=2} y_s @ M_s.T, transforms (S-1, d, d).

    The S sparse decodes run as one gather-sum launch (and one segment pass backward) against D;
    the slot transforms are one GEMM over the stacked slots, never materialising M_s D."""
    _check_tensor("transforms", transforms, 3, _FLOATS, values.device)
    n, d = dictionary.shape
    S = transforms.shape[0] + 1
    if transforms.shape[1:] != (d, d):
        _fail(f"transforms must be (S-1, d, d) = (S-1, {d}, {d}), got {tuple(transforms.shape)}")
    _check_decode(values, indices, dictionary, what="dictionary", n_valid=n * S)
    if _decode_on_triton("binding_decode", values, indices, dictionary, S):
        Y = _slot_decode_triton(values, indices, dictionary, S)
    else:
        Y = reference.slot_decode(values, indices, dictionary, S)
    return reference.combine_slots(Y, transforms)


def batch_topk_encode(x, W_enc, b_enc, k, b_dec=None, *, cap=None):
    """BatchTopK: keep the B*k largest relu pre-activations of the whole batch.

    Returns values, indices (B, cap): each row's top-`cap` candidates from the fused encoder, with
    the values of candidates outside the batch's top B*k set to 0 (sparse_decode skips them).
    Exact as long as no row has more than `cap` latents in the batch top-k; that is checked (one
    device sync) and cap is doubled until it holds. cap defaults to min(n, 4k)."""
    _check_encode(x, W_enc, b_enc, k, b_dec, 1)
    B, n = x.shape[0], W_enc.shape[1]
    cap = min(n, 4 * k) if cap is None else cap
    _check_int("cap", cap, k, n)
    while True:
        values, indices = _encode("batch_topk_encode", x, W_enc, b_enc, cap, b_dec, 1)
        flat = values.detach().reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(min(B * k, flat.numel()), sorted=False).indices] = True
        keep = keep.view(B, cap)
        if cap == n:
            break
        # A row whose smallest candidate is selected (and positive) may have lost latents past cap.
        row_min, at = values.detach().min(dim=1, keepdim=True)
        if not bool((keep.gather(1, at) & (row_min > 0)).any()):
            break
        cap = min(n, 2 * cap)
    values = values * keep.to(values.dtype)
    return values, _trust(indices, n)


# The fused encoder keeps its running top-k in registers: past this k (AuxK's k_aux = d/2 at large d)
# the aux selection takes cuBLAS + torch.topk over the dead columns instead.
_FUSED_MAX_K = 512


def _check_aux(x, W_enc, dead, k_aux):
    _check_tensor("dead", dead, 1, (torch.int64,), x.device)
    _check_int("k_aux", k_aux, 1)
    if dead.numel() and not _trusted(dead, W_enc.shape[1]):
        lo, hi = torch.aminmax(dead)
        if int(lo) < 0 or int(hi) >= W_enc.shape[1]:
            _fail(f"dead latent ids must lie in [0, {W_enc.shape[1]})")


def _dead_columns(W_enc, b_enc, dead):
    """W_enc's columns and b_enc's entries of the dead latents, differentiable (an (n, d)-major
    W_enc gives an (m, d)-major block, the layout the kernels' backward wants)."""
    return W_enc.t().index_select(0, dead).t(), b_enc.index_select(0, dead)


def _aux_select(x, W_enc, b_enc, b_dec, k_aux, dead):
    """values, indices into `dead` (B, k_aux): top-k_aux relu pre-activations among the dead latents,
    recomputed over their columns only (one GEMM over m latents), fused with the top-k on Triton."""
    W_dead, b_dead = _dead_columns(W_enc, b_enc, dead)
    if k_aux <= _FUSED_MAX_K:
        values, indices = _encode("topk_encode", x, W_dead, b_dead, k_aux, b_dec, 1)
    else:
        values, indices = reference.topk_encode(x, W_dead, b_dead, k_aux, b_dec)
    return values, _trust(indices, dead.shape[0])


def topk_encode_aux(x, W_enc, b_enc, k, dead, k_aux, b_dec=None):
    """topk_encode and AuxK's selection in one call: values, indices (B, k) as topk_encode, plus
    aux_values, aux_indices (B, min(k_aux, m)): the top-k_aux relu pre-activations among the latents
    `dead` (int64 ids (m,)), with aux_indices indexing `dead` (0..m-1), so that
    sparse_decode(aux_values, aux_indices, dead_rows) is AuxK's reconstruction.

    CPU: the pre-activations the encoder computes anyway are reused (no second GEMM); one backward
    covers both sets of pairs. Triton (the fused encoder never writes pre-activations): a second
    fused encoder over the dead columns only. Gradients of the aux values reach W_enc and b_enc
    in the dead latents' columns, and b_dec."""
    _check_encode(x, W_enc, b_enc, k, b_dec, 1)
    _check_aux(x, W_enc, dead, k_aux)
    k_eff = min(k_aux, dead.numel())
    n = W_enc.shape[1]
    if k_eff == 0 or _use_triton(x, W_enc, b_enc, b_dec):
        values, indices = _encode("topk_encode", x, W_enc, b_enc, k, b_dec, 1)
        if k_eff == 0:
            empty = values.new_zeros((x.shape[0], 0))
            return values, _trust(indices, n), empty, _trust(indices.new_zeros((x.shape[0], 0)), 0)
        aux_values, aux_indices = _aux_select(x, W_enc, b_enc, b_dec, k_eff, dead)
        return values, _trust(indices, n), aux_values, aux_indices
    values, indices, aux_values, aux_indices = reference.topk_encode_aux(x, W_enc, b_enc, k, b_dec, dead, k_eff)
    return values, _trust(indices, n), aux_values, _trust(aux_indices, dead.shape[0])


def auxk_reconstruct(x, W_enc, b_enc, k_aux, dead, dead_rows, b_dec=None):
    """AuxK (dead-latent auxiliary loss of TopK SAEs): the reconstruction (B, d), no bias, from the
    top-k_aux relu pre-activations among the `dead` latents (int64 ids (m,)), decoded with their
    decoder rows `dead_rows` (m, d). Taking the rows, not W_dec, lets a structured SAE pass rows it
    derives (and decide where their gradient goes) without materialising its whole decoder.

    For callers without the encoder's pre-activations at hand (topk_encode_aux reuses them): the
    pre-activations are recomputed over the dead columns only (one GEMM over m latents, fused with
    the top-k on Triton), and the codes are decoded sparsely (sparse_decode: gather-sum forward,
    sorted segment backward). Gradients reach W_enc, b_enc, W_dec (and b_dec) for the dead latents only.
    """
    _check_encode(x, W_enc, b_enc, 1, b_dec, 1)
    _check_aux(x, W_enc, dead, k_aux)
    _check_tensor("dead_rows", dead_rows, 2, _FLOATS, x.device)
    if dead_rows.shape != (dead.shape[0], W_enc.shape[0]):
        _fail(f"dead_rows must be (len(dead), d_in) = {(dead.shape[0], W_enc.shape[0])}, got {tuple(dead_rows.shape)}")
    k_eff = min(k_aux, dead.numel())
    if k_eff == 0:
        return x.new_zeros(x.shape, dtype=torch.promote_types(_compute_dtype(x), dead_rows.dtype))
    if _use_triton(x, W_enc, b_enc, b_dec):
        values, indices = _aux_select(x, W_enc, b_enc, b_dec, k_eff, dead)
    else:
        W_dead, b_dead = _dead_columns(W_enc, b_enc, dead)
        values, indices = reference.topk_encode(x, W_dead, b_dead, k_eff, b_dec)
        indices = _trust(indices, dead.shape[0])
    return sparse_decode(values, indices, dead_rows)
