"""First use of a Triton kernel in a process: check it against the PyTorch reference, once.

Why: the kernels were written and tested in the Triton interpreter, which runs programs one after
another in NumPy and never meets the GPU compiler, tf32, real bf16 arithmetic or races. So the first
call of each kernel configuration runs a small random problem through the same Triton path, forward
and backward, and compares it with reference.py evaluated in float64 on the CPU on the very values
the kernel saw. On a mismatch or any exception (compile, launch) the op warns once
(KernelCheckWarning: the op, what went wrong, the versions) and takes the reference for the rest of
the process; under SAE_KERNELS=triton it raises KernelCheckError (a ValueError: one line in the CLI).

What "each kernel configuration" is (the cache key): the op, the device, and every call parameter
that selects a different compiled kernel or launch configuration: the dtypes of the inputs and of
the compute (autocast, tf32), k (next_pow2(k) is a constexpr and picks the tile sizes), groups or
slots, d (the decoder's row tile is next_pow2(d)), whether b_dec is given, and the weight layout
(stride-1 arguments are specialised). Not the batch or the latent count: those are runtime
integers. The check problem reuses these parameters, so on a GPU it compiles (and caches) the
kernels with the constexprs and dtypes the call will use, and runs them with B = 16 and a few
hundred latents: milliseconds once compiled.
A model has one such configuration per op (BatchTopK one more per doubling of its cap).
In the interpreter (forced Triton on CPU: tests) k, d and the layout drop out of the key, see
_interpreted.

Tolerance: err = max|out - ref| / max|ref| for each output and each input gradient. Every kernel
accumulates in fp32; all-fp32 inputs give ~1e-6 over a few thousand terms, so 1e-4; tf32 operands
(10-bit mantissa) and fp16 storage 4e-3; bf16 storage or compute (8-bit mantissa, ~2e-3 per rounding,
a few roundings chained) 3e-2. A wrong row, index, race or unwritten output gives errors of order 1.
Top-k selection is compared as sorted pre-activations, so a near-tie resolved the other way passes.

The check draws its inputs from a private generator under fork_rng (the caller's random streams do
not move), runs outside the caller's autocast, inference_mode and no_grad, leaves the pair-sort
cache as it found it, and never recurses: an op called while a check runs takes the reference.
"""
import contextlib
import math
import os
import threading
import warnings
from typing import NamedTuple, Optional

import torch

from sae.core.kernels import reference
from sae.core.kernels.pairs import CACHE

_B = 16  # batch of the check problem; a multiple of 16, as training batches are (ints are specialised on it)
_SEED = 20240917
_TOL = {torch.float32: 1e-4, "tf32": 4e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class KernelCheckError(ValueError):
    """SAE_KERNELS=triton and a Triton kernel failed its first-use check."""


class KernelCheckWarning(RuntimeWarning):
    """A Triton kernel failed its first-use check; its op now runs on the PyTorch reference."""


class EncodeSpec(NamedTuple):
    device: torch.device
    x: torch.dtype
    w: torch.dtype
    b_enc: torch.dtype
    b_dec: Optional[torch.dtype]
    compute: torch.dtype
    tf32: bool
    w_t: bool  # W_enc not row-contiguous (stored (n, d)-major, as the models keep it)
    d: int
    k: int
    groups: int


class DecodeSpec(NamedTuple):
    device: torch.device
    values: torch.dtype
    indices: torch.dtype
    weights: torch.dtype
    w_t: bool
    slots: int
    k: int
    d: int


class _Mismatch(Exception):
    """A structural failure (wrong indices, shapes): the message is the reason."""


_PASSED = set()  # (op, spec) that matched the reference
_FAILED = {}  # op -> (one-line reason, exception or None): the op takes the reference from then on
_WARNED = set()
_LOCK = threading.RLock()
_LOCAL = threading.local()  # .busy: this thread is running a check


def passes(op, spec, run):
    """True when `op` may use its Triton path for calls described by `spec`; runs the check the first
    time. `run` is the dispatch's Triton path: run(x, W_enc, b_enc, b_dec, k, groups, compute, chunk)
    for an EncodeSpec, run(values, indices, dictionary, slots) -> (B, slots, d) for a DecodeSpec.
    Returns False (take the reference) after a failure; raises KernelCheckError if SAE_KERNELS=triton."""
    if spec.device.type != "cuda":
        spec = _interpreted(spec)
    key = (op, spec)
    if key in _PASSED:  # the hot path: one set lookup per call
        return True
    with _LOCK:
        if getattr(_LOCAL, "busy", False):
            return False  # called from inside a check: never recurse, never run an unchecked kernel
        if op not in _FAILED and key not in _PASSED:
            _LOCAL.busy = True
            try:
                reason, exc = _run_check(spec, run)
            finally:
                _LOCAL.busy = False
            if reason is None:
                _PASSED.add(key)
            else:
                _FAILED[op] = (f"{reason} [{versions(spec.device)}]", exc)
                _PASSED.difference_update([p for p in _PASSED if p[0] == op])
        if op not in _FAILED:
            return True
    return _fallback(op)


def _interpreted(spec):
    """The interpreter compiles nothing: every k, d and layout runs the same NumPy code, and only the
    dtypes pick different branches (its bf16/fp16 emulation). So there a check is per dtypes (and
    groups, slots, b_dec) on a fixed tiny problem: the tests that force Triton stay fast."""
    return spec._replace(k=4, d=16, w_t=False)


def _fallback(op):
    reason, exc = _FAILED[op]
    what = f"the Triton kernel of {op} failed its first-use check against the PyTorch reference: {reason}"
    if os.environ.get("SAE_KERNELS") == "triton":
        raise KernelCheckError(f"SAE_KERNELS=triton, but {what}; unset SAE_KERNELS to run {op} on the "
                               "reference instead") from exc
    if op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(f"sae.core.kernels: {what}. {op} runs on the PyTorch reference for the rest of this process "
                      "(SAE_KERNELS=torch chooses it without the check).",
                      KernelCheckWarning, stacklevel=5)  # points at the caller of the op
    return False


def versions(device):
    try:
        import triton  # noqa: PLC0415 (optional: this reports whether it imports at all)

        tv = triton.__version__
    except Exception as e:  # the check may have failed because triton does not import
        tv = f"not importable ({type(e).__name__})"
    if device.type != "cuda":
        return f"torch {torch.__version__}, triton {tv}, {device.type}, Triton interpreter"
    try:
        name = torch.cuda.get_device_name(device)
    except Exception:  # a failed launch can leave the device unusable: the versions still matter
        name = "device name unavailable"
    return f"torch {torch.__version__}, triton {tv}, CUDA {torch.version.cuda}, {name}"


def _reset():
    """Forget every check (tests only)."""
    with _LOCK:
        _PASSED.clear()
        _FAILED.clear()
        _WARNED.clear()


# ---------------------------------------------------------------------------------------------
# running one check
# ---------------------------------------------------------------------------------------------
def _run_check(spec, run):
    """(None, None) when the Triton path matches the reference, else (one line saying why, exception)."""
    check = _check_encode if isinstance(spec, EncodeSpec) else _check_decode
    try:
        with _clean_context(spec.device):
            errors, tol, problem = check(spec, run)
    except _Mismatch as e:
        return str(e), None
    except Exception as e:  # compile, launch or shape errors of the Triton path
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        tail = f" ... {lines[-1]}" if len(lines) > 1 else ""  # a CompilationError's first line is only "at l:c:"
        return f"{type(e).__name__}: {lines[0][:200]}{tail[:200]}", e.with_traceback(None)
    bad = [(what, err) for what, err in errors if not err <= tol]  # NaN-safe
    if not bad:
        return None, None
    (what, err), also = bad[0], "".join(f", {w} {e:.3g}" for w, e in bad[1:4])  # forward first: the cause
    return f"{what}: max error {err:.3g} > tolerance {tol:g}{also} ({problem})", None


@contextlib.contextmanager
def _clean_context(device):
    """No caller autocast, inference_mode or no_grad; random streams and the pair-sort cache restored."""
    saved = list(CACHE.entries)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            yield
    finally:
        CACHE.entries = saved


def _err(got, want):
    """max|got - want| / max|want| in float64; inf for a wrong shape or a NaN."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    e = (got - want).abs().max().item() / (want.abs().max().item() or 1.0)
    return e if math.isfinite(e) else math.inf


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _tol(dtypes, tf32=False):
    return max([_TOL[dt] for dt in dtypes if dt in _TOL] + [_TOL["tf32"] if tf32 else 0.0])


def _on(t, dtype, device, transposed=False):
    """t rounded to dtype on device, requiring grad; transposed: stored column-major (same values)."""
    if transposed:
        return t.t().contiguous().to(device=device, dtype=dtype).requires_grad_().t()
    return t.to(device=device, dtype=dtype).requires_grad_()


def _f64(t):
    """A float64 CPU leaf holding exactly the values the kernel saw."""
    return None if t is None else t.detach().cpu().double().requires_grad_()


def _grads(out, inputs, d_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, d_out)


# ---------------------------------------------------------------------------------------------
# the check problems
# ---------------------------------------------------------------------------------------------
def _group_width(s):
    """Latents per group, at least k. On a GPU two chunks of at least one column tile each (the widest
    tile is 128 columns), so that chunk = width / 2 takes the merge kernel with the call's tile
    sizes. The interpreter runs the backward's one program per latent serially: as few as it can
    there (two chunks of at least the narrowest tile, 16 columns; a chunk may hold fewer than k)."""
    if s.device.type == "cuda":
        return max(2 * (1 << max(s.k - 1, 0).bit_length()), 256)
    return max(-(-s.k // 16) * 16, 32)


def _check_encode(s, run):
    g = torch.Generator().manual_seed(_SEED)
    ng, G, k, d = _group_width(s), s.groups, s.k, s.d
    n = G * ng
    # Rows from small to large norm and a negative bias: the first rows select zeros (relu'd
    # latents, which must pass no gradient), the last mostly positive values.
    x0 = torch.randn(_B, d, generator=g) * torch.linspace(0.1, 2, _B)[:, None]
    W0 = torch.randn(d, n, generator=g) / max(d, 1) ** 0.5
    b0, bd0 = 0.3 * torch.randn(n, generator=g) - 1.0, 0.3 * torch.randn(d, generator=g)
    dv0 = torch.randn(_B, G * k, generator=g)
    ins = [_on(x0, s.x, s.device), _on(W0, s.w, s.device, s.w_t), _on(b0, s.b_enc, s.device),
           None if s.b_dec is None else _on(bd0, s.b_dec, s.device)]
    x, W, b, bd = ins
    ref = [_f64(t) for t in ins]
    pre = reference.preactivations(*ref[:2], ref[2], ref[3])
    with torch.no_grad():
        best, _ = reference.topk_encode(*(None if t is None else t.detach() for t in ref[:3]), k,
                                        None if ref[3] is None else ref[3].detach(), G)
    # Both launch paths, whichever the call's batch size picks: several column chunks per group and
    # the merge kernel (with the backward), then one chunk per group writing the result directly.
    values, indices = run(x, W, b, bd, k, G, s.compute, ng // 2)
    errors, chosen = _encode_forward(values, indices, pre, best, s, ng, "")
    dv = dv0.to(s.device, values.dtype)
    got = _grads(values, ins, dv)
    # The gradient of the kernel's own selection and relu mask: a pre-activation within rounding of 0
    # may be kept by one side and zeroed by the other (the forward check bounds that difference).
    want = _grads(chosen * (values.detach().cpu() > 0), ref, dv.cpu().double())
    names = ["x", "W_enc", "b_enc", "b_dec"][:len(got)]
    errors += [(f"grad {nm}", _err(a, b_)) for nm, a, b_ in zip(names, got, want)]
    with torch.no_grad():
        errors += _encode_forward(*run(x, W, b, bd, k, G, s.compute, ng), pre, best, s, ng, "one-chunk ")[0]
    problem = f"B={_B}, d={d}, n={n}, k={k}, groups={G}, x {_name(s.x)}, W_enc {_name(s.w)}, compute {_name(s.compute)}"
    problem += ", tf32" if s.tf32 else ""
    return errors, _tol([s.x, s.w, s.b_enc, s.b_dec, s.compute], s.tf32 and s.compute == torch.float32), problem


def _encode_forward(values, indices, pre, best, s, ng, tag):
    """Errors of one encoder forward, and the float64 pre-activations at its indices. The indices must
    be a top-k of each group: compared as sorted pre-activations, so a near-tie resolved the other way
    still passes, while a wrong latent shows up as a wrong value."""
    G, k = s.groups, s.k
    idx = indices.detach().cpu()
    if idx.shape != (_B, G * k) or idx.dtype != torch.int64:
        raise _Mismatch(f"{tag}indices have shape {tuple(idx.shape)} and dtype {idx.dtype}, expected "
                        f"{(_B, G * k)} int64")
    grouped = idx.view(_B, G, k)
    lo = torch.arange(G).view(1, G, 1) * ng
    if not ((grouped >= lo) & (grouped < lo + ng)).all():
        raise _Mismatch(f"{tag}indices outside their group (B={_B}, n={G * ng}, k={k}, groups={G})")
    if (grouped.sort(-1).values.diff(dim=-1) == 0).any():
        raise _Mismatch(f"{tag}indices repeat a latent within a row (B={_B}, n={G * ng}, k={k}, groups={G})")
    chosen = pre.gather(1, idx)
    truth = chosen.detach().relu()
    errors = [(f"{tag}values", _err(values, truth)),
              (f"{tag}selection", _err(truth.view(_B, G, k).sort(-1).values, best.view(_B, G, k).sort(-1).values))]
    return errors, chosen


def _check_decode(s, run):
    g = torch.Generator().manual_seed(_SEED)
    S, k, d = s.slots, s.k, s.d
    # 16 atoms per slot: the backward runs one program per atom (serially in the interpreter). Indices
    # are unique per row, as the encoders produce them, until k > 16 S; then each repeats at most
    # ceil(k / 16 S) times (the kernels sum repeats, as the reference does).
    n = 16
    idx = torch.rand(_B, max(n * S, k), generator=g).argsort(1)[:, :k] % (n * S)
    v0 = torch.randn(_B, k, generator=g)
    v0[torch.rand(_B, k, generator=g) < 0.25] = 0  # zero values (relu'd, BatchTopK) take a skip path
    D0, dY = torch.randn(n, d, generator=g), torch.randn(_B, S, d, generator=g)
    values, D = _on(v0, s.values, s.device), _on(D0, s.weights, s.device, s.w_t)
    Y = run(values, idx.to(device=s.device, dtype=s.indices), D, S)
    dY = dY.to(s.device, Y.dtype)  # the reference gets the same rounded output gradient
    got = _grads(Y, [values, D], dY)
    v64, D64 = _f64(values), _f64(D)
    Y64 = reference.slot_decode(v64, idx, D64, S) if S > 1 else reference.sparse_decode(v64, idx, D64)[:, None]
    want = _grads(Y64, [v64, D64], dY.cpu().double())
    weights = "W_dec" if S == 1 else "dictionary"
    errors = [("output", _err(Y, Y64)), ("grad values", _err(got[0], want[0])),
              (f"grad {weights}", _err(got[1], want[1]))]
    problem = f"B={_B}, d={d}, n={n}, k={k}, slots={S}, values {_name(s.values)}, {weights} {_name(s.weights)}"
    return errors, _tol([s.values, s.weights]), problem
