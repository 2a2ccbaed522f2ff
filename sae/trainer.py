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

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import io
from .base import SAE
from .config import option
from .metrics import batch_metrics, evaluate


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
    b_dec_init: str = option("geometric_median", "initial b_dec: geometric_median, mean, zeros, or keep "
                             "(continue a trained dictionary: its weights and b_dec as they are)")
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
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("lr_warmup", "lr_decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)!r}")
        if self.lr_warmup + self.lr_decay > 1:
            raise ValueError(f"lr_warmup + lr_decay must be <= 1, got {self.lr_warmup + self.lr_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1!r}, {self.beta2!r}")
        if self.target_l0 < 0 or self.l0_gain <= 0:
            raise ValueError(f"target_l0 must be >= 0 and l0_gain > 0, got {self.target_l0!r}, {self.l0_gain!r}")
        if self.grad_clip < 0 or self.checkpoint_every < 0 or self.splice_every < 0 or self.splice_sequences <= 0:
            raise ValueError("grad_clip, checkpoint_every and splice_every must be >= 0, splice_sequences > 0")
        choices = {"b_dec_init": ("geometric_median", "mean", "zeros", "keep"), "binding_recipe": ("rebind", "plain"),
                   "device": ("auto", "cpu", "cuda"),
                   "autocast": ("auto", "none", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.resume and not self.run_dir:
            raise ValueError("resume needs a run_dir")


# Options that may differ between a run and its resumption: they do not change the numbers.
RESUMABLE_DIFFERENCES = {"resume", "run_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                         "eval_tokens", "wandb", "wandb_project", "device", "splice_every", "splice_sequences"}


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


def steer_l0(state: LoopState, l0: float, cfg: TrainConfig):
    """Integral control in log space: raise the coefficient while L0 is above target, lower it below.

    Starts after the sparsity warm-up (during it L0 is high by design). Log space makes the
    response proportional to the relative error, whatever the coefficient's scale.
    """
    if cfg.target_l0 > 0 and state.step >= cfg.sparsity_warmup * cfg.steps:
        error = math.log(max(l0, 1e-3)) - math.log(cfg.target_l0)
        state.log_coeff_mult = min(max(state.log_coeff_mult + cfg.l0_gain * error, -30.0), 30.0)


def train(model: SAE, data, *, callback: Callable[[int, dict], None] | None = None,
          metadata: dict | None = None, **options) -> TrainResult:
    """Train `model` on `data` (a (N, d_in) tensor or a cache directory). Options: TrainConfig fields.

    `callback(step, logs)` runs after every optimizer step. `metadata` (model_name, hook_name, ...)
    is written into the saved dictionary's cfg.json; for a cache it defaults to the cache's own.
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown training option {', '.join(unknown)}; "
                         "model options (k, l1_coeff, ...) are set when constructing the SAE")
    cfg = TrainConfig(**options)
    if getattr(model, "architecture", "") == "binding" and cfg.binding_recipe == "rebind" \
            and model.cfg.slot_transform != "identity":  # the identity control has no M to find
        from .rebind import train_binding  # noqa: PLC0415

        return train_binding(model, data, callback=callback, metadata=metadata, **asdict(cfg))
    if cfg.target_l0 > 0 and not hasattr(model.cfg, "l1_coeff") and not hasattr(model.cfg, "l0_coeff"):
        raise ValueError("target_l0 steers a sparsity penalty: use it with relu or jumprelu (TopK sets L0 by k)")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    use_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")

    from .store import make_store  # noqa: PLC0415 (the store imports safetensors readers lazily too)

    store = make_store(data, batch_size=cfg.batch_size, seed=cfg.seed, hook=cfg.hook or None)
    if store.d_in != model.d_in:
        raise ValueError(f"data has d_in={store.d_in} but the SAE expects d_in={model.d_in}")
    if hasattr(store, "cache"):
        metadata = {"model_name": store.cache.manifest.get("model"), "hook_name": store.hook, **(metadata or {})}
    monitor = make_splice_monitor(cfg, metadata or {}, device) if cfg.splice_every else None
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=device.type == "cuda")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    run_record = {"train": asdict(cfg), "architecture": model.architecture, "model": model.config_dict(),
                  "data": describe_data(data, cfg.hook)}

    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        print(f"resume: no checkpoint in {run_dir}, starting from scratch")
    if checkpoint is not None:
        check_same_run(run_dir, run_record)
        saved, extras = io.load_checkpoint(checkpoint, model, optimizer)
        state = LoopState(**saved["loop"])
        store.load_state_dict(saved["store"])
        torch.set_rng_state(extras["cpu_rng"])
        if device.type == "cuda" and "cuda_rng" in extras:
            torch.cuda.set_rng_state(extras["cuda_rng"])
        truncate_log(run_dir / "log.jsonl", state.step)
    else:
        if run_dir is not None:
            refuse_to_overwrite(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            io.write_json(run_dir / "config.json", run_record)
        torch.manual_seed(cfg.seed)
        state = LoopState(scale=initialise(model, store, cfg, device))

    wandb_run = start_wandb(cfg, run_record, run_dir, state.wandb_id) if cfg.wandb else None
    if wandb_run is not None:
        state.wandb_id = wandb_run.id
    tokens_seen = state.step * cfg.batch_size
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", dynamic_ncols=True, mininterval=1.0)
    logs: dict = {}
    while state.step < cfg.steps:
        step = state.step
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        x = store.next_batch().to(device, non_blocking=True) * state.scale
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(x)
        losses = dict(out.losses)
        if "sparsity" in losses:
            losses["sparsity"] = losses["sparsity"] * (sparsity_factor(step, cfg) * math.exp(state.log_coeff_mult))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.remove_parallel_grad_()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        model.normalize_decoder_()
        if cfg.target_l0 > 0:
            steer_l0(state, out.code.l0().item(), cfg)
        state.step = step = step + 1
        tokens_seen += x.shape[0]
        splice_logs = monitor(model, step, scale=state.scale) if monitor is not None else {}

        if step % cfg.log_every == 0 or step == cfg.steps or splice_logs:
            window = min(model.cfg.dead_tokens, tokens_seen)
            logs = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                    **batch_metrics(x, out.x_hat, out.code.l0()),
                    "dead_share": (model.tokens_since_fired >= window).float().mean().item(),
                    "lr": optimizer.param_groups[0]["lr"], "sparsity_coeff_mult": math.exp(state.log_coeff_mult),
                    **splice_logs, "time": time.time()}
            bar.set_postfix(fvu=f"{logs['fvu']:.3f}", l0=f"{logs['l0']:.1f}", dead=f"{logs['dead_share']:.1%}")
            if run_dir is not None:
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(logs) + "\n")
            if wandb_run is not None:
                wandb_run.log(logs, step=step)
        bar.update(1)
        if run_dir is not None and (step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save_checkpoint(run_dir, cfg, model, optimizer, state, store)
        if callback is not None:
            callback(step, logs)
    bar.close()

    # The dictionary that leaves the trainer works on raw activations: fold the scale in.
    model.fold_activation_scale_(state.scale)
    model.eval()
    eval_batches = max(1, cfg.eval_tokens // cfg.batch_size)
    metrics, log_density = evaluate(model, (store.next_batch() for _ in range(eval_batches)), device)
    metrics["activation_scale"] = state.scale
    metrics["steps"] = state.step
    if cfg.target_l0 > 0:
        metrics["sparsity_coeff_mult"] = math.exp(state.log_coeff_mult)
    if run_dir is not None:
        io.save(model, run_dir / "sae", metadata=metadata, log_feature_density=log_density)
        io.write_json(run_dir / "metrics.json", metrics)
    if wandb_run is not None:
        wandb_run.summary.update({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        wandb_run.finish()
    return TrainResult(model, metrics, run_dir)


def make_splice_monitor(cfg: TrainConfig, metadata: dict, device):
    """Loss recovered by splicing, every cfg.splice_every steps (eval/splice.py)."""
    model_id, hook = metadata.get("model_name"), metadata.get("hook_name")
    if not model_id or not hook:
        raise ValueError("splice_every needs the model and hook: train on an activation cache, or pass "
                         "metadata={'model_name': ..., 'hook_name': ...}")
    from .eval.splice import make_splice_callback  # noqa: PLC0415 (loads transformer-lens)

    return make_splice_callback(model_id, hook, cfg.splice_every, n_sequences=cfg.splice_sequences,
                                device=str(device))


@torch.no_grad()
def initialise(model: SAE, store, cfg: TrainConfig, device) -> float:
    """Activation scale and b_dec from the first batches; the reader is rewound afterwards."""
    start = store.state_dict()
    x = torch.cat([store.next_batch() for _ in range(cfg.init_batches)]).to(device).float()
    store.load_state_dict(start)
    scale = math.sqrt(model.d_in) / x.norm(dim=1).mean().item() if cfg.scale_activations else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("cannot scale activations: the first batches have zero norm")
    if cfg.b_dec_init == "keep":  # trained weights work on raw x: bring them into training units
        if model.cfg.normalize_decoder:  # rows were unit-norm at the scale it was trained at: reuse it
            scale = 1 / model.decoder_rows().norm(dim=1).mean().item()
        model.fold_activation_scale_(1 / scale)
    else:
        model.init_b_dec_(x * scale, cfg.b_dec_init)
    model.normalize_decoder_()
    return scale


# ---- run directory ----------------------------------------------------------------------------
def describe_data(data, hook: str) -> dict:
    """Enough to tell whether a resumed run reads the same data."""
    if torch.is_tensor(data):
        digest = hashlib.sha256(data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        return {"tensor": list(data.shape), "dtype": str(data.dtype), "sha256": digest}
    path = Path(data)
    manifest = path / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {"cache": str(path.resolve()), "hook": hook, "manifest_sha256": digest}


def refuse_to_overwrite(run_dir: Path):
    if (run_dir / "config.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass resume to continue it or choose another run_dir")


def check_same_run(run_dir: Path, record: dict):
    saved = io.read_json(run_dir / "config.json")
    differences = []
    for section in ("architecture", "model", "data"):
        if saved.get(section) != record[section]:
            differences.append(section)
    for key, value in record["train"].items():
        if key not in RESUMABLE_DIFFERENCES and saved.get("train", {}).get(key) != value:
            differences.append(f"{key} ({saved.get('train', {}).get(key)!r} -> {value!r})")
    if differences:
        raise ValueError(f"cannot resume {run_dir}: its checkpoint is from another config "
                         f"(differs in {', '.join(differences)})")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path | None) -> Path | None:
    if run_dir is None or not checkpoint_dir(run_dir).is_dir():
        return None
    complete = sorted(p for p in checkpoint_dir(run_dir).glob("step_*") if (p / "trainer.json").is_file())
    return complete[-1] if complete else None


def save_checkpoint(run_dir: Path, cfg: TrainConfig, model, optimizer, state: LoopState, store):
    saved = {"loop": asdict(state), "store": store.state_dict()}  # floats round-trip exactly in JSON
    extras = {"cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        extras["cuda_rng"] = torch.cuda.get_rng_state()
    io.save_checkpoint(checkpoint_dir(run_dir) / f"step_{state.step:09d}", model, optimizer, saved, extras)
    finished = sorted(checkpoint_dir(run_dir).glob("step_*"))
    for old in finished[: max(len(finished) - cfg.keep_checkpoints, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def truncate_log(path: Path, step: int):
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the kill
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def start_wandb(cfg: TrainConfig, record: dict, run_dir: Path | None, run_id: str | None):
    import wandb  # noqa: PLC0415 (slow import, optional dependency at run time)

    return wandb.init(project=cfg.wandb_project, config=record, id=run_id, resume="allow",
                      dir=str(run_dir) if run_dir else None,
                      name=run_dir.name if run_dir else None)
