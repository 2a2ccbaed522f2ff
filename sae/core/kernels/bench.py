"""Benchmark of the sparse kernels against the baselines, side by side in one process, correctness-gated.

    python -m sae.core.kernels.bench                         # the kernels.md grid on a GPU (new sizes start within 7 min)
    python -m sae.core.kernels.bench --d 768 --ratio 32 --k 32
    python -m sae.core.kernels.bench --smoke                 # tiny CPU run of the torch paths (CI)

Per size (B tokens, d = d_in, n = ratio * d latents, k active), with fp32 master weights, bf16 autocast
and fused Adam for every variant:
    naive     dense eager: GEMM, bias, ReLU, top-k, scatter into B x n zeros, dense decode GEMM
    compiled  the same under torch.compile (at --compile sizes: compiling costs ~1 min per size)
    ebag      dense encoder + top-k, F.embedding_bag decoder (sparsify's decoder, autograd backward)
    ours      sae.core.kernels: fused GEMM+top-k encoder, sparse decode, sorted one-pass backward
    binding   ours with a 2-slot binding decoder at the same latent count (n/2 atoms, one d x d map)
    floor     encoder GEMM alone (cuBLAS, bf16) + Adam alone: what no sparse step can beat
Phases: encoder forward, decoder forward, forward+backward, Adam, full step (ms); the encoder's
TFLOP/s; GB/s of the three sparse kernels on the bytes they must move (compulsory traffic: unique
rows gathered, gradient rows written, inputs read once) against the measured device-copy bandwidth;
activation memory (peak during forward+backward above weights, grads and optimiser state). AuxK:
the library's sparse path (fused top-k over the dead columns, sparse decode) against the dense GEMMs
over the dead columns it replaced. Every size first
checks ours against fp32 references at full size; a failed gate marks the row and the exit status.
The targets of the issue are checked at the end, after the table.
"""
import argparse
import contextlib
import datetime
import gc
import importlib.metadata as md
import importlib.util
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sae.core.kernels import reference
from sae.core.kernels.pairs import CACHE
from sae.core.kernels.dispatch import auxk_reconstruct, backend, binding_decode, sparse_decode, topk_encode

GRID_D = (768, 2048, 4096)
GRID_RATIO = (16, 32)
GRID_K = (32, 64, 128)
HEADLINE = {(768, 32, 32), (2048, 32, 64), (4096, 32, 32)}  # the kernels.md model rows


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device, grad_to_none=None, rep_ms=100):
    """Median milliseconds of fn(). GPU: triton.testing.do_bench (L2 flushed between calls)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench  # noqa: PLC0415 (triton is optional; only on a GPU)

            return float(do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))
        except (ImportError, TypeError, AssertionError):  # a triton without return_mode="median"
            return _cuda_event_ms(fn, grad_to_none, rep_ms)
    fn()  # CPU (smoke mode): a few wall-clock runs
    times = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_event_ms(fn, grad_to_none, rep_ms):
    fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < t_end:
        for t in grad_to_none or ():
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def activation_bytes(fwd_bwd, params, device):
    """Peak memory of one forward+backward above what was allocated before it (weights, optimiser
    state and preallocated grads): the activations and temporaries of the step."""
    if device.type != "cuda":
        return float("nan")
    for p in params:
        p.grad = torch.zeros_like(p)
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - base
    for p in params:
        p.grad = None
    return float(peak)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device):
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer: the practical HBM peak."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(2**28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    return 2 * a.numel() * 4 / ms / 1e6


# ---------------------------------------------------------------------------------------------
# the variants
# ---------------------------------------------------------------------------------------------
class Setup:
    """Weights, optimiser and input batches of one variant at one size."""

    def __init__(self, B, d, n, k, device, seed=0, binding_slots=0):
        g = torch.Generator(device=device).manual_seed(seed)  # generated on the device: fast at n*d = 5e8
        self.B, self.d, self.n, self.k, self.device = B, d, n, k, device
        W = torch.randn(n, d, generator=g, device=device) / d**0.5
        # W_enc is kept (n, d)-major for ours (its columns are rows for the sparse backward); the
        # dense baselines use the usual (d, n) layout. Same numbers either way.
        self.W_enc_nd = W.clone().requires_grad_()
        self.b_enc = torch.zeros(n, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, device=device, requires_grad=True)
        if binding_slots:
            S = binding_slots
            self.D = W[: n // S].clone().requires_grad_()
            eye = torch.eye(d, device=device).expand(S - 1, d, d)
            self.M = (eye + torch.randn(S - 1, d, d, generator=g, device=device) / d).requires_grad_()
            self.params = [self.W_enc_nd, self.b_enc, self.b_dec, self.D, self.M]
        else:
            self.W_dec = W.clone().requires_grad_()
            self.params = [self.W_enc_nd, self.b_enc, self.b_dec, self.W_dec]
        del W
        self.xs = [torch.randn(B, d, generator=g, device=device) for _ in range(3)]  # rotated input sets
        self.step_i = 0
        self.opt = make_adam(self.params, device)

    def x(self):
        self.step_i += 1
        return self.xs[self.step_i % len(self.xs)]

    @property
    def W_enc(self):
        return self.W_enc_nd.t()


def make_adam(params, device):
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=device.type == "cuda")
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, foreach=True)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def mse(x_hat, x):
    return (x_hat.float() - x).pow(2).sum(-1).mean()


class Naive:
    """Dense eager TopK SAE step: the B x n pre-activations, a top-k, a dense B x n code matrix."""

    name = "naive"

    def __init__(self, s: Setup):
        self.s = s
        self.W_enc_dn = s.W_enc_nd.detach().t().contiguous().requires_grad_()  # (d, n) layout
        s.params[0] = self.W_enc_dn
        s.opt = make_adam(s.params, s.device)

    def encode(self, x):
        s = self.s
        pre = (x - s.b_dec) @ self.W_enc_dn + s.b_enc
        top = pre.topk(s.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, codes):
        return codes @ self.s.W_dec + self.s.b_dec

    def loss(self, x):
        with autocast(self.s.device):
            return mse(self.decode(self.encode(x)), x)


class Compiled(Naive):
    """Naive under torch.compile: the loss (forward, and its backward through AOTAutograd). The
    encoder/decoder-only phases are not compiled separately and are not reported."""

    name = "compiled"
    skip = ("enc", "dec")

    def __init__(self, s):
        super().__init__(s)
        self.loss = torch.compile(Naive.loss.__get__(self))


class EmbeddingBag(Naive):
    """Dense encoder + top-k, decoder as an embedding bag over the k active rows."""

    name = "ebag"

    def encode(self, x):
        s = self.s
        pre = (x - s.b_dec) @ self.W_enc_dn + s.b_enc
        top = pre.topk(s.k, dim=-1, sorted=False)
        return top.values.relu(), top.indices

    def decode(self, codes):
        values, indices = codes
        return F.embedding_bag(indices, self.s.W_dec, per_sample_weights=values.to(self.s.W_dec.dtype),
                               mode="sum") + self.s.b_dec


class Ours:
    name = "ours"

    def __init__(self, s: Setup):
        self.s = s

    def encode(self, x):
        return topk_encode(x, self.s.W_enc, self.s.b_enc, self.s.k, self.s.b_dec)

    def decode(self, codes):
        return sparse_decode(*codes, self.s.W_dec) + self.s.b_dec

    def loss(self, x):
        with autocast(self.s.device):
            return mse(self.decode(self.encode(x)), x)


class Binding(Ours):
    name = "binding"

    def decode(self, codes):
        return binding_decode(*codes, self.s.D, self.s.M) + self.s.b_dec


def time_variant(v, device, rep_ms):
    """ms per phase, encoder TFLOP/s and activation bytes of one variant."""
    s = v.s
    out = {"enc": float("nan"), "dec": float("nan")}
    if "enc" not in getattr(v, "skip", ()):
        with torch.no_grad(), autocast(device):
            out["enc"] = bench_ms(lambda: v.encode(s.x()), device, rep_ms=rep_ms)
            codes = v.encode(s.x())
            out["dec"] = bench_ms(lambda: v.decode(codes), device, rep_ms=rep_ms)
    out["fwd"] = bench_ms(lambda: v.loss(s.x()), device, rep_ms=rep_ms)
    out["fwd_bwd"] = bench_ms(lambda: v.loss(s.x()).backward(), device, grad_to_none=s.params, rep_ms=rep_ms)
    v.loss(s.x()).backward()
    out["adam"] = bench_ms(s.opt.step, device, rep_ms=rep_ms)

    def step():
        v.loss(s.x()).backward()
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)

    out["step"] = bench_ms(step, device, rep_ms=rep_ms)
    out["act_bytes"] = activation_bytes(lambda: v.loss(s.x()).backward(), s.params, device)
    s.opt.zero_grad(set_to_none=True)
    out["enc_tflops"] = 2 * s.B * s.d * s.n / out["enc"] / 1e9
    return out


def time_floor(s, device, rep_ms):
    """cuBLAS encoder GEMM alone (bf16 operands, as autocast casts them) + fused Adam alone."""
    x = s.x().to(torch.bfloat16) if device.type == "cuda" else s.x()
    W = s.W_enc_nd.detach().t().contiguous()
    W = W.to(torch.bfloat16) if device.type == "cuda" else W
    gemm = bench_ms(lambda: x @ W, device, rep_ms=rep_ms)
    for p in s.params:
        p.grad = torch.randn_like(p)
    adam = bench_ms(s.opt.step, device, rep_ms=rep_ms)
    s.opt.zero_grad(set_to_none=True)
    return {"enc": gemm, "adam": adam, "step": gemm + adam, "enc_tflops": 2 * s.B * s.d * s.n / gemm / 1e9}


# ---------------------------------------------------------------------------------------------
# the sparse kernels on their own: time and bytes they must move
# ---------------------------------------------------------------------------------------------
def sparse_kernel_rates(s, device, rep_ms):
    """GB/s of decoder forward, decoder backward (dW_dec + d values) and encoder backward (dW_enc +
    db_enc) through the kernels, on compulsory bytes; plus the pair sort."""
    if backend(s.W_dec) != "triton":
        return {}
    from sae.core.kernels.triton_decode import gather_sum, segment_pass  # noqa: PLC0415 (imports triton)

    with torch.no_grad(), autocast(device):
        values, indices = topk_encode(s.x(), s.W_enc, s.b_enc, s.k, s.b_dec)
    B, k, d, n = s.B, s.k, s.d, s.n
    W = s.W_dec.detach()
    dY = torch.randn(B, d, device=device)
    xc = s.x()
    unique_rows = int(torch.unique(indices).numel())
    e_v, e_w = values.element_size(), W.element_size()
    pair_bytes = B * k * (8 + e_v)  # index + value per pair
    out = {}
    ms = bench_ms(lambda: gather_sum(values, indices, W, out_dtype=torch.float32), device, rep_ms=rep_ms)
    out["dec_fwd"] = (ms, (unique_rows * d * e_w + pair_bytes + B * d * 4) / ms / 1e6)
    CACHE.clear()
    out["sort_ms"] = bench_ms(lambda: (CACHE.clear(), CACHE.get(indices, n)), device, rep_ms=rep_ms)
    CACHE.get(indices, n)
    ms = bench_ms(lambda: segment_pass(indices, values, dY, n, 1, R=W, dr_dtype=W.dtype, dcoef_dtype=values.dtype),
                  device, rep_ms=rep_ms)
    # W_dec rows read (for d values), dW_dec rows written, dY read once, pairs read + d values written.
    out["dec_bwd"] = (ms, (n * d * e_w * 2 + B * d * 4 + pair_bytes + B * k * (8 + e_v)) / ms / 1e6)
    ms = bench_ms(lambda: segment_pass(indices, values, xc, n, 1, R=None, per_atom=False, dr_dtype=W.dtype,
                                       want_csum=True), device, rep_ms=rep_ms)
    out["enc_bwd"] = (ms, (n * d * e_w + B * d * 4 + pair_bytes + B * k * 8 + n * 4) / ms / 1e6)
    CACHE.clear()
    return out


def time_auxk(s, device, rep_ms, k_aux=256, dead_frac=0.1):
    """AuxK forward+backward: the library's sparse path (auxk_reconstruct: fused top-k over the dead
    columns, sparse decode) against dense GEMMs over the dead columns (what it replaced)."""
    g = torch.Generator(device=device).manual_seed(1)
    dead = torch.rand(s.n, generator=g, device=device) < dead_frac
    dead_idx = dead.nonzero().squeeze(1)
    k_aux = min(k_aux, int(dead_idx.numel()))
    x = s.x()

    def dense():
        with autocast(device):
            pre = reference.preactivations(x, s.W_enc[:, dead_idx], s.b_enc[dead_idx], s.b_dec)
            top = pre.topk(k_aux, dim=1, sorted=False)
            codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
            (codes @ s.W_dec[dead_idx]).float().pow(2).sum().backward()

    def sparse():
        with autocast(device):
            auxk_reconstruct(x, s.W_enc, s.b_enc, k_aux, dead_idx, s.W_dec[dead_idx], s.b_dec).float().pow(2).sum().backward()

    out = {"k_aux": k_aux, "n_dead": int(dead_idx.numel())}
    out["dense"] = bench_ms(dense, device, grad_to_none=s.params, rep_ms=rep_ms)
    out["sparse"] = bench_ms(sparse, device, grad_to_none=s.params, rep_ms=rep_ms)
    return out


# ---------------------------------------------------------------------------------------------
# correctness gate at full size
# ---------------------------------------------------------------------------------------------
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gate(s, device, binding=None, rows=256):
    """Ours against fp32 references on this size's real tensors. Returns (ok, worst errors)."""
    errs = {}
    x = s.x()
    bf = torch.bfloat16 if device.type == "cuda" else torch.float32  # what autocast rounds operands to
    W_enc = s.W_enc.detach()
    with torch.no_grad(), autocast(device):
        values, indices = topk_encode(x, W_enc, s.b_enc, s.k, s.b_dec)
    # encoder forward, on a sample of rows: fp32 GEMM of the rounded operands
    r = torch.arange(0, s.B, max(1, s.B // rows), device=device)
    xc = (x[r] - s.b_dec).to(bf).float()
    pre = xc @ W_enc.to(bf).float() + s.b_enc
    chosen = pre.gather(1, indices[r]).sort(1, descending=True).values
    errs["enc_select"] = _rel(chosen, pre.topk(s.k, dim=1).values)
    errs["enc_values"] = _rel(values[r].float(), pre.gather(1, indices[r]).relu())
    tol = {"enc_select": 1e-3, "enc_values": 1e-2}
    # encoder backward with the same indices, against a dense fp32 computation
    We, be, bd = (t.detach().clone().requires_grad_() for t in (W_enc, s.b_enc, s.b_dec))
    G = torch.randn(values.shape, device=device)
    with autocast(device):
        v2, i2 = topk_encode(x, We, be, s.k, bd)
    (v2.float() * G).sum().backward()
    d_pre = torch.zeros(s.B, s.n, device=device).scatter(1, i2, G * (v2 > 0))
    xcf = x - s.b_dec.detach()
    errs["enc_dW"] = _rel(We.grad, xcf.t() @ d_pre)
    errs["enc_db"] = _rel(be.grad, d_pre.sum(0))
    errs["enc_dbdec"] = _rel(bd.grad, -(W_enc @ d_pre.sum(0)))
    del d_pre
    # decoder forward and backward against embedding_bag in fp32
    W = (s.W_dec if binding is None else s.D).detach()
    vals = values.float().clone().requires_grad_()
    Wl = W.clone().requires_grad_()
    Gy = torch.randn(s.B, s.d, device=device)
    if binding is None:
        out = sparse_decode(vals, indices, Wl)
        ref_v, ref_W = vals.detach().clone().requires_grad_(), W.clone().requires_grad_()
        ref = reference.sparse_decode(ref_v, indices, ref_W)
    else:
        M = s.M.detach()
        bind_idx = indices  # n total = 2 * atoms: slot = index // atoms
        out = binding_decode(vals, bind_idx, Wl, M)
        ref_v, ref_W = vals.detach().clone().requires_grad_(), W.clone().requires_grad_()
        ref = reference.binding_decode(ref_v, bind_idx, ref_W, M)
    errs["dec_fwd"] = _rel(out, ref)
    (out * Gy).sum().backward()
    (ref * Gy).sum().backward()
    errs["dec_dvalues"] = _rel(vals.grad, ref_v.grad)
    errs["dec_dW"] = _rel(Wl.grad, ref_W.grad)
    for key in errs:
        tol.setdefault(key, 1e-4)
    bad = {k_: e for k_, e in errs.items() if not (e <= tol[k_])}  # NaN fails too
    return not bad, errs, bad


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_size(B, d, ratio, k, device, args, peak_gbs):
    n = ratio * d
    row = dict(B=B, d=d, n=n, k=k, ratio=ratio)
    print(f"\n== B={B} d={d} n={n} k={k} ==", flush=True)
    s = Setup(B, d, n, k, device)
    ok, errs, bad = gate(s, device)
    del s
    row["gate"] = ok
    print("gate (ours vs fp32 reference): " + ("PASS" if ok else f"FAIL {bad}") + "  "
          + " ".join(f"{k_}={e:.1e}" for k_, e in errs.items()), flush=True)

    variants = [("ours", Ours), ("naive", Naive), ("ebag", EmbeddingBag)]
    if args.compile == "all" or (args.compile == "headline" and (d, ratio, k) in HEADLINE):
        variants.append(("compiled", Compiled))
    for name, cls in variants:
        vs = Setup(B, d, n, k, device)
        try:
            r = time_variant(cls(vs), device, args.rep)
        except torch.OutOfMemoryError:
            r = None
            print(f"{name:>9}: out of memory")
        row[name] = r
        if r:
            print(f"{name:>9}: enc {r['enc']:8.3f}  dec {r['dec']:8.3f}  fwd {r['fwd']:8.3f}  fwd+bwd {r['fwd_bwd']:8.3f}  "
                  f"adam {r['adam']:7.3f}  step {r['step']:8.3f} ms   enc {r['enc_tflops']:6.1f} TFLOP/s   "
                  f"act {r['act_bytes'] / 2**20:9.1f} MiB", flush=True)
        del vs
        if name == "compiled":
            torch._dynamo.reset()  # compiled graphs hold the weights of their size alive
        free(device)

    fs = Setup(B, d, n, k, device)
    row["floor"] = time_floor(fs, device, args.rep)
    print(f"{'floor':>9}: enc GEMM {row['floor']['enc']:8.3f} ms ({row['floor']['enc_tflops']:.1f} TFLOP/s) + "
          f"adam {row['floor']['adam']:7.3f} = {row['floor']['step']:8.3f} ms", flush=True)
    row["sparse"] = sparse_kernel_rates(fs, device, args.rep)
    for key in ("dec_fwd", "dec_bwd", "enc_bwd"):
        if key in row["sparse"]:
            ms, gbs = row["sparse"][key]
            print(f"{key:>9}: {ms:8.3f} ms  {gbs:7.0f} GB/s on compulsory bytes ({gbs / peak_gbs:.0%} of copy bandwidth)")
    if "sort_ms" in row["sparse"]:
        print(f"{'sort':>9}: {row['sparse']['sort_ms']:8.3f} ms (pairs by latent, once per step)")
    if args.auxk:
        a = time_auxk(fs, device, args.rep)
        row["auxk"] = a
        print(f"{'auxk':>9}: k_aux={a['k_aux']} n_dead={a['n_dead']}: sparse (library) {a['sparse']:.3f} ms, "
              f"dense-over-dead {a['dense']:.3f} ms (fwd+bwd)")
    del fs
    free(device)

    bs = Setup(B, d, n, k, device, binding_slots=2)
    ok_b, errs_b, bad_b = gate(bs, device, binding=True)
    row["gate"] = row["gate"] and ok_b
    print("binding gate: " + ("PASS" if ok_b else f"FAIL {bad_b}"), flush=True)
    row["binding"] = time_variant(Binding(bs), device, args.rep)
    r = row["binding"]
    print(f"{'binding':>9}: fwd+bwd {r['fwd_bwd']:8.3f}  step {r['step']:8.3f} ms", flush=True)
    del bs
    free(device)
    return row


def _fmt(x, spec=".2f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary(rows, peak_gbs):
    hdr = (f"{'d':>5} {'n':>7} {'k':>4} | {'naive':>8} {'compiled':>8} {'ebag':>8} {'ours':>8} {'floor':>8} "
           f"{'binding':>8} | {'x naive':>7} {'/floor':>6} {'bind/topk':>9} {'encTF/s':>7} {'sparse%':>7} "
           f"{'act x':>6} | gate")
    lines = ["", "step ms (fwd + bwd + Adam), ratios, encoder TFLOP/s, worst sparse-kernel share of copy "
             "bandwidth, naive/ours activation memory", hdr, "-" * len(hdr)]
    for r in rows:
        step = lambda name: (r.get(name) or {}).get("step")  # noqa: E731
        ours, naive = step("ours"), step("naive")
        sparse = [gbs for key, (ms, gbs) in ((k_, v) for k_, v in r.get("sparse", {}).items() if k_ != "sort_ms")]
        act = (r["naive"]["act_bytes"] / r["ours"]["act_bytes"]) if r.get("naive") and r.get("ours") else None
        lines.append(
            f"{r['d']:>5} {r['n']:>7} {r['k']:>4} | {_fmt(naive):>8} {_fmt(step('compiled')):>8} {_fmt(step('ebag')):>8} "
            f"{_fmt(ours):>8} {_fmt(step('floor')):>8} {_fmt(step('binding')):>8} | "
            f"{_fmt(naive / ours if ours and naive else None):>7} {_fmt(ours / step('floor') if ours else None):>6} "
            f"{_fmt(step('binding') / ours if ours and step('binding') else None):>9} "
            f"{_fmt(r['ours']['enc_tflops'] if r.get('ours') else None, '.0f'):>7} "
            f"{_fmt(min(sparse) / peak_gbs * 100 if sparse else None, '.0f'):>7} {_fmt(act, '.1f'):>6} | "
            f"{'ok' if r['gate'] else 'FAIL'}")
    print("\n".join(lines))


def targets(rows, peak_gbs):
    """The issue's targets, each as measured/required."""
    out = []

    def add(name, ok, detail):
        out.append(f"  [{'met' if ok else 'MISSED'}] {name}: {detail}")

    for r in rows:
        if not (r.get("ours") and r.get("naive")):
            continue
        tag = f"d={r['d']} n={r['n']} k={r['k']}"
        sp = r["naive"]["step"] / r["ours"]["step"]
        need = 3.0 if r["d"] <= 768 else 2.5 if r["d"] >= 4096 else None
        if need:
            add(f"step vs naive {tag}", sp >= need, f"{sp:.2f}x (need >= {need}x)")
        fl = r["ours"]["step"] / r["floor"]["step"]
        add(f"step vs floor {tag}", fl <= 1.5, f"{fl:.2f}x floor (need <= 1.5x)")
        if r.get("binding"):
            bt = r["binding"]["step"] / r["ours"]["step"]
            add(f"binding vs topk {tag}", bt <= 1.15, f"{bt:.2f}x (need <= 1.15x)")
        for key in ("dec_fwd", "dec_bwd", "enc_bwd"):
            if key in r.get("sparse", {}):
                frac = r["sparse"][key][1] / peak_gbs
                add(f"{key} bandwidth {tag}", frac >= 0.6, f"{frac:.0%} of copy bandwidth (need >= 60%)")
        if r["n"] >= 131072 and r["ours"]["act_bytes"] == r["ours"]["act_bytes"]:
            am = r["naive"]["act_bytes"] / r["ours"]["act_bytes"]
            add(f"activation memory {tag}", am >= 10, f"{am:.1f}x below naive (need >= 10x)")
    if out:
        print("\ntargets (H100):")
        print("\n".join(out))
    return all("[met]" in line for line in out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="SAE sparse-kernel benchmark (see module docstring)")
    ap.add_argument("--d", type=int, nargs="*", default=list(GRID_D))
    ap.add_argument("--ratio", type=int, nargs="*", default=list(GRID_RATIO), help="n / d")
    ap.add_argument("--k", type=int, nargs="*", default=list(GRID_K))
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--compile", choices=["headline", "all", "none"], default="headline",
                    help="sizes that also time torch.compile (headline: the three kernels.md rows)")
    ap.add_argument("--no-auxk", dest="auxk", action="store_false")
    ap.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; no new size starts past it")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, torch paths, no compile")
    args = ap.parse_args(argv)

    if args.smoke:
        # Forced Triton on CPU runs in the interpreter, which must be on before torch imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        args.d, args.ratio, args.k, args.B, args.compile, args.rep = [32], [8], [4], 64, "none", 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --smoke for the CPU check, or on a CUDA machine")
        device = torch.device("cuda")
    versions = {p: md.version(p) for p in ("torch", "triton", "numpy") if _installed(p)}
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"sae.core.kernels bench  {datetime.datetime.now().isoformat(timespec='seconds')}  device: {dev_name}  "
          f"python {platform.python_version()}  " + " ".join(f"{k}={v}" for k, v in versions.items()))
    print(f"backend for ours: {backend(torch.empty(0, device=device))}")
    peak = copy_bandwidth(device)
    if device.type == "cuda":
        print(f"device copy bandwidth: {peak:.0f} GB/s (the 100% of the sparse-kernel shares)")
    t0 = time.time()
    rows, skipped = [], []
    sizes = [(d, ratio, k) for d in args.d for ratio in args.ratio for k in args.k]
    sizes.sort(key=lambda size: size not in HEADLINE)  # the kernels.md rows first, should the budget run out
    for d, ratio, k in sizes:
        if time.time() - t0 > args.budget:
            skipped.append((d, ratio, k))
            continue
        rows.append(run_size(args.B, d, ratio, k, device, args, peak))
    summary(rows, peak)
    all_met = targets(rows, peak) if device.type == "cuda" else None
    if skipped:
        print(f"\nskipped past the {args.budget:.0f} s budget: " + ", ".join(f"d={d} n/d={r} k={k}" for d, r, k in skipped))
    verdict = ("not evaluated (CPU smoke run)" if device.type != "cuda" else "all met" if all_met else "not all met")
    print(f"\ntotal {time.time() - t0:.0f} s; gates {'all passed' if all(r['gate'] for r in rows) else 'FAILED'}; "
          f"targets {verdict}")
    return 0 if all(r["gate"] for r in rows) else 1


def _installed(name):
    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
