"""Training: one config dataclass, one loop, checkpoints that resume bit-identically.

    result = sae.train(model, data, steps=2000, batch_size=1024, lr=5e-4, seed=0, run_dir="runs/x")

`data` is a (N, d_in) tensor or an activation-cache directory. The loop: scale activations so
that E||x|| = sqrt(d_in) (folded into the weights at the end, so the result works on raw
activations), start b_dec at the data's geometric median, then Adam with LR warm-up/decay and a
sparsity-coefficient warm-up. A checkpoint holds everything the next step depends on (weights,
optimiser, step, RNG, the reader's position), so a run killed at any moment and resumed ends
bit-identical (on CPU) to one that never stopped.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sae.core import io
from sae.core.architectures.base import SAE
from sae.core.architectures.transcoder import is_transcoder
from sae.core.config import OptionError, option
from sae.core.metrics import batch_metrics, evaluate
from sae.core.optim import make_optimizer, optimizer_step
from sae.core.run_dir import RunDir, describe_data
from sae.core.store import make_store

L0_TOLERANCE = 0.2  # relative: a final L0 further than this from target_l0 is reported as missed
# Shrinkage (metrics.py) above this means the penalty, not the data, sets the code sizes. Calibrated
# on 85 planted-world runs (sae/eval/defaults_study.py): every collapsed run had >= 1.55 (up to
# 1e5), every healthy one <= 1.44; TopK and JumpReLU sit at ~1.0.
SHRINKAGE_LIMIT = 1.5


@dataclass
class TrainConfig:
    steps: int = option(3000, "optimizer steps")
    batch_size: int = option(1024, "activations per step")
    lr: float = option(1e-3, "peak Adam learning rate")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    lr_warmup: float = option(0.01, "fraction of steps with linear LR warm-up from 0")
    lr_decay: float = option(0.2, "fraction of steps, at the end, with linear LR decay to 0")
    sparsity_warmup: float = option(0.05, "fraction of steps over which the sparsity coefficient ramps up from 0")
    target_l0: float = option(0.0, "ReLU/JumpReLU: steer the sparsity coefficient to reach this L0 (0 = off)")
    l0_gain: float = option(0.01, "gain of the L0 controller (log-coefficient change per step per log-L0 error)")
    grad_clip: float = option(0.0, "clip the global gradient norm to this (0 = off)")
    b_dec_init: str = option("geometric_median", "initial b_dec: geometric_median, mean or zeros")
    start: str = option("fresh", "fresh (b_dec and the activation scale from the data) or continue (train the "
                        "dictionary further: its weights and b_dec as they are, at the scale it was trained at)")
    binding_recipe: str = option("rebind", "binding SAEs: rebind (a standard SAE, the slots found in it, then the binding SAE from them: "
                                 "sae/recipes/binding.py) or plain")
    scale_activations: bool = option(True, "train on x scaled to E||x|| = sqrt(d_in); folded into the weights on save")
    init_batches: int = option(4, "batches used to estimate the activation scale and b_dec")
    seed: int = option(0, "seed for data order and training randomness")
    hook: str = option("", "hook to read when the cache holds several")
    device: str = option("auto", "cpu, cuda or auto")
    autocast: str = option("auto", "bfloat16, none, or auto (bfloat16 on CUDA)")
    run_dir: str = option("", "directory for checkpoints, logs, metrics and the final dictionary ('' = none)")
    checkpoint_every: int = option(500, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept on disk")
    resume: bool = option(False, "continue from the latest checkpoint in run_dir")
    log_every: int = option(25, "steps between progress/log updates")
    # Enough tokens that "never fired" means dead rather than rare (8k tokens called 29% of the
    # default job's latents dead).
    eval_tokens: int = option(65536, "activations for the end-of-run metrics (whole batches, at least one)")
    splice_every: int = option(0, "steps between loss-recovered evals, splicing the SAE into the model (0 = off)")
    splice_sequences: int = option(64, "held-out sequences for those splice evals")
    wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = option("sae", "wandb project")

    def __post_init__(self):
        positive = ("steps", "batch_size", "init_batches", "log_every", "eval_tokens", "keep_checkpoints")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise OptionError(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise OptionError("lr", f"must be a positive number, got {self.lr!r}")
        for name in ("lr_warmup", "lr_decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise OptionError(name, f"must be a fraction in [0, 1], got {getattr(self, name)!r}")
        if self.lr_warmup + self.lr_decay > 1:
            raise OptionError("lr_warmup", f"+ {{lr_decay}} must be <= 1, got {self.lr_warmup + self.lr_decay}",
                              lr_decay="lr_decay")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionError(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("target_l0", "grad_clip", "checkpoint_every", "splice_every"):
            if getattr(self, name) < 0:
                raise OptionError(name, f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("l0_gain", "splice_sequences"):
            if not getattr(self, name) > 0:
                raise OptionError(name, f"must be > 0, got {getattr(self, name)!r}")
        choices = {"b_dec_init": ("geometric_median", "mean", "zeros"), "start": ("fresh", "continue"),
                   "binding_recipe": ("rebind", "plain"),
                   "device": ("auto", "cpu", "cuda"),
                   "autocast": ("auto", "none", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise OptionError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.resume and not self.run_dir:
            raise OptionError("resume", "needs a {run_dir}", run_dir="run_dir")


@dataclass
class LoopState:
    """What the loop carries from step to step besides weights, optimiser, RNG and reader."""

    step: int = 0
    scale: float = 1.0  # activations are multiplied by this while training
    target_scale: float = 1.0  # a transcoder's targets likewise
    log_coeff_mult: float = 0.0  # L0 controller: log of the sparsity-coefficient multiplier
    wandb_id: str | None = None


@dataclass
class TrainResult:
    model: SAE
    metrics: dict
    run_dir: Path | None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last `lr_decay` of the steps."""
    warmup, decay = cfg.lr_warmup * cfg.steps, cfg.lr_decay * cfg.steps
    if step < warmup:
        return (step + 1) / warmup
    if decay > 0 and step >= cfg.steps - decay:
        return max(cfg.steps - step, 0) / decay
    return 1.0


def sparsity_factor(step: int, cfg: TrainConfig) -> float:
    warmup = cfg.sparsity_warmup * cfg.steps
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def steer_l0(model: SAE, state: LoopState, l0: float, cfg: TrainConfig):
    """Integral control in log space: push sparsity up while L0 is above target, down below.

    Starts after the sparsity warm-up (during it L0 is high by design). Log space makes the
    response proportional to the relative error, whatever the lever's scale. The lever is the
    architecture's own where it has one (JumpReLU's thresholds), else the penalty's coefficient.
    """
    if cfg.target_l0 > 0 and state.step >= cfg.sparsity_warmup * cfg.steps:
        step = cfg.l0_gain * (math.log(max(l0, 1e-3)) - math.log(cfg.target_l0))
        if not model.steer_l0_(step):
            state.log_coeff_mult = min(max(state.log_coeff_mult + step, -30.0), 30.0)


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped training after a checkpoint at the current step was written."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} at step {step}: checkpoint written in {run_dir}; "
                         "continue with resume=True")


def make_config(options: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown training option {', '.join(unknown)}; "
                         "model options (k, l1_coeff, ...) are set when constructing the SAE")
    return TrainConfig(**options)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise OptionError("device", f"cuda: torch sees no CUDA GPU (torch {torch.__version__}, {build}); use cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        "cpu" if name == "auto" else name)


def data_metadata(store, metadata: dict | None) -> dict:
    """cfg.json metadata: the caller's, over what a cache says about its model and hook (SAELens
    reads model_class_name and model_from_pretrained_kwargs to load the model the same way)."""
    if hasattr(store, "metadata"):  # a model stream knows its model and hook itself
        return {**store.metadata(), **(metadata or {})}
    if not hasattr(store, "cache"):
        return dict(metadata or {})
    manifest = store.cache.manifest
    load = manifest.get("model_load") or {}
    found = {"model_name": manifest.get("model"), "hook_name": store.hook}
    for key in ("model_class_name", "model_from_pretrained_kwargs"):
        if key in load:
            found[key] = load[key]
    if load:
        found["model_load"] = load
    return {**found, **(metadata or {})}


def train_loop(model: SAE, data, *, target: str | None = None, callback: Callable[[int, dict], None] | None = None,
               metadata: dict | None = None, make_monitor: Callable | None = None, **options) -> TrainResult:
    """The plain loop: train `model` on `data` (a (N, d_in) tensor, a cache directory, or a reader
    with next_batch/state_dict such as a model stream) with the TrainConfig `options`. Most users
    call sae.train, which picks a recipe and ends up here. A transcoder reads the options' hook and
    reconstructs the hook `target` of the same data, or takes in-memory data as a pair (x, y).

    `callback(step, logs)` runs after every optimizer step. `metadata` (model_name, hook_name, ...)
    is written into the saved dictionary's cfg.json; for a cache it defaults to the cache's own.
    `make_monitor(metadata, device)` builds the evaluation that splice_every runs (it needs a
    language model, which this layer does not load). With a run_dir, SIGTERM/SIGINT checkpoint the
    current step and raise TrainingStopped.
    """
    cfg = make_config(options)
    hook = cfg.hook
    if isinstance(data, tuple):  # a transcoder's in-memory (x, y): two named tensors of one reader
        if len(data) != 2:
            raise ValueError(f"data as a tuple is a transcoder's (x, y) pair, got {len(data)} items")
        hook, target = hook or "input", target or "target"
        data = {hook: data[0], target: data[1]}
    results = train_members({SINGLE: model}, data, cfg, hooks={SINGLE: hook},
                            targets={SINGLE: target} if target is not None else None, callback=callback,
                            metadata=metadata, make_monitor=make_monitor)
    return results[SINGLE]


def train_many(models: dict[str, SAE], data, *, hooks: dict[str, str] | None = None,
               targets: dict[str, str] | None = None, callback: Callable[[int, dict], None] | None = None,
               metadata: dict | None = None, make_monitor: Callable | None = None,
               **options) -> dict[str, TrainResult]:
    """Train several dictionaries on one pass over the data: each reads the batches of its hook
    (`hooks`, name -> hook; default the options' hook) and, for a transcoder, its target hook
    (`targets`). Every member has its own optimiser, schedules, metrics and sub-folder of run_dir;
    one checkpoint holds them all. On CPU each result is bit-identical to training that dictionary
    alone with the same options (all members share them: the batches are shared)."""
    if not models:
        raise ValueError("train_many needs at least one dictionary")
    bad = [name for name in models if not name or name.startswith(".") or "/" in name or name == "checkpoints"]
    if bad:
        raise ValueError(f"dictionary names must be plain folder names, got {bad}")
    cfg = make_config(options)
    hooks = {name: (hooks or {}).get(name, cfg.hook) for name in models}
    return train_members(dict(models), data, cfg, hooks=hooks, targets=targets or {}, callback=callback,
                         metadata=metadata, make_monitor=make_monitor)


SINGLE = ""  # the member name of a one-dictionary run: its files sit in the run folder itself


@dataclass
class Member:
    """One dictionary being trained: what the step loop needs of it."""

    name: str
    model: SAE
    optimizer: torch.optim.Optimizer
    hook: str | None
    target: str | None          # a transcoder's target hook (None: reconstruct the input)
    folder: Path | None         # where its log, metrics and dictionary go
    metadata: dict
    state: LoopState = field(default_factory=LoopState)
    monitor: Callable | None = None
    wandb_run: object = None
    logs: dict = field(default_factory=dict)


def train_members(models: dict[str, SAE], data, cfg: TrainConfig, *, hooks: dict, targets: dict | None = None,
                  callback=None, metadata=None, make_monitor=None) -> dict[str, TrainResult]:
    """The loop behind train_loop (one member, named SINGLE) and train_many (several)."""
    targets = targets or {}
    if cfg.splice_every and make_monitor is None:
        raise OptionError("splice_every", "needs a language model to splice into: call sae.train, which attaches one")
    for model in models.values():
        if cfg.target_l0 > 0 and not has_penalty(model):
            raise ValueError("target_l0 steers a sparsity penalty: use it with relu or jumprelu (TopK sets L0 by k)")
    device = pick_device(cfg.device)
    readers = open_readers(data, cfg, {*hooks.values(), *targets.values()})
    members = [make_member(name, model, readers, cfg, hooks[name], targets.get(name), metadata, device)
               for name, model in models.items()]
    record = run_record(members, cfg, data)
    run = RunDir(cfg.run_dir, [m.folder for m in members]) if cfg.run_dir else None
    checkpoint = run.open(record, cfg.resume) if run is not None else None
    try:
        if checkpoint is not None:
            restore(run, checkpoint, members, readers, device)
        else:
            torch.manual_seed(cfg.seed)
            for m in members:
                m.state = LoopState(*initialise(m.model, readers[m.hook], cfg, device,
                                                readers[m.target] if m.target is not None else None))
        for m in members:
            m.monitor = make_monitor(m.metadata, device) if cfg.splice_every else None
            m.wandb_run = start_wandb(cfg, record, m, run) if cfg.wandb else None
        with StopSignals(enabled=run is not None) as stop:
            run_steps(members, readers, cfg, device, run, callback, stop)
        return {m.name: finish(m, readers, cfg, device) for m in members}
    finally:
        if run is not None:
            run.close()


def open_readers(data, cfg: TrainConfig, hooks: set) -> dict:
    """hook -> reader of `data`, all in the same row order (one seed, one batch size), so members
    on different hooks see the same tokens and members on one hook share its batches."""
    if hasattr(data, "readers"):  # a source that reads several hooks itself (a model stream)
        return data.readers(sorted(hooks, key=str), batch_size=cfg.batch_size, seed=cfg.seed)
    if isinstance(data, dict):  # in-memory tensors by hook name (a transcoder's input and target)
        missing = sorted(set(hooks) - set(data))
        if missing:
            raise ValueError(f"data has no tensor for hook {', '.join(map(repr, missing))} (it holds {', '.join(data)})")
        return {hook: make_store(data[hook], batch_size=cfg.batch_size, seed=cfg.seed) for hook in hooks}
    return {hook: make_store(data, batch_size=cfg.batch_size, seed=cfg.seed, hook=hook or None) for hook in hooks}


def make_member(name, model, readers, cfg, hook, target, metadata, device) -> Member:
    reader = readers[hook]
    if reader.d_in != model.d_in:
        raise ValueError(f"data has d_in={reader.d_in} but the SAE{f' {name}' if name else ''} "
                         f"expects d_in={model.d_in}")
    if target is not None:
        check_target(name, model, (hook, reader), (target, readers[target]))
    elif is_transcoder(model):
        raise ValueError(f"the transcoder{f' {name}' if name else ''} needs a target hook to reconstruct "
                         "(target= / targets=, or data as a pair (x, y))")
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    folder = (Path(cfg.run_dir) / name if name else Path(cfg.run_dir)) if cfg.run_dir else None
    meta = data_metadata(reader, metadata)
    if target is not None and hasattr(readers[target], "hook"):  # a cache's or a stream's (tensors: no name)
        meta.setdefault("hook_name_out", readers[target].hook)
    return Member(name, model, optimizer, hook, target, folder, meta)


def check_target(name: str, model: SAE, source: tuple, target: tuple):
    """A transcoder's two (hook, reader)s: the target as wide as its output, and the same tokens
    (row for row: the readers share one order, which pairs rows only when both hold the same rows)."""
    (hook, reader), (target_hook, target_reader) = source, target
    where = f"the transcoder {name}" if name else "the transcoder"
    if not is_transcoder(model):
        raise ValueError(f"a target hook ({target_hook}) is for transcoders; {name or 'this'} is a "
                         f"{model.architecture} SAE, which reconstructs its own input")
    if target_reader.d_in != model.d_out:
        raise ValueError(f"target hook {target_hook} has d={target_reader.d_in} but {where} outputs d_out={model.d_out}")
    if reader.n_rows != target_reader.n_rows:
        raise ValueError(f"{where}: input hook {hook} holds {reader.n_rows} tokens but target hook {target_hook} "
                         f"holds {target_reader.n_rows}; its two hooks must hold the same tokens")


def run_record(members: list[Member], cfg: TrainConfig, data) -> dict:
    """What a resumed run must match: the options, and per dictionary its architecture, options
    and data. A one-dictionary run keeps the flat layout every run had before sets existed."""
    def member_record(m: Member) -> dict:
        data_record = describe_data(data, m.hook)  # a single run's is cfg.hook (or a pair's "input")
        if m.target is not None:
            data_record["target"] = describe_data(data, m.target) if isinstance(data, dict) else m.target
        return {"architecture": m.model.architecture, "model": m.model.config_dict(), "data": data_record}

    if len(members) == 1 and members[0].name == SINGLE:
        return {"train": asdict(cfg), **member_record(members[0])}
    return {"train": asdict(cfg), "members": {m.name: member_record(m) for m in members}}


def restore(run: RunDir, checkpoint: Path, members: list[Member], readers: dict, device):
    parts = {prefix(m): (m.model, m.optimizer) for m in members}
    saved, extras = io.load_checkpoint(checkpoint, parts)
    loops = saved["members"] if "members" in saved else {SINGLE: saved["loop"]}
    for m in members:
        m.state = LoopState(**loops[m.name])
    keyed = "members" in saved or len(readers) > 1  # one reader (one plain dictionary): the flat layout
    stores = saved["store"] if keyed else {str(members[0].hook): saved["store"]}
    for hook, reader in readers.items():
        reader.load_state_dict(stores[str(hook)])
    torch.set_rng_state(extras["cpu_rng"])
    if device.type == "cuda" and "cuda_rng" in extras:
        torch.cuda.set_rng_state(extras["cuda_rng"])
    for m in members:
        run.truncate_log(m.folder / "log.jsonl", m.state.step)


def prefix(m: Member) -> str:
    return f"{m.name}/" if m.name else ""


class StopSignals:
    """SIGTERM (what schedulers send on pre-emption) and SIGINT stop training cleanly: the loop
    finishes its step, writes a checkpoint and raises TrainingStopped. A second signal kills the
    process at once, for a user who does not want to wait for the checkpoint."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.saved: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __enter__(self):
        if self.enabled:
            self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def run_steps(members: list[Member], readers: dict, cfg: TrainConfig, device, run: RunDir | None, callback,
              stop: StopSignals):
    use_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")
    start = members[0].state.step
    bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
    try:
        for at in range(start, cfg.steps):
            batch = {hook: reader.next_batch().to(device, non_blocking=True) for hook, reader in readers.items()}
            logged = False
            for m in members:
                logged |= train_step(m, batch, cfg, use_bf16, tokens_seen=(at + 1) * cfg.batch_size)
            if logged:
                show_progress(bar, members)
            bar.update(1)
            due = run is not None and (at + 1 == cfg.steps or (cfg.checkpoint_every and (at + 1) % cfg.checkpoint_every == 0))
            if due:
                save_checkpoint(run, members, readers, cfg)
            if callback is not None:
                callback(at + 1, members[0].logs if len(members) == 1 else {m.name: m.logs for m in members})
            if stop.signum is not None:  # a signal arrived during this step: keep it, then stop
                if not due:
                    save_checkpoint(run, members, readers, cfg)
                raise TrainingStopped(stop.signum, at + 1, run.path)
    finally:
        bar.close()


def train_step(m: Member, batch: dict, cfg: TrainConfig, use_bf16: bool, tokens_seen: int) -> bool:
    """One optimizer step of one member (and its log line when due); True when it logged."""
    model, state = m.model, m.state
    for group in m.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(state.step, cfg)
    x = batch[m.hook] * state.scale
    target = batch[m.target] * state.target_scale if m.target is not None else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = model(x) if target is None else model(x, target)
    losses = dict(out.losses)
    if "sparsity" in losses:
        losses["sparsity"] = losses["sparsity"] * (sparsity_factor(state.step, cfg) * math.exp(state.log_coeff_mult))
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        where = f" ({m.name})" if m.name else ""
        raise FloatingPointError(f"loss became {loss.item()} at step {state.step}{where}; lower lr or check the data")
    m.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(model, m.optimizer, grad_clip=cfg.grad_clip)
    if cfg.target_l0 > 0:
        steer_l0(model, state, out.code.l0().item(), cfg)
    state.step += 1
    scale = state.scale if m.target is None else (state.scale, state.target_scale)
    splice_logs = m.monitor(model, state.step, scale=scale) if m.monitor else {}
    if state.step % cfg.log_every == 0 or state.step == cfg.steps or splice_logs:
        m.logs = log_step(m, x if target is None else target, out, losses, loss, tokens_seen, splice_logs)
        return True
    return False


def log_step(m: Member, y, out, losses, loss, tokens_seen: int, splice_logs: dict) -> dict:
    model, state = m.model, m.state
    window = min(model.cfg.dead_tokens, tokens_seen)
    logs = {"step": state.step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
            **batch_metrics(y, out.x_hat, out.code.l0()),
            "dead_share": (model.tokens_since_fired >= window).float().mean().item(),
            "lr": m.optimizer.param_groups[0]["lr"], "sparsity_coeff_mult": math.exp(state.log_coeff_mult),
            **splice_logs, "time": time.time()}
    if m.folder is not None:
        RunDir.append_log(m.folder / "log.jsonl", logs)
    if m.wandb_run is not None:
        m.wandb_run.log(logs, step=state.step)
    return logs


def show_progress(bar, members: list[Member]):
    """The bar's postfix for one dictionary; for a set, one compact line per log step."""
    if len(members) == 1:
        logs = members[0].logs
        bar.set_postfix(fvu=f"{logs['fvu']:.3f}", l0=f"{logs['l0']:.1f}", dead=f"{logs['dead_share']:.1%}")
        return
    bar.write(f"step {members[0].state.step}: " + " | ".join(
        f"{m.name} fvu {m.logs['fvu']:.3f} l0 {m.logs['l0']:.1f} dead {m.logs['dead_share']:.0%}" for m in members),
        file=sys.stderr)  # beside the bar


def save_checkpoint(run: RunDir, members: list[Member], readers: dict, cfg: TrainConfig):
    if len(members) == 1 and members[0].name == SINGLE:  # the flat layout of one-dictionary runs
        stores = {str(hook): reader.state_dict() for hook, reader in readers.items()}  # a transcoder's: two
        saved = {"loop": asdict(members[0].state), "store": next(iter(stores.values())) if len(stores) == 1 else stores}
    else:  # floats round-trip exactly in JSON
        saved = {"members": {m.name: asdict(m.state) for m in members},
                 "store": {str(hook): reader.state_dict() for hook, reader in readers.items()}}
    extras = {"cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        extras["cuda_rng"] = torch.cuda.get_rng_state()
    parts = {prefix(m): (m.model, m.optimizer) for m in members}
    run.save_checkpoint(members[0].state.step, parts, saved, extras, cfg.keep_checkpoints)


def finish(m: Member, readers: dict, cfg: TrainConfig, device) -> TrainResult:
    """Fold the activation scale in (the dictionary that leaves works on raw activations), measure
    it, warn about missed targets, save it."""
    model, state = m.model, m.state
    if m.target is None:
        model.fold_activation_scale_(state.scale)
    else:
        model.fold_activation_scale_(state.scale, state.target_scale)
    model.eval()
    reader = readers[m.hook]
    start = {hook: r.state_dict() for hook, r in readers.items()}  # every member evaluates the same rows
    # Each stored row at most once: a small cache is not cycled to make the count look larger.
    eval_batches = max(1, min(cfg.eval_tokens, reader.n_rows or cfg.eval_tokens) // cfg.batch_size)
    if m.target is None:
        batches = (reader.next_batch() for _ in range(eval_batches))
    else:
        batches = ((reader.next_batch(), readers[m.target].next_batch()) for _ in range(eval_batches))
    metrics, log_density = evaluate(model, batches, device)
    for hook, r in readers.items():
        r.load_state_dict(start[hook])
    metrics.update(activation_scale=state.scale, steps=state.step, data_rows=reader.n_rows)
    if cfg.target_l0 > 0:
        metrics["sparsity_coeff_mult"] = math.exp(state.log_coeff_mult)
        check_l0_target(metrics, cfg)
    if has_penalty(model):
        check_penalty(metrics)
    if m.folder is not None:
        io.save(model, m.folder / "sae", metadata=m.metadata, log_feature_density=log_density)
        io.write_json(m.folder / "metrics.json", metrics)
    if m.wandb_run is not None:
        m.wandb_run.summary.update({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        m.wandb_run.finish()
    return TrainResult(model, metrics, m.folder)


def has_penalty(model: SAE) -> bool:
    """Whether sparsity comes from a penalty (ReLU's L1, JumpReLU's L0) rather than a count (TopK)."""
    return hasattr(model.cfg, "l1_coeff") or hasattr(model.cfg, "l0_coeff")


def check_penalty(metrics: dict):
    """A sparsity penalty can buy sparsity by shrinking every code until reconstruction collapses
    (ReLU-L1 at a too-large coefficient, or steered to a too-small L0); say so, with the remedy."""
    gamma = metrics["shrinkage"]
    metrics["penalty_collapsed"] = not (0 < gamma < SHRINKAGE_LIMIT)  # NaN counts as collapsed
    if metrics["penalty_collapsed"]:
        warnings.warn(f"the sparsity penalty collapses reconstruction: FVU {metrics['fvu']:.3f}, codes shrunk by "
                      f"{gamma:.2f}x (best rescale of x_hat - b_dec); lower l1_coeff / l0_coeff or raise target_l0",
                      stacklevel=3)


def check_l0_target(metrics: dict, cfg: TrainConfig):
    """The L0 controller is slow integral control: say so when it did not get there."""
    ratio = metrics["l0"] / cfg.target_l0
    metrics["target_l0"] = cfg.target_l0
    metrics["target_l0_missed"] = not (1 - L0_TOLERANCE <= ratio <= 1 + L0_TOLERANCE)
    if metrics["target_l0_missed"]:
        warnings.warn(f"target_l0 {cfg.target_l0:g} missed: final L0 {metrics['l0']:.1f} is off by more than "
                      f"{L0_TOLERANCE:.0%} (coefficient multiplier {metrics['sparsity_coeff_mult']:.3g}); "
                      "train for more steps or raise l0_gain", stacklevel=3)


@torch.no_grad()
def initialise(model: SAE, store, cfg: TrainConfig, device, target_store=None) -> tuple[int, float, float]:
    """(step 0, activation scale, target scale) from the first batches, and b_dec (the target's
    centre for a transcoder); the readers are rewound afterwards."""
    x, y = first_batches(store, cfg, device), first_batches(target_store, cfg, device)
    scale, target_scale = activation_scale(x, cfg), activation_scale(y, cfg) if y is not None else 1.0
    if cfg.start == "continue":  # trained weights work on raw x: bring them into training units
        if model.cfg.normalize_decoder:  # rows were unit-norm at the scale it was trained at: reuse it
            target_scale = 1 / model.decoder_rows().norm(dim=1).mean().item()
            # a transcoder's decoder writes the target: its input keeps the data's scale (any scale
            # folds exactly: codes do not change)
            scale = scale if y is not None else target_scale
        if y is None:
            model.fold_activation_scale_(1 / scale)
        else:
            model.fold_activation_scale_(1 / scale, 1 / target_scale)
    else:
        model.init_b_dec_((y * target_scale) if y is not None else (x * scale), cfg.b_dec_init)
    model.normalize_decoder_()
    return 0, scale, target_scale


def first_batches(store, cfg: TrainConfig, device):
    if store is None:
        return None
    start = store.state_dict()
    x = torch.cat([store.next_batch() for _ in range(cfg.init_batches)]).to(device).float()
    store.load_state_dict(start)
    return x


def activation_scale(x, cfg: TrainConfig) -> float:
    """The factor that makes E||x|| = sqrt(d): one learning rate then fits every model and layer."""
    scale = math.sqrt(x.shape[1]) / x.norm(dim=1).mean().item() if cfg.scale_activations else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("cannot scale activations: the first batches have zero norm")
    return scale


def start_wandb(cfg: TrainConfig, record: dict, m: Member, run: RunDir | None):
    import wandb  # noqa: PLC0415 (slow import, optional dependency at run time)

    name = None if run is None else run.path.name + (f"/{m.name}" if m.name else "")
    wandb_run = wandb.init(project=cfg.wandb_project, config=record, id=m.state.wandb_id, resume="allow",
                           dir=str(m.folder) if m.folder else None, name=name, reinit=True)
    m.state.wandb_id = wandb_run.id
    return wandb_run
