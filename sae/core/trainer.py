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
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sae.core import io
from sae.core.architectures.base import SAE
from sae.core.config import OptionError, option
from sae.core.metrics import batch_metrics, evaluate
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
    binding_recipe: str = option("rebind", "binding SAEs: rebind (bind, split, match, rebind: sae/rebind.py) or plain")
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


def train_loop(model: SAE, data, *, callback: Callable[[int, dict], None] | None = None,
               metadata: dict | None = None, make_monitor: Callable | None = None, **options) -> TrainResult:
    """The plain loop: train `model` on `data` (a (N, d_in) tensor or a cache directory) with the
    TrainConfig `options`. Most users call sae.train, which picks a recipe and ends up here.

    `callback(step, logs)` runs after every optimizer step. `metadata` (model_name, hook_name, ...)
    is written into the saved dictionary's cfg.json; for a cache it defaults to the cache's own.
    `make_monitor(metadata, device)` builds the evaluation that splice_every runs (it needs a
    language model, which this layer does not load). With a run_dir, SIGTERM/SIGINT checkpoint the
    current step and raise TrainingStopped.
    """
    cfg = make_config(options)
    if cfg.splice_every and make_monitor is None:
        raise OptionError("splice_every", "needs a language model to splice into: call sae.train, which attaches one")
    if cfg.target_l0 > 0 and not has_penalty(model):
        raise ValueError("target_l0 steers a sparsity penalty: use it with relu or jumprelu (TopK sets L0 by k)")
    device = pick_device(cfg.device)

    store = make_store(data, batch_size=cfg.batch_size, seed=cfg.seed, hook=cfg.hook or None)
    if store.d_in != model.d_in:
        raise ValueError(f"data has d_in={store.d_in} but the SAE expects d_in={model.d_in}")
    metadata = data_metadata(store, metadata)
    monitor = make_monitor(metadata, device) if cfg.splice_every else None
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=device.type == "cuda")
    record = {"train": asdict(cfg), "architecture": model.architecture, "model": model.config_dict(),
              "data": describe_data(data, cfg.hook)}
    run = RunDir(cfg.run_dir) if cfg.run_dir else None
    checkpoint = run.open(record, cfg.resume) if run is not None else None
    try:
        if checkpoint is not None:
            state = restore(run, checkpoint, model, optimizer, store, device)
        else:
            torch.manual_seed(cfg.seed)
            state = LoopState(scale=initialise(model, store, cfg, device))
        wandb_run = start_wandb(cfg, record, run, state) if cfg.wandb else None
        with StopSignals(enabled=run is not None) as stop:
            run_steps(Loop(model, optimizer, store, cfg, state, device, run, monitor, wandb_run, callback, stop))
        return finish(model, store, cfg, state, device, run, metadata, wandb_run)
    finally:
        if run is not None:
            run.close()


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


def restore(run: RunDir, checkpoint: Path, model, optimizer, store, device) -> LoopState:
    saved, extras = io.load_checkpoint(checkpoint, model, optimizer)
    state = LoopState(**saved["loop"])
    store.load_state_dict(saved["store"])
    torch.set_rng_state(extras["cpu_rng"])
    if device.type == "cuda" and "cuda_rng" in extras:
        torch.cuda.set_rng_state(extras["cuda_rng"])
    run.truncate_log(state.step)
    return state


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


@dataclass
class Loop:
    """What the step loop works with (one object, so each part of the loop is a short function)."""

    model: SAE
    optimizer: torch.optim.Optimizer
    store: object
    cfg: TrainConfig
    state: LoopState
    device: torch.device
    run: RunDir | None
    monitor: Callable | None
    wandb_run: object
    callback: Callable | None
    stop: StopSignals


def run_steps(loop: Loop):
    cfg, state = loop.cfg, loop.state
    use_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and loop.device.type == "cuda")
    tokens_seen = state.step * cfg.batch_size
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", dynamic_ncols=True, mininterval=1.0)
    logs: dict = {}
    try:
        while state.step < cfg.steps:
            x, out, losses, loss = step(loop, use_bf16)
            tokens_seen += x.shape[0]
            splice_logs = loop.monitor(loop.model, state.step, scale=state.scale) if loop.monitor else {}
            if state.step % cfg.log_every == 0 or state.step == cfg.steps or splice_logs:
                logs = log_step(loop, x, out, losses, loss, tokens_seen, splice_logs)
                bar.set_postfix(fvu=f"{logs['fvu']:.3f}", l0=f"{logs['l0']:.1f}", dead=f"{logs['dead_share']:.1%}")
            bar.update(1)
            checkpointed = loop.run is not None and (
                state.step == cfg.steps or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0))
            if checkpointed:
                save_checkpoint(loop)
            if loop.callback is not None:
                loop.callback(state.step, logs)
            if loop.stop.signum is not None:  # a signal arrived during this step: keep it, then stop
                if not checkpointed:
                    save_checkpoint(loop)
                raise TrainingStopped(loop.stop.signum, state.step, loop.run.path)
    finally:
        bar.close()


def step(loop: Loop, use_bf16: bool):
    """One optimizer step; returns the batch, the model's output, the weighted losses and their sum."""
    model, cfg, state, optimizer = loop.model, loop.cfg, loop.state, loop.optimizer
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(state.step, cfg)
    x = loop.store.next_batch().to(loop.device, non_blocking=True) * state.scale
    with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = model(x)
    losses = dict(out.losses)
    if "sparsity" in losses:
        losses["sparsity"] = losses["sparsity"] * (sparsity_factor(state.step, cfg) * math.exp(state.log_coeff_mult))
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {state.step}; lower lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.remove_parallel_grad_()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    model.normalize_decoder_()
    if cfg.target_l0 > 0:
        steer_l0(model, state, out.code.l0().item(), cfg)
    state.step += 1
    return x, out, losses, loss


def log_step(loop: Loop, x, out, losses, loss, tokens_seen: int, splice_logs: dict) -> dict:
    model, state = loop.model, loop.state
    window = min(model.cfg.dead_tokens, tokens_seen)
    logs = {"step": state.step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
            **batch_metrics(x, out.x_hat, out.code.l0()),
            "dead_share": (model.tokens_since_fired >= window).float().mean().item(),
            "lr": loop.optimizer.param_groups[0]["lr"], "sparsity_coeff_mult": math.exp(state.log_coeff_mult),
            **splice_logs, "time": time.time()}
    if loop.run is not None:
        loop.run.append_log(logs)
    if loop.wandb_run is not None:
        loop.wandb_run.log(logs, step=state.step)
    return logs


def save_checkpoint(loop: Loop):
    saved = {"loop": asdict(loop.state), "store": loop.store.state_dict()}  # floats round-trip exactly in JSON
    extras = {"cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        extras["cuda_rng"] = torch.cuda.get_rng_state()
    loop.run.save_checkpoint(loop.state.step, loop.model, loop.optimizer, saved, extras, loop.cfg.keep_checkpoints)


def finish(model: SAE, store, cfg: TrainConfig, state: LoopState, device, run: RunDir | None,
           metadata: dict, wandb_run) -> TrainResult:
    """Fold the activation scale in (the dictionary that leaves works on raw activations), measure
    it, warn about missed targets, save it."""
    model.fold_activation_scale_(state.scale)
    model.eval()
    # Each stored row at most once: a small cache is not cycled to make the count look larger.
    eval_batches = max(1, min(cfg.eval_tokens, store.n_rows) // cfg.batch_size)
    metrics, log_density = evaluate(model, (store.next_batch() for _ in range(eval_batches)), device)
    metrics.update(activation_scale=state.scale, steps=state.step, data_rows=store.n_rows)
    if cfg.target_l0 > 0:
        metrics["sparsity_coeff_mult"] = math.exp(state.log_coeff_mult)
        check_l0_target(metrics, cfg)
    if has_penalty(model):
        check_penalty(metrics)
    if run is not None:
        io.save(model, run.path / "sae", metadata=metadata, log_feature_density=log_density)
        io.write_json(run.path / "metrics.json", metrics)
    if wandb_run is not None:
        wandb_run.summary.update({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        wandb_run.finish()
    return TrainResult(model, metrics, run.path if run is not None else None)


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
def initialise(model: SAE, store, cfg: TrainConfig, device) -> float:
    """Activation scale and b_dec from the first batches; the reader is rewound afterwards."""
    start = store.state_dict()
    x = torch.cat([store.next_batch() for _ in range(cfg.init_batches)]).to(device).float()
    store.load_state_dict(start)
    scale = math.sqrt(model.d_in) / x.norm(dim=1).mean().item() if cfg.scale_activations else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("cannot scale activations: the first batches have zero norm")
    if cfg.start == "continue":  # trained weights work on raw x: bring them into training units
        if model.cfg.normalize_decoder:  # rows were unit-norm at the scale it was trained at: reuse it
            scale = 1 / model.decoder_rows().norm(dim=1).mean().item()
        model.fold_activation_scale_(1 / scale)
    else:
        model.init_b_dec_(x * scale, cfg.b_dec_init)
    model.normalize_decoder_()
    return scale


def start_wandb(cfg: TrainConfig, record: dict, run: RunDir | None, state: LoopState):
    import wandb  # noqa: PLC0415 (slow import, optional dependency at run time)

    wandb_run = wandb.init(project=cfg.wandb_project, config=record, id=state.wandb_id, resume="allow",
                           dir=str(run.path) if run else None, name=run.path.name if run else None)
    state.wandb_id = wandb_run.id
    return wandb_run
