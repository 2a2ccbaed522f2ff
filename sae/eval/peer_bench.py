"""Peer benchmark: one TopK SAE training step of each implementation, side by side, on the same data.

    pip install -e '.[bench]'                      # SAELens and EleutherAI sparsify (optional)
    python -m sae.eval.peer_bench                  # CPU: d = 64, 256, 768, AuxK off and on (~10 min on 2 cores)
    python -m sae.eval.peer_bench --device cuda    # a GPU (sparsify's Triton decoder is then its real path)
    python -m sae.eval.peer_bench --smoke          # tiny sizes, correctness gates only (CI, < 1 min)

Implementations (peers.py reproduces the peers' steps by calling their trainers' code):
    ours           sae.TopKSAE through sae.core.kernels, the step trainer.train_step takes with
                   sae.core.optim (fused Adam, in-place decoder-row projection and renormalisation)
    naive          the same model written plainly: dense eager encoder, top-k, scatter into B x n
                   zeros, dense decoder GEMM, dense AuxK, autograd, torch Adam with its defaults
    saelens        SAELens' SAETrainer._train_step on a TopKTrainingSAE
    sparsify       sparsify's trainer loop body (its default optimizer: signum + schedule-free)
    sparsify-adam  the same with its Adam option
Shapes: B tokens, d = d_in, n = ratio * d latents, k = min(32, d / 8), k_aux = d / 2. "AuxK on"
marks 25% of the latents dead (the same ones for every implementation, reset before every step) so
each runs its dead-latent loss; "off" has none dead. Each shape runs in its own process; inside it
the implementations take turns step by step (the order rotating) on the same batches; the median of
the timed steps (after warm-up) is reported, with the ratio peer / ours, the peak memory of one step
above what was allocated before it (CPU: resident-set high-water mark after malloc_trim; CUDA:
max_memory_allocated), and the FVU on held-out data after all the steps, so a fast but wrong step shows.

Correctness gates (the exit status is 1 if one fails; the peers are reported, never gated):
    gradients  ours' loss and every gradient (AuxK included) at the benchmark shape against a float64
               dense computation of the same selection; the selection is a true top-k
    fvu        ours and naive (same initial weights, same lr, same math) end within 10% of each other,
               and below the FVU they started at
    determinism  ours run twice from the same start gives bitwise-identical weights (smoke sizes)
The targets of the issue (CPU: >= 1.3x sparsify at d >= 256, >= 1.0x at d = 64, >= 3x SAELens) are
printed as met / MISSED after the table; they are measurements, not gates.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import sae
from sae.core.architectures.base import geometric_median
from sae.core.optim import make_optimizer, optimizer_step
from sae.core.trainer import TrainConfig
from sae.eval import peers

SHAPES_D = (64, 256, 768)
DEAD_SHARE = 0.25
ORDER = ("ours", "naive", "saelens", "sparsify", "sparsify-adam")
TARGETS = {"sparsify": {64: 1.0, 256: 1.3, 768: 1.3}, "saelens": 3.0}
FVU_TOLERANCE = 0.10  # ours vs naive after the run, relative


# ---------------------------------------------------------------------------------------------
# data: activations that really are sparse sums of directions, plus an offset
# ---------------------------------------------------------------------------------------------
def make_batches(d, batch_size, count, seed=0, device="cpu"):
    """`count` batches (B, d) and the scale they share: x = sum of ~max(4, d/32) of 8d unit atoms with
    positive magnitudes, + noise + a fixed offset, scaled so E||x|| = sqrt(d) (our trainer's units)."""
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(8 * d, d, generator=g), dim=1)
    offset = torch.randn(d, generator=g) * 0.5
    active = max(4, d // 32)
    out = []
    for _ in range(count):
        idx = torch.randint(0, atoms.shape[0], (batch_size, active), generator=g)
        mag = 1 + torch.rand(batch_size, active, generator=g) * 2
        x = F.embedding_bag(idx, atoms, per_sample_weights=mag, mode="sum")
        x += 0.05 * torch.randn(batch_size, d, generator=g) + offset
        out.append(x)
    scale = math.sqrt(d) / out[0].norm(dim=1).mean().item()
    return [(x * scale).to(device) for x in out]


def fvu(x_hat, x):
    return ((x_hat.float() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


# ---------------------------------------------------------------------------------------------
# ours and the naive step
# ---------------------------------------------------------------------------------------------
class OursStep:
    """The step sae.core.trainer.train_step takes, with sae.core.optim (see the module docstring)."""

    name = "ours"

    def __init__(self, d, n, k, device, seed, lr):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = sae.TopKSAE(d, n, k=k).to(self.device).train()
        self.cfg = TrainConfig(lr=lr)
        self.use_bf16 = self.device.type == "cuda"  # the trainer's autocast="auto"
        self.describe = f"fused Adam lr {lr:g}, aux_coeff {self.model.cfg.aux_coeff:g}" + (
            ", bf16 autocast" if self.use_bf16 else "")

    def setup(self, x):
        self.model.init_b_dec_(x, "geometric_median")
        self.model.normalize_decoder_()
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)

    def set_dead(self, dead):
        since = self.model.tokens_since_fired
        since.zero_()
        if dead is not None:
            since[dead] = self.model.cfg.dead_tokens

    def step(self, x):
        model, optimizer = self.model, self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.lr
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            out = model(x)
        loss = sum(out.losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(model, optimizer, self.cfg.grad_clip)

    @torch.no_grad()
    def reconstruct(self, x):
        self.model.eval()
        try:
            return self.model(x).x_hat
        finally:
            self.model.train()


class NaiveStep:
    """Ours' model written the obvious way: dense everywhere, autograd, torch Adam's defaults."""

    name = "naive"

    def __init__(self, ours: OursStep, lr):
        m = ours.model
        self.k, self.k_aux, self.aux_coeff = m.cfg.k, m.d_in // 2, m.cfg.aux_coeff
        self.params = {name: torch.nn.Parameter(p.detach().clone()) for name, p in
                       (("W_enc", m.W_enc), ("b_enc", m.b_enc), ("W_dec", m.W_dec), ("b_dec", m.b_dec))}
        self.lr = lr
        self.use_bf16 = ours.use_bf16
        self.dead = None
        self.describe = f"torch Adam defaults, lr {lr:g}"

    def setup(self, x):
        self.params["b_dec"].data.copy_(geometric_b_dec(x))
        self.optimizer = torch.optim.Adam(self.params.values(), lr=self.lr)

    def set_dead(self, dead):
        self.dead = dead

    def forward(self, x):
        p = self.params
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        top = pre.topk(self.k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        x_hat = codes @ p["W_dec"] + p["b_dec"]
        loss = (x_hat - x).pow(2).sum(-1).mean()
        if self.dead is not None:
            m = int(self.dead.sum())
            aux = pre.masked_fill(~self.dead, float("-inf")).topk(min(self.k_aux, m), dim=1)
            aux_codes = torch.zeros_like(pre).scatter(1, aux.indices, aux.values.relu())
            residual = (x - x_hat).detach()
            aux_loss = (aux_codes @ p["W_dec"] - residual).pow(2).sum(-1).mean() * min(m / self.k_aux, 1.0)
            loss = loss + self.aux_coeff * aux_loss
        return x_hat, loss

    def step(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            _, loss = self.forward(x)
        self.optimizer.zero_grad()
        loss.backward()
        W = self.params["W_dec"]
        with torch.no_grad():
            W.grad -= (W.grad * W).sum(1, keepdim=True) * W
        self.optimizer.step()
        with torch.no_grad():
            W /= W.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def reconstruct(self, x):
        dead, self.dead = self.dead, None
        try:
            return self.forward(x)[0]
        finally:
            self.dead = dead


def geometric_b_dec(x):
    return geometric_median(x.float())


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def peak_bytes(fn, device):
    """Peak memory of fn() above what was live before it: CUDA allocator statistics, or on CPU the
    resident set's high-water mark after returning the allocator's free memory to the system."""
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    libc = _libc()
    try:
        if libc:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        base = _rss_kib("VmRSS")
        fn()
        return float(_rss_kib("VmHWM") - base) * 1024
    except OSError:
        fn()
        return math.nan


# ---------------------------------------------------------------------------------------------
# correctness gates
# ---------------------------------------------------------------------------------------------
def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def gate_gradients(d, n, k, x, dead, seed, device):
    """Ours' losses and gradients against float64 dense truth for the same selection (AuxK included
    when `dead` is given); and the selection must be a top-k of the float64 pre-activations."""
    torch.manual_seed(seed)
    model = sae.TopKSAE(d, n, k=k).to(device).train()
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.copy_(x.mean(0))
        if dead is not None:
            model.tokens_since_fired[dead] = model.cfg.dead_tokens
    out = model(x)
    out.loss.backward()
    P = {name: getattr(model, name).detach().double().requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x64 = x.double()
    pre = (x64 - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    code = out.code

    def decode(ids, vals):
        return torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device).scatter(1, ids, vals) @ P["W_dec"]

    idx = code.indices
    x_hat = decode(idx, pre.gather(1, idx).relu()) + P["b_dec"]
    losses = {"mse": (x_hat - x64).pow(2).sum(-1).mean()}
    errors = {"selection": _rel(pre.detach().gather(1, idx).sort(1).values, pre.detach().topk(k, dim=1).values.sort(1).values)}
    if dead is not None:
        ids = code.extras["aux_dead"]
        k_aux = model.d_in // 2
        glob = ids[code.extras["aux_indices"]]
        aux_hat = decode(glob, pre.gather(1, glob).relu())
        m = ids.numel()
        aux = (aux_hat - (x64 - x_hat).detach()).pow(2).sum(-1).mean() * min(m / k_aux, 1.0)
        losses["aux"] = model.cfg.aux_coeff * aux
        masked = pre.detach().masked_fill(~torch.isin(torch.arange(n, device=x.device), ids), float("-inf"))
        errors["aux selection"] = _rel(pre.detach().gather(1, glob).sort(1).values,
                                       masked.topk(min(k_aux, m), dim=1).values.sort(1).values)
    for name, value in losses.items():
        errors[f"loss {name}"] = _rel(out.losses[name], value)
    sum(losses.values()).backward()
    for name, p in P.items():
        errors[f"grad {name}"] = _rel(getattr(model, name).grad, p.grad)
    ok = all(e < 1e-4 for e in errors.values())
    return ok, errors


def phase_times(ours: OursStep, batches, dead, device):
    """Median ms of ours' forward, backward and optimizer_step, and of torch.topk and the encoder
    GEMM alone on the same shapes: where the step's time goes."""
    model, optimizer = ours.model, ours.optimizer
    out = {"forward": [], "backward": [], "optimizer": [], "encoder GEMM": [], "topk": []}
    for x in batches:
        ours.set_dead(dead)
        sync(device)
        t0 = time.perf_counter()
        loss = sum(model(x).losses.values())
        sync(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer_step(model, optimizer)
        sync(device)
        t3 = time.perf_counter()
        with torch.no_grad():
            pre = torch.addmm(model.b_enc, x - model.b_dec, model.W_enc)
            sync(device)
            t4 = time.perf_counter()
            pre.topk(model.cfg.k, dim=1, sorted=False)
            sync(device)
            t5 = time.perf_counter()
        for name, dt in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            out[name].append(dt * 1e3)
    return {name: statistics.median(v) for name, v in out.items()}


def gate_determinism(d, n, k, batches, dead, device, lr):
    runs = []
    for _ in range(2):
        ours = OursStep(d, n, k, device, seed=1, lr=lr)
        ours.setup(batches[0])
        for x in batches[:3]:
            ours.set_dead(dead)
            ours.step(x)
        runs.append([p.detach().clone() for p in ours.model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------
# one shape (one process)
# ---------------------------------------------------------------------------------------------
def make_impls(d, n, k, batch_size, device, lr, aux, only=None):
    """The implementations to time, ours first; `only` (names) keeps ours and those."""
    def wanted(name):
        return only is None or name in only

    ours = OursStep(d, n, k, device, seed=0, lr=lr)
    impls = [ours] + ([NaiveStep(ours, lr)] if wanted("naive") else [])
    notes = []
    if peers.sae_lens is None:
        notes.append("saelens: not installed (pip install -e '.[bench]'), skipped")
    elif wanted("saelens"):
        impls.append(peers.SAELensStep(d, n, k, batch_size, device, seed=0, lr=lr))
    if peers.sparsify is None:
        notes.append("sparsify: not installed (pip install -e '.[bench]'), skipped")
    else:
        alpha = 1 / 32 if aux else 0.0  # sparsify's default auxk_alpha is 0 (off)
        for name, opt in (("sparsify", "signum"), ("sparsify-adam", "adam")):
            if wanted(name):
                impls.append(peers.SparsifyStep(d, n, k, batch_size, device, seed=0, auxk_alpha=alpha, optimizer=opt))
    return impls, notes


def run_shape(d, aux, args, device):
    """Everything for one shape; returns a JSON-able dict."""
    torch.manual_seed(0)
    ratio, B = args.ratio, args.batch
    n, k = ratio * d, max(1, min(32, d // 8))
    steps, warmup = args.steps, args.warmup
    batches = make_batches(d, B, warmup + steps + 1, seed=d, device=device)
    held_out = batches.pop()
    g = torch.Generator().manual_seed(1)
    dead = None
    if aux:
        dead = torch.zeros(n, dtype=torch.bool)
        dead[torch.randperm(n, generator=g)[: int(DEAD_SHARE * n)]] = True
        dead = dead.to(device)
    row = {"d": d, "n": n, "k": k, "k_aux": d // 2, "B": B, "aux": aux, "dead": int(dead.sum()) if aux else 0,
           "device": str(device), "steps": steps, "warmup": warmup, "gates": {}, "impls": {}}

    ok, errors = gate_gradients(d, n, k, batches[0], None if dead is None else dead.nonzero().squeeze(1), 0, device)
    row["gates"]["gradients"] = {"ok": ok, "max_rel_error": max(errors.values()), "errors": errors}
    if args.determinism:
        row["gates"]["determinism"] = {"ok": gate_determinism(d, n, k, batches, dead, device, args.lr)}

    impls, notes = make_impls(d, n, k, B, device, args.lr, aux, args.only)
    row["notes"] = notes
    times = {i.name: [] for i in impls}
    fvu0 = {}
    for impl in impls:
        impl.setup(batches[0])
        fvu0[impl.name] = fvu(impl.reconstruct(held_out), held_out)
    for s, x in enumerate(batches):
        rot = s % len(impls)
        for impl in impls[rot:] + impls[:rot]:
            impl.set_dead(dead)
            sync(device)
            t0 = time.perf_counter()
            impl.step(x)
            sync(device)
            if s >= warmup:
                times[impl.name].append((time.perf_counter() - t0) * 1e3)
    for impl in impls:
        impl.set_dead(dead)
        mem = peak_bytes(lambda impl=impl: impl.step(batches[-1]), device)
        ms = times[impl.name]
        row["impls"][impl.name] = {
            "ms": statistics.median(ms), "ms_q1": _quantile(ms, 0.25), "ms_q3": _quantile(ms, 0.75),
            "peak_mb": mem / 2**20, "fvu0": fvu0[impl.name], "fvu": fvu(impl.reconstruct(held_out), held_out),
            "describe": impl.describe}
    row["ours_phases"] = phase_times(impls[0], batches[: max(3, min(10, steps))], dead, device)
    ours, naive = row["impls"]["ours"], row["impls"].get("naive")
    if naive is not None:
        close = abs(ours["fvu"] - naive["fvu"]) <= FVU_TOLERANCE * naive["fvu"] + 1e-3
        row["gates"]["fvu"] = {"ok": close and ours["fvu"] < ours["fvu0"], "ours": ours["fvu"], "naive": naive["fvu"]}
    return row


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan,) * 3


def versions(device):
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("sae-lens", "eai-sparsify", "triton", "schedulefree"):
        try:
            v[dist] = md.version(dist)
        except md.PackageNotFoundError:
            v[dist] = None
    v["threads"] = torch.get_num_threads()
    v["cpu"] = platform.processor() or platform.machine()
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
    return v


def table(rows):
    names = [n for n in ORDER if any(n in r["impls"] for r in rows)]
    lines = ["| d | n | AuxK | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n} / ours" for n in names if n != "ours") + " | load |",
             "|---" * (3 + 2 * len(names)) + "|---|"]
    for r in rows:
        ours = r["impls"]["ours"]["ms"]
        ms = [f"{r['impls'][n]['ms']:.1f}" if n in r["impls"] else "-" for n in names]
        ratio = [f"{r['impls'][n]['ms'] / ours:.2f}x" if n in r["impls"] else "-" for n in names if n != "ours"]
        aux = f"on ({r['dead']} dead, k_aux {r['k_aux']})" if r["aux"] else "off"
        lines.append(f"| {r['d']} | {r['n']} | {aux} | " + " | ".join(ms) + " | " + " | ".join(ratio)
                     + f" | {r.get('load', '')} |")
    lines += ["", "| d | AuxK | " + " | ".join(f"{n} peak MB" for n in names) + " | "
              + " | ".join(f"{n} FVU" for n in names) + " |", "|---" * (2 + 2 * len(names)) + "|"]
    for r in rows:
        mem = [f"{r['impls'][n]['peak_mb']:.0f}" if n in r["impls"] else "-" for n in names]
        fv = [f"{r['impls'][n]['fvu0']:.3f} → {r['impls'][n]['fvu']:.3f}" if n in r["impls"] else "-" for n in names]
        lines.append(f"| {r['d']} | {'on' if r['aux'] else 'off'} | " + " | ".join(mem) + " | " + " | ".join(fv) + " |")
    return "\n".join(lines)


def targets(rows, device):
    out = []
    if device.type != "cpu":
        return out
    for r in rows:
        ours = r["impls"]["ours"]["ms"]
        sp = [r["impls"][n]["ms"] for n in ("sparsify", "sparsify-adam") if n in r["impls"]]
        if sp:
            want = TARGETS["sparsify"].get(r["d"], 1.3 if r["d"] >= 256 else 1.0)
            got = min(sp) / ours
            out.append((f"d={r['d']} AuxK {'on' if r['aux'] else 'off'}: >= {want}x sparsify (fastest of its optimizers)",
                        got >= want, got))
        if "saelens" in r["impls"]:
            got = r["impls"]["saelens"]["ms"] / ours
            out.append((f"d={r['d']} AuxK {'on' if r['aux'] else 'off'}: >= 3x SAELens", got >= 3.0, got))
    return out


def report(rows, device, args, started):
    print()
    print(f"# Peer benchmark ({device}), {started:%Y-%m-%d %H:%M}, B={args.batch}, n={args.ratio}d, "
          f"k=min(32, d/8), k_aux=d/2, median of {args.steps} steps after {args.warmup} warm-up")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions(device).items()))
    print(f"command: python -m sae.eval.peer_bench {' '.join(sys.argv[1:])}".rstrip())
    for r in rows:
        for note in r.get("notes", []):
            print(f"note (d={r['d']}): {note}")
    print()
    print(table(rows))
    print()
    print("setups: " + "; ".join(f"{n}: {d}" for n, d in
                                 {n: i["describe"] for r in rows for n, i in r["impls"].items()}.items()))
    failed = []
    for r in rows:
        for name, g in r["gates"].items():
            status = "PASS" if g["ok"] else "FAIL"
            detail = {k: v for k, v in g.items() if k not in ("ok", "errors")}
            print(f"gate d={r['d']} AuxK {'on' if r['aux'] else 'off'} {name}: {status} {detail}")
            if not g["ok"]:
                failed.append((r["d"], r["aux"], name, g))
    print("ours by phase (median ms): " + "; ".join(
        f"d={r['d']} AuxK {'on' if r['aux'] else 'off'}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["ours_phases"].items())
        for r in rows if "ours_phases" in r))
    for what, ok, got in ([] if args.smoke else targets(rows, device)):
        print(f"target {what}: {'met' if ok else 'MISSED'} ({got:.2f}x)")
    return failed


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, nargs="+", default=None, help=f"input widths (default {SHAPES_D}; smoke 16 64)")
    ap.add_argument("--aux", choices=("both", "on", "off"), default="both")
    ap.add_argument("--ratio", type=int, default=8, help="latents per input dimension")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam lr of ours, naive and SAELens")
    ap.add_argument("--only", nargs="*", default=None, help="implementations to run besides ours")
    ap.add_argument("--determinism", action="store_true", help="also run the determinism gate")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes in one process, gates only (CI)")
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for every implementation (0: torch's default). On a shared "
                         "machine 1 avoids OpenMP barriers waiting on descheduled threads")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.d, args.batch, args.steps, args.warmup, args.determinism = args.d or [16, 64], 64, 3, 1, True
    args.d = args.d or list(SHAPES_D)
    auxes = {"both": (False, True), "on": (True,), "off": (False,)}[args.aux]
    started = datetime.datetime.now()
    if args.worker:
        row = run_shape(args.d[0], auxes[0], args, device)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for d in args.d:
        for aux in auxes:
            load = "{:.2f} {:.2f} {:.2f}".format(*load_average())
            if args.smoke:  # one process: the imports of the peers are paid once
                row = run_shape(d, aux, args, device)
            else:  # one process per shape: no allocator or thread-pool state carries over
                row = _subprocess(d, aux, args)
            row["load"] = f"{load} → " + "{:.2f}".format(load_average()[0])
            rows.append(row)
            ours = row["impls"]["ours"]["ms"]
            print(f"d={d} AuxK {'on' if aux else 'off'}: " + ", ".join(
                f"{n} {i['ms']:.1f} ms ({i['ms'] / ours:.2f}x)" for n, i in row["impls"].items())
                + f"; load {row['load']}", flush=True)
    failed = report(rows, device, args, started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


def _subprocess(d, aux, args):
    cmd = [sys.executable, "-m", "sae.eval.peer_bench", "--worker", "--device", args.device, "--d", str(d),
           "--aux", "on" if aux else "off", "--ratio", str(args.ratio), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
    if args.only is not None:
        cmd += ["--only", *args.only]
    if args.determinism:
        cmd.append("--determinism")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the worker for d={d} AuxK {'on' if aux else 'off'} failed (exit {proc.returncode})")
    return json.loads(results[-1])


if __name__ == "__main__":
    sys.exit(main())
