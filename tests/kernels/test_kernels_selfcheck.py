"""The first-use check of the Triton kernels (sae/kernels/selfcheck.py): a wrong or broken kernel is
caught on its first call, warns once and hands its op to the reference (automatic choice), or stops
the run (SAE_KERNELS=triton); a correct kernel passes silently and keeps the Triton path.

Without a GPU the automatic choice never picks Triton, so these tests add "cpu" to the dispatch's
automatic devices and run the kernels in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when CUDA is absent); with a GPU they run the compiled kernels on it. Wrong kernels are the real
kernels wrapped so that their output is corrupted, or a @triton.jit kernel that cannot compile.
"""
import contextlib
import importlib.util
import warnings

import pytest
import torch

from sae.core.kernels import batch_topk_encode, binding_decode, dispatch, reference, selfcheck, sparse_decode, topk_encode
from sae.core.kernels.selfcheck import KernelCheckError, KernelCheckWarning

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton missing")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, D, N, K = 8, 16, 64, 4


@pytest.fixture(autouse=True)
def fresh_checks():
    """Every test starts with no check done, and leaves none behind (a failure it provoked must not
    send later tests of this process to the reference)."""
    selfcheck._reset()
    yield
    selfcheck._reset()


@pytest.fixture
def auto(monkeypatch):
    """The automatic backend choice, with CPU tensors taking the Triton path as CUDA tensors do."""
    monkeypatch.delenv("SAE_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_AUTO_DEVICES", ("cuda", DEV.type))
    assert dispatch.backend(torch.zeros(1, device=DEV)) == "triton"


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", "triton")


def _modules():
    return dispatch._triton(DEV)  # (triton_encode, triton_decode), imported as the dispatch does


def _spy(monkeypatch, cls, corrupt=None):
    """Count calls of cls.apply (TopKEncode or SlotDecode); `corrupt` rewrites its output."""
    real, calls = cls.apply, []

    def apply(*args):
        calls.append(1)
        out = real(*args)
        return corrupt(out) if corrupt else out

    monkeypatch.setattr(cls, "apply", apply)
    return calls


def _zero_last_row(out):
    """A plausible kernel bug (a row block never written back): the encoder's last row of values is 0."""
    values, indices = out
    values = values.clone()
    values[-1] = 0
    return values, indices


def _encode_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W = torch.randn(N, D, generator=g).t() / D**0.5  # (n, d)-major, as the models store it
    b, bd = 0.3 * torch.randn(N, generator=g), 0.3 * torch.randn(D, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (x, W, b, bd)]


def _warnings_of(fn):
    """fn's result and the KernelCheckWarnings it raised (all of them, not once per location)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, KernelCheckWarning)]


def _grads(out, inputs):
    return torch.autograd.grad((out * torch.linspace(-1, 2, out.shape[-1], device=out.device)).sum(), inputs)


# ---------------------------------------------------------------------------------------------
# (a) automatic choice + wrong kernel: one warning, then the reference for good
# ---------------------------------------------------------------------------------------------
def test_wrong_encoder_warns_once_and_the_op_stays_on_the_reference(auto, monkeypatch):
    enc, dec = _modules()
    calls = _spy(monkeypatch, enc.TopKEncode, corrupt=_zero_last_row)
    decode_calls = _spy(monkeypatch, dec.SlotDecode)
    x, W, b, bd = _encode_inputs()

    (values, indices), caught = _warnings_of(lambda: topk_encode(x, W, b, K, bd))
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "topk_encode" in msg and "values: max error" in msg and "tolerance 0.0001" in msg
    import triton

    assert f"torch {torch.__version__}" in msg and f"triton {triton.__version__}" in msg
    assert ("CUDA" in msg) if DEV.type == "cuda" else ("Triton interpreter" in msg)
    assert "\n" not in msg
    ref_values, ref_indices = reference.topk_encode(x, W, b, K, bd)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(_grads(values, [x, W, b, bd]), _grads(ref_values, [x, W, b, bd])))

    # Later calls, in this and in new configurations: no warning, no check, never the wrong kernel.
    seen = len(calls)
    x2, W2, b2, bd2 = _encode_inputs(seed=1)
    for k in (K, K + 1):
        (values, indices), caught = _warnings_of(lambda: topk_encode(x2, W2, b2, k, bd2))
        assert not caught and len(calls) == seen
        assert torch.equal(values, reference.topk_encode(x2, W2, b2, k, bd2)[0])
    # The failure belongs to topk_encode: the decoder keeps its own (passing) check and Triton.
    _, caught = _warnings_of(lambda: sparse_decode(values, indices, torch.randn(N, D, device=DEV)))
    assert not caught and decode_calls


@pytest.mark.parametrize("where,expect", [("encoder", "grad W_enc"), ("decoder", "grad W_dec")])
def test_a_wrong_backward_alone_is_caught(auto, monkeypatch, where, expect):
    """The kernels have their own backward passes: the check differentiates through them."""
    enc, dec = _modules()
    module = enc if where == "encoder" else dec
    real = module.segment_pass

    def doubled_rows(*args, **kw):
        dR, dcoef, csum = real(*args, **kw)
        return 2 * dR, dcoef, csum

    monkeypatch.setattr(module, "segment_pass", doubled_rows)
    x, W, b, bd = _encode_inputs()
    if where == "encoder":
        _, caught = _warnings_of(lambda: topk_encode(x, W, b, K, bd))
    else:
        values, indices = reference.topk_encode(x.detach(), W.detach(), b.detach(), K, bd.detach())
        _, caught = _warnings_of(lambda: sparse_decode(values, indices, torch.randn(N, D, device=DEV)))
    assert len(caught) == 1 and expect in str(caught[0].message)


@contextlib.contextmanager
def _broken_gather_kernel(monkeypatch):
    """The decoders' gather kernel replaced by one that fails to compile (a static assertion: a
    CompilationError on a GPU, an InterpreterError in the interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def broken(coef_ptr, idx_ptr, r_ptr, out_ptr, K, D, N_ATOMS, stride_rn, stride_rd, stride_ob, stride_os,
               SLOTS: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, INTERP: tl.constexpr):
        tl.static_assert(SLOTS < 0, "deliberately broken kernel")

    monkeypatch.setattr(_modules()[1], "_gather_sum_kernel", broken)
    yield


def test_a_kernel_that_does_not_compile_warns_and_falls_back(auto, monkeypatch):
    with _broken_gather_kernel(monkeypatch):
        S, n = 2, N // 2
        values, indices = torch.rand(B, K, device=DEV), torch.randint(0, n * S, (B, K), device=DEV)
        Dm, M = torch.randn(n, D, device=DEV), torch.randn(S - 1, D, D, device=DEV)
        out, caught = _warnings_of(lambda: binding_decode(values, indices, Dm, M))
        assert len(caught) == 1
        msg = str(caught[0].message)
        assert "binding_decode" in msg and "deliberately broken kernel" in msg
        assert torch.equal(out, reference.binding_decode(values, indices, Dm, M))
        _, caught = _warnings_of(lambda: binding_decode(values, indices, Dm, M))
        assert not caught


# ---------------------------------------------------------------------------------------------
# (b) SAE_KERNELS=triton + wrong kernel: a one-line error naming the op, every call
# ---------------------------------------------------------------------------------------------
def test_forced_triton_turns_a_wrong_kernel_into_an_error(forced, monkeypatch):
    enc, _ = _modules()
    _spy(monkeypatch, enc.TopKEncode, corrupt=_zero_last_row)
    x, W, b, bd = _encode_inputs()
    for _ in range(2):  # the first call runs the check; the second remembers its verdict
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelCheckWarning)  # an error, not a warning
            with pytest.raises(KernelCheckError,
                               match=r"SAE_KERNELS=triton.*batch_topk_encode.*values: max error") as e:
                batch_topk_encode(x, W, b, K, bd)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_forced_triton_turns_a_compile_error_into_an_error(forced, monkeypatch):
    with _broken_gather_kernel(monkeypatch):
        values, indices = torch.rand(B, K, device=DEV), torch.randint(0, N, (B, K), device=DEV)
        with pytest.raises(KernelCheckError, match=r"sparse_decode.*deliberately broken kernel"):
            sparse_decode(values, indices, torch.randn(N, D, device=DEV))


# ---------------------------------------------------------------------------------------------
# (c) correct kernels pass silently, whatever context the first call comes from
# ---------------------------------------------------------------------------------------------
CONTEXTS = {
    "plain": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autocast": lambda: torch.autocast(DEV.type, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_correct_kernels_pass_silently_and_keep_triton(auto, monkeypatch, context):
    enc, dec = _modules()
    enc_calls, dec_calls = _spy(monkeypatch, enc.TopKEncode), _spy(monkeypatch, dec.SlotDecode)
    x, W, b, bd = _encode_inputs()
    Dm, M = torch.randn(N // 2, D, device=DEV), torch.randn(1, D, D, device=DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)
        with CONTEXTS[context]():
            for _ in range(2):
                before = len(enc_calls), len(dec_calls)
                values, indices = topk_encode(x, W, b, K, bd)
                sparse_decode(values, indices, W.t())
                binding_decode(values, indices, Dm, M)
                batch_topk_encode(x, W, b, K, bd)
                runs = len(enc_calls) - before[0], len(dec_calls) - before[1]
                if _ == 0:
                    first = runs
    assert not selfcheck._FAILED
    assert first[0] > 2 and first[1] > 2, "the first calls ran the checks through the kernels"
    assert runs == (2, 2), "later calls run the kernels once each (Triton kept, no second check)"
    assert {op for op, _ in selfcheck._PASSED} == {"topk_encode", "sparse_decode", "binding_decode", "batch_topk_encode"}


# ---------------------------------------------------------------------------------------------
# (d) the caller's random streams, and nothing without a GPU
# ---------------------------------------------------------------------------------------------
def test_the_check_leaves_the_callers_random_stream_alone(auto):
    x, W, b, bd = _encode_inputs()
    torch.manual_seed(7)
    cpu = torch.get_rng_state()
    gpu = torch.cuda.get_rng_state() if DEV.type == "cuda" else None
    topk_encode(x, W, b, K, bd)
    assert len(selfcheck._PASSED) == 1, "the check ran"
    assert torch.equal(torch.get_rng_state(), cpu)
    if gpu is not None:
        assert torch.equal(torch.cuda.get_rng_state(), gpu)


def test_a_kernel_calling_the_op_during_its_check_does_not_recurse(auto, monkeypatch):
    """An op called while a check runs takes the reference instead of starting another check."""
    _, dec = _modules()
    real, inner = dec.SlotDecode.apply, []

    def apply(values, indices, dictionary, n_slots):
        if not inner:
            inner.append(sparse_decode(values.detach(), indices, dictionary.detach()))
        return real(values, indices, dictionary, n_slots)

    monkeypatch.setattr(dec.SlotDecode, "apply", apply)
    values, indices = torch.rand(B, K, device=DEV), torch.randint(0, N, (B, K), device=DEV)
    W = torch.randn(N, D, device=DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)
        sparse_decode(values, indices, W)
    assert len(inner) == 1 and len(selfcheck._PASSED) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_automatic_choice_on_cpu_runs_no_check(monkeypatch):
    monkeypatch.delenv("SAE_KERNELS", raising=False)
    x, W, b, bd = _encode_inputs()
    values, indices = topk_encode(x, W, b, K, bd)
    sparse_decode(values, indices, W.t())
    assert not selfcheck._PASSED and not selfcheck._FAILED
