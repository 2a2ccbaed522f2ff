"""Scale-out on torch.distributed: launched by torchrun, gloo on CPU, NCCL on CUDA.

    torchrun --nproc_per_node=8 train.py --data cache --parallel data ...     # README: scale-out

Three ways to use R processes (`parallel`):
    data     every rank trains the same dictionaries on its disjoint slice of each global batch
             (rows [r*B/R, (r+1)*B/R) of the batch a single process would read); gradients are
             averaged by all-reduce as they are accumulated, so every rank takes the same Adam step
             and the result equals single-process training with the same batch_size up to float
             summation order. Firing (dead latents, AuxK), BatchTopK's batch-wide selection and
             threshold, and the L0 the controller reads are computed over the global batch.
    sets     the dictionaries of a set are dealt out to the ranks; each trains its share alone,
             reading only its own hooks (see train_spread).
    latents  each rank holds n/R latents of every dictionary (sae.core.sharded).
Rank 0 alone writes the run folder: checkpoints (with every rank's reader position), logs and the
finished dictionaries. A rank that loses a peer (killed, out of memory) raises PeerLost, one line
that says which checkpoint the same command with --resume continues from.
"""
from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae.core import io, sharded, trainer
from sae.core.files import first_line
from sae.core.architectures.base import SAE, Code
from sae.core.architectures.batchtopk import BatchTopK
from sae.core.config import OptionError
from sae.core.run_dir import RunDir, checkpoint_step
from sae.core.trainer import LoopState, TrainConfig, TrainingStopped, TrainResult

MODES = ("data", "sets", "latents")
# A peer that hangs (rather than dies, which its closed sockets report at once) stops the job after this.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("SAE_DIST_TIMEOUT_MIN", "10")))


class PeerLost(RuntimeError):
    """A collective failed because another rank died: the job stops, the last checkpoint stays."""


class SetupFailed(ValueError):
    """Rank 0 refused the run (its own error says why); the other ranks stop with this."""


@dataclass
class Group:
    rank: int
    world: int
    comm_seconds: float = 0.0  # time spent waiting in collectives (the benchmark's communication share)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(t, op=op)
        self.comm_seconds += time.perf_counter() - start
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks along dim 0 (same shape on every rank)."""
        start = time.perf_counter()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        self.comm_seconds += time.perf_counter() - start
        return torch.cat(parts)


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_GROUP: list[Group] = []  # this process's group, once joined (its comm_seconds add up over a job)


def init(device: str = "auto") -> Group:
    """Join the job's process group (NCCL when training on CUDA, else gloo); idempotent."""
    if not dist.is_initialized():
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:  # one GPU per process: torchrun's LOCAL_RANK picks it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    if not _GROUP:
        _GROUP.append(Group(dist.get_rank(), dist.get_world_size()))
    return _GROUP[0]


def agree(group: Group, make, what: str):
    """Run `make()` on rank 0 and give its result to every rank; if it raises there, the other
    ranks raise SetupFailed instead of waiting for a peer that will never come."""
    box = [None]
    if group.rank == 0:
        try:
            box = [("ok", make())]
        except BaseException:
            dist.broadcast_object_list([("failed", None)], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status != "ok":
        raise SetupFailed(f"rank {group.rank}: rank 0 could not {what} (its error says why)")
    return value


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception from a collective means a peer died or hung (gloo and NCCL words)."""
    if isinstance(e, (getattr(dist, "DistBackendError", ()), getattr(dist, "DistNetworkError", ()))):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        w in text for w in ("Connection closed", "Connection reset", "Broken pipe", "Gloo", "NCCL", "timed out",
                            "Socket Timeout", "ProcessGroup"))


# ---- data-parallel pieces --------------------------------------------------------------------
class RankSlice:
    """This rank's rows of every global batch of `whole`: rows [rank*b, (rank+1)*b), b = B/R.
    Every rank walks the same global order, so its position is the single-process reader's and
    the union of the slices is exactly the batch one process would train on."""

    def __init__(self, whole, rank: int, world: int):
        self.whole, self.rank, self.world = whole, rank, world
        b = whole.batch_size // world
        self.lo, self.hi = rank * b, (rank + 1) * b

    def next_batch(self) -> torch.Tensor:
        return self.whole.next_batch()[self.lo:self.hi]

    def state_dict(self) -> dict:
        return self.whole.state_dict()

    def load_state_dict(self, state: dict):
        self.whole.load_state_dict(state)

    def __getattr__(self, name):  # d_in, n_rows, hook, metadata, ... are the whole reader's
        return getattr(self.__dict__["whole"], name)


class GlobalCode(Code):
    """A Code whose l0() is the global batch's: the L0 controller and the logs read it, and
    every rank must steer by the same number or their weights drift apart."""

    group: Group | None = None

    def l0(self) -> torch.Tensor:
        local = super().l0().reshape(1).double()
        return (self.group.all_reduce(local) / self.group.world).float()[0]


def make_data_parallel(model: SAE, group: Group):
    """Make `model` a data-parallel replica in this process: gradients averaged over ranks as
    they are accumulated (so grad clipping and the decoder-row projection see the global
    gradient), firing tracked over the global batch, codes reporting the global L0, and
    BatchTopK selecting from the global batch. Instance-level: the class, cfg.json and checkpoints
    stay those of the architecture."""
    def average(param: torch.Tensor):
        in_place(group.all_reduce, param.grad).div_(group.world)

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(average)
    model._track_firing = lambda code, n_tokens: track_firing(model, code, n_tokens, group)
    rule = model.sparsity
    encode = rule.encode_code
    if isinstance(rule, BatchTopK):
        rule.encode_code = lambda sae, x: batch_topk_global(rule, sae, x, group) if sae.training else encode(sae, x)
    else:
        rule.encode_code = lambda sae, x: as_global(encode(sae, x), group) if sae.training else encode(sae, x)


def as_global(code: Code, group: Group) -> GlobalCode:
    out = GlobalCode(code.values, code.indices, code.n_total, code.extras)
    out.group = group
    return out


@torch.no_grad()
def track_firing(model: SAE, code: Code, n_tokens: int, group: Group):
    """A latent fired if it fired on any rank; every rank counts the global batch's tokens."""
    fired = group.all_reduce(code.active().to(torch.uint8), dist.ReduceOp.MAX).bool()
    model.tokens_since_fired += n_tokens * group.world
    model.tokens_since_fired[fired] = 0


def batch_topk_global(rule: BatchTopK, sae: SAE, x: torch.Tensor, group: Group) -> Code:
    """BatchTopK over the global batch: each row's top-`cap` candidates are local, the B*k
    largest of all ranks' candidates are chosen by one all-gather, as kernels.batch_topk_encode
    does in one process (cap doubles while any row may have lost selected latents past it)."""
    values, indices, keep, selected = sharded.select_batch_topk(x, sae, sae.b_dec, rule.k, x.shape[0] * group.world,
                                                                group)
    rule._update_threshold(sae, selected)  # the same EMA step on every rank
    return as_global(Code(values * keep.to(values.dtype), indices, sae.n_total), group)


def broadcast_model(model: SAE, device=None):
    """Rank 0's weights and buffers everywhere: replicas start equal whatever each rank's RNG did.
    Through `device` when given (NCCL moves CUDA tensors only)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if device is None or t.device == device:
                in_place(lambda buf: dist.broadcast(buf, src=0), t)
            else:
                buf = t.to(device)
                dist.broadcast(buf, src=0)
                t.copy_(buf)


def in_place(collective, t: torch.Tensor) -> torch.Tensor:
    """Run `collective` on t through a contiguous buffer when t is a view that is not (W_enc is
    stored latent-major and viewed transposed; gloo and NCCL want dense tensors)."""
    if t.is_contiguous():
        collective(t)
        return t
    buf = t.contiguous()
    collective(buf)
    return t.copy_(buf)


# ---- entry point -----------------------------------------------------------------------------
def train(models: dict[str, SAE], data, *, parallel: str = "data", hooks: dict | None = None,
          targets: dict | None = None, callback=None, metadata: dict | None = None, make_monitor=None,
          **options) -> dict[str, TrainResult]:
    """Train `models` (name -> SAE; "" for one dictionary in the flat run layout) in a torchrun
    job: every rank calls this with the same arguments. Options are TrainConfig fields;
    batch_size is the global batch. Returns name -> TrainResult on every rank (in `sets` mode,
    this rank's share); only rank 0 writes the run folder."""
    if parallel not in MODES:
        raise OptionError("parallel", f"must be one of {', '.join(MODES)}, got {parallel!r}")
    if options.get("binding_recipe", "rebind") == "rebind" and any(
            m.architecture == "binding" and getattr(m.cfg, "slot_transform", "") != "identity" for m in models.values()):
        raise OptionError("binding_recipe", "rebind trains in phases, not in step across ranks: pass plain")
    if options.get("splice_every"):  # its log lines would come on rank 0 only, and logs hold collectives
        raise OptionError("splice_every", "is not available under torchrun yet: evaluate the saved dictionary")
    group = init(options.get("device", "auto"))
    # Every rank must write into the same folder (a default name from the clock can differ by a second).
    options["run_dir"] = agree(group, lambda: options.get("run_dir", ""), "name the run folder")
    cfg = trainer.make_config(options)
    hooks = {name: (hooks or {}).get(name, cfg.hook) for name in models}
    kw = dict(hooks=hooks, targets=targets or {}, callback=callback, metadata=metadata, make_monitor=make_monitor)
    if parallel == "sets":
        return train_spread(models, data, cfg, group, **kw)
    if parallel == "latents":
        return train_latent_sharded(models, data, cfg, group, **kw)
    return train_data_parallel(models, data, cfg, group, **kw)


def train_data_parallel(models, data, cfg: TrainConfig, group: Group, *, hooks, targets, callback, metadata,
                        make_monitor) -> dict[str, TrainResult]:
    if cfg.batch_size % group.world:
        raise OptionError("batch_size", f"must be a multiple of the {group.world} ranks, got {cfg.batch_size}")
    device = trainer.pick_device(cfg.device)
    whole = trainer.open_readers(data, cfg, {*hooks.values(), *targets.values()})
    readers = {hook: RankSlice(r, group.rank, group.world) for hook, r in whole.items()}
    members = [trainer.make_member(name, model, readers, cfg, hooks[name], targets.get(name), metadata, device)
               for name, model in models.items()]
    for m in members:
        make_data_parallel(m.model, group)
    record = trainer.run_record(members, cfg, data)
    run = RunDir(cfg.run_dir, [m.folder for m in members]) if cfg.run_dir and group.rank == 0 else None
    checkpoint = agree(group, lambda: run.open(record, cfg.resume) if run is not None else None, "open the run folder")
    try:
        start(members, whole, readers, checkpoint, run, cfg, device, group)
        for m in members:
            if group.rank:  # rank 0 alone writes logs, checkpoints and dictionaries
                m.folder = None
            m.wandb_run = trainer.start_wandb(cfg, record, m, run) if cfg.wandb and group.rank == 0 else None
        with trainer.StopSignals(enabled=bool(cfg.run_dir)) as stop:
            data_parallel_steps(members, readers, cfg, device, lambda: save_all(run, members, readers, cfg, group),
                                callback, stop, group)
        # Every rank finishes (the same rows, the same weights): results agree everywhere.
        return {m.name: trainer.finish(m, whole, cfg, device) for m in members}
    finally:
        if run is not None:
            run.close()


def start(members, whole: dict, readers: dict, checkpoint, run, cfg: TrainConfig, device, group: Group):
    """Weights, loop state and reader positions at the first step this job takes."""
    if checkpoint is not None:
        # Other ranks keep no log: RunDir's log trimming is rank 0's.
        trainer.restore(run if run is not None else NoLog(), checkpoint, members, readers, device)
        ranks = io.read_json(checkpoint / "trainer.json")["state"].get("ranks")
        if ranks is not None and len(ranks) == group.world:  # else the global position restored above
            for hook, reader in readers.items():
                reader.load_state_dict(ranks[group.rank][str(hook)])
        return
    torch.manual_seed(cfg.seed)
    for m in members:
        broadcast_model(m.model)
        m.state = LoopState(*trainer.initialise(m.model, whole[m.hook], cfg, device,
                                                whole[m.target] if m.target is not None else None))


class NoLog:
    @staticmethod
    def truncate_log(path, step):
        pass


class WithRanks:
    """A RunDir whose checkpoints also hold every rank's reader position."""

    def __init__(self, run: RunDir, positions: list):
        self.run, self.positions = run, positions

    def save_checkpoint(self, step, parts, saved, extras, keep):
        self.run.save_checkpoint(step, parts, {**saved, "ranks": self.positions}, extras, keep)


def save_all(run, members, readers: dict, cfg: TrainConfig, group: Group):
    positions = [None] * group.world
    dist.all_gather_object(positions, {str(hook): r.state_dict() for hook, r in readers.items()})
    if run is not None:
        trainer.save_checkpoint(WithRanks(run, positions), members, readers, cfg)


def data_parallel_steps(members, readers, cfg: TrainConfig, device, save, callback, stop, group: Group):
    """The step loop of the data and latents modes; `save()` writes a checkpoint (every rank calls it)."""
    use_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")
    at = members[0].state.step
    bar = tqdm(total=cfg.steps, initial=at, desc="train", dynamic_ncols=True, mininterval=1.0,
                       disable=group.rank != 0)
    try:
        for at in range(members[0].state.step, cfg.steps):
            batch = {hook: r.next_batch().to(device, non_blocking=True) for hook, r in readers.items()}
            logged = False
            for m in members:
                logged |= trainer.train_step(m, batch, cfg, use_bf16, tokens_seen=(at + 1) * cfg.batch_size)
            if logged and group.rank == 0:
                trainer.show_progress(bar, members)
            bar.update(1)
            # A signal may reach one rank only: all stop at the same step, after one checkpoint.
            signum = int(group.all_reduce(torch.tensor([stop.signum or 0], device=device), dist.ReduceOp.MAX).item())
            every = cfg.checkpoint_every and (at + 1) % cfg.checkpoint_every == 0
            if cfg.run_dir and (signum or at + 1 == cfg.steps or every):
                save()
            if callback is not None:
                callback(at + 1, members[0].logs if len(members) == 1 else {m.name: m.logs for m in members})
            if signum:
                raise TrainingStopped(signum, at + 1, Path(cfg.run_dir))
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        raise PeerLost(peer_lost_line(group, at, cfg, e)) from None
    finally:
        bar.close()


def peer_lost_line(group: Group, step: int, cfg: TrainConfig, e: BaseException) -> str:
    last = RunDir(cfg.run_dir).latest_checkpoint() if cfg.run_dir else None
    kept = (f"the checkpoint at step {checkpoint_step(last)} in {cfg.run_dir} is kept: rerun the same command "
            "with --resume") if last is not None else "no checkpoint was written yet"
    # gloo's words without its source location: "[.../pair.cc:553] Connection closed by peer ..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e))
    reason = reason.split(". ")[0][:120]
    return f"rank {group.rank} of {group.world} lost a peer at step {step} ({reason}); the job stops; {kept}"


# ---- a set dealt out to the ranks ------------------------------------------------------------
def deal(models: dict[str, SAE], world: int) -> list[list[str]]:
    """Names per rank: largest dictionaries first, each to the least-loaded rank (parameters as
    the load), so a rank's share costs about 1/R of the set's steps."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for name in sorted(models, key=lambda n: (-sum(p.numel() for p in models[n].parameters()), n)):
        r = loads.index(min(loads))
        shares[r].append(name)
        loads[r] += sum(p.numel() for p in models[name].parameters())
    return shares


def train_spread(models, data, cfg: TrainConfig, group: Group, *, hooks, targets, callback, metadata,
                 make_monitor) -> dict[str, TrainResult]:
    """Each rank trains its share of the set as a set of its own, in run_dir/rank<r>/<name>,
    reading only its hooks. With a model stream each rank runs its own model replica up to its
    hooks: exchanging activations of every hook between ranks would cost more than the forward
    pass a rank repeats, and each rank stays independent (no collective per step: ranks with
    larger shares do not hold the others back, and one rank's failure leaves the others' runs
    whole). Each dictionary is bit-identical to training it alone (train_many's property)."""
    share = deal(models, group.world)[group.rank]
    if not share:
        return {}
    run_dir = str(Path(cfg.run_dir) / f"rank{group.rank}") if cfg.run_dir else ""
    mine = trainer.make_config({**asdict(cfg), "run_dir": run_dir})
    return trainer.train_members({n: models[n] for n in share}, data, mine, hooks={n: hooks[n] for n in share},
                                 targets={n: t for n, t in targets.items() if n in share}, callback=callback,
                                 metadata=metadata, make_monitor=make_monitor)


# ---- latent-sharded dictionaries -------------------------------------------------------------
def train_latent_sharded(models, data, cfg: TrainConfig, group: Group, *, hooks, targets, callback, metadata,
                         make_monitor) -> dict[str, TrainResult]:
    """Each rank trains its n/R latents of every dictionary on the whole batch (sae.core.sharded).
    Checkpoints hold the whole dictionaries and Adam states, gathered on the way (the format of a
    single-process run: either continues the other); at the end the shards are gathered into
    `models`, which every rank measures and rank 0 saves."""
    if targets:
        raise OptionError("parallel", "latents does not shard transcoders")
    device = trainer.pick_device(cfg.device)
    readers = trainer.open_readers(data, cfg, set(hooks.values()))  # every rank reads the whole batch
    folders = {name: (Path(cfg.run_dir) / name if name else Path(cfg.run_dir)) if cfg.run_dir else None for name in models}
    members = []
    for name, full in models.items():  # `full` stays where it is (the CPU): only shards reach the device
        broadcast_model(full, device)
        members.append(trainer.make_member(name, sharded.shard(full, group), readers, cfg, hooks[name], None,
                                           metadata, device))
        members[-1].folder = folders[name] if group.rank == 0 else None  # rank 0 logs
    record = trainer.run_record([trainer.Member(name, models[name], None, hooks[name], None, folders[name], {})
                                 for name in models], cfg, data)
    run = RunDir(cfg.run_dir, list(folders.values())) if cfg.run_dir and group.rank == 0 else None
    checkpoint = agree(group, lambda: run.open(record, cfg.resume) if run is not None else None, "open the run folder")
    try:
        if checkpoint is not None:
            restore_sharded(run, checkpoint, members, models, readers, device)
        else:
            torch.manual_seed(cfg.seed)
            for m in members:
                m.state = LoopState(*trainer.initialise(m.model, readers[m.hook], cfg, device))
        with trainer.StopSignals(enabled=bool(cfg.run_dir)) as stop:
            data_parallel_steps(members, readers, cfg, device,
                                lambda: save_all(run, gathered(members, models, group), readers, cfg, group),
                                callback, stop, group)
        return {m.name: finish_sharded(m, models[m.name], readers, cfg, device, group, metadata) for m in members}
    finally:
        if run is not None:
            run.close()


class OptimizerState:
    """Stands in for an optimizer where a checkpoint reads (state_dict) or fills (load_state_dict)
    the whole dictionary's Adam state, which no optimizer in this job holds."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict):
        self.state = state


def gathered(members, models: dict, group: Group) -> list:
    """Members holding the whole dictionaries (gathered into `models`) and their Adam states."""
    out = []
    for m in members:
        m.model.gather_into(models[m.name])
        names = [n for n, _ in m.model.named_parameters()]
        saved = m.optimizer.state_dict()
        state = {i: {key: m.model.gather_tensor(names[i], v) for key, v in per.items()}
                 for i, per in saved["state"].items()}
        out.append(trainer.Member(m.name, models[m.name], OptimizerState({"state": state, "param_groups": saved["param_groups"]}),
                                  m.hook, None, m.folder, m.metadata, m.state))
    return out


def restore_sharded(run, checkpoint, members, models: dict, readers, device):
    """A checkpoint of whole dictionaries (this mode's or a single process's) into the shards."""
    # (Ranks other than 0 keep no log; NoLog ignores the folder trainer.restore names.)
    fulls = [trainer.Member(m.name, models[m.name], OptimizerState(), m.hook, None, m.folder or Path("."), m.metadata)
             for m in members]
    trainer.restore(run if run is not None else NoLog(), checkpoint, fulls, readers, device)
    for m, full in zip(members, fulls):
        m.model.take_from(full.model)
        m.state = full.state
        names = [n for n, _ in m.model.named_parameters()]
        state = {i: {key: m.model.slice_tensor(names[i], v) for key, v in per.items()}
                 for i, per in full.optimizer.state["state"].items()}
        m.optimizer.load_state_dict({"state": state, "param_groups": full.optimizer.state["param_groups"]})


def finish_sharded(m, full: SAE, readers, cfg: TrainConfig, device, group: Group, metadata) -> TrainResult:
    """Gather the shards into `full`; every rank measures it (rank 0 saves it), as in data mode."""
    m.model.gather_into(full)
    out = trainer.make_member(m.name, full, readers, cfg, m.hook, None, metadata, device)
    out.state = m.state
    if group.rank:
        out.folder = None
    return trainer.finish(out, readers, cfg, device)
