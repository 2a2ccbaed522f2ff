"""Train a sparse autoencoder on cached residual activations.

    python train.py                    # default job: cache the built-in scenes model, train a TopK SAE
    python train.py --arch jumprelu --l0-coeff 0.05 --data cache/my_cache --run-dir runs/jr
    python train.py --run-dir runs/jr --resume ...   # same options again: continue where it stopped
    python train.py cache --model scenes --hooks blocks.1.hook_resid_post --out cache/my_cache
    python train.py --arch skip_transcoder --hook blocks.0.ln2.hook_normalized --target-hook blocks.0.hook_mlp_out ...
    python train.py dashboard runs/jr                 # feature dashboards: runs/jr/dashboard/index.html

Every option comes from a config dataclass (sae.TrainConfig, each architecture's Config, and
sae.lm.cache.CacheConfig), so --help always lists all of them with their defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import os
import re
import shlex
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

import sae
from sae.core import distributed
from sae.core.architectures.base import SAE
from sae.core.config import HelpFormatter, OptionError, add_option, add_options, from_args
from sae.core.files import describe_os_error
from sae.core.store import open_cache
from sae.core.trainer import TrainingStopped
from sae.eval import dashboard
from sae.lm import models as lm_models
from sae.lm.cache import CacheConfig, model_kwargs, write_cache
from sae.lm.stream import ModelStream, StreamConfig

DEFAULT_CACHE = Path("cache") / "scenes"

# The default job, small enough to run in under 3 minutes on 2 CPU cores. One thread: ops this
# small gain nothing from intra-op threads and stall when a core is busy (measured on a loaded
# 2-core machine: 154 ms per step with 2 threads, 8 ms with 1).
DEFAULT_JOB = dict(arch="topk", expansion_factor=8, k=8, steps=2000, batch_size=512, lr=1e-3, threads=1)


def model_option_table() -> dict[str, dict[str, object]]:
    """option name -> {architecture: default} over every registered architecture, each with its
    default sparsity rule (SAE.options: the structure's options, then the rule's)."""
    table: dict[str, dict[str, object]] = {}
    for arch, cls in SAE.registry.items():
        for name, (_, default, _) in cls.options().items():
            table.setdefault(name, {})[arch] = default
    return table


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a sparse autoencoder, or a set of them from one pass over the data (several "
                    "--hook patterns or option values: every combination is trained). With no arguments: the "
                    "built-in default job. `python train.py cache --help` for writing activation caches.",
        formatter_class=HelpFormatter)
    run = parser.add_argument_group("data and model (several values: a set, one dictionary per combination)")
    run.add_argument("--data", default="", help=f"activation cache directory ('' = built-in scenes cache, "
                                                f"written to {DEFAULT_CACHE} if absent)")
    run.add_argument("--hook", nargs="+", default=[],
                     help="hooks to train on: names, globs (blocks.*.hook_resid_post) or ranges "
                          "(blocks.{0..3}.hook_resid_post); default: the cache's only hook")
    run.add_argument("--target-hook", nargs="+", default=[],
                     help="transcoders (--arch transcoder / skip_transcoder): the hook each --hook is mapped to, "
                          "as names, globs or ranges paired in order with --hook's (e.g. --hook "
                          "blocks.0.ln2.hook_normalized --target-hook blocks.0.hook_mlp_out)")
    run.add_argument("--arch", nargs="+", default=[DEFAULT_JOB["arch"]], choices=sorted(SAE.registry),
                     help="architecture")
    run.add_argument("--n-latents", nargs="+", type=int, default=[0], help="dictionary size (0 = expansion-factor * d_in)")
    run.add_argument("--expansion-factor", nargs="+", type=int, default=[DEFAULT_JOB["expansion_factor"]],
                     help="dictionary size as a multiple of d_in, when --n-latents is 0")
    add_threads_option(run)
    run.add_argument("--parallel", choices=distributed.MODES, default="data",
                     help="under torchrun: data (each rank a slice of every batch), sets (the set's dictionaries "
                          "dealt out to the ranks) or latents (each rank n/R latents of every dictionary)")
    arch = parser.add_argument_group("architecture options (default: the architecture's own, with its sparsity rule's)")
    hints = {}  # the first definition of a shared option (the base class's) gives its help text
    for cls in SAE.registry.values():
        for name, (kind, _, help_text) in cls.options().items():
            hints.setdefault(name, (kind, help_text))
    for name, defaults in model_option_table().items():
        kind, help_text = hints[name]
        shown = ", ".join(f"{a}={d}" for a, d in defaults.items())
        job_default = DEFAULT_JOB.get(name)
        text = f"{help_text} [{shown}]" + (f" (default job: {job_default})" if job_default is not None else "")
        add_option(arch, name, kind, None, text, several=True)  # None: the architecture's own default
    stream = parser.add_argument_group("streaming straight from the model, instead of --data (sae.lm.stream)")
    add_options(stream, StreamConfig, skip=("hooks", "device"), defaults={"model": ""})
    training = parser.add_argument_group("training (sae.TrainConfig, shared by every dictionary of a set)")
    add_options(training, sae.TrainConfig, defaults=DEFAULT_JOB, skip=("hook",))
    return parser


def add_threads_option(parser):
    parser.add_argument("--threads", type=int, default=DEFAULT_JOB["threads"],
                        help="CPU threads for torch (0 = torch's default)")


def set_threads(n: int):
    if n < 0:
        raise OptionError("threads", f"must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


@dataclass
class Planned:
    """One dictionary of the run: its name in a set, and how to build it."""

    name: str
    arch: str
    hook: str
    size: tuple[int, int]  # (n_latents, expansion_factor)
    options: dict
    target: str | None = None  # a transcoder's output hook


def plan_dictionaries(args, hooks: list[str], targets: list[str] | None = None) -> list[Planned]:
    """Every combination of the hooks, architectures, sizes and option values asked for. A set's
    names show only what varies (blocks.1.hook_resid_post-k32), so its folders read as the sweep.
    `targets` pairs each hook with a transcoder's output hook."""
    targets = check_targets(args.arch, hooks, targets or [])
    for name in ("arch", "n_latents", "expansion_factor", *model_option_table()):
        refuse_repeats(name, getattr(args, name))
    sizes = [(n, e) for n in args.n_latents for e in args.expansion_factor]
    swept = {name: values for name in model_option_table() if len(values := (getattr(args, name) or [])) > 1}
    plans = []
    for hook, arch, size in itertools.product(hooks, args.arch, sizes):
        options = arch_options(args, arch)
        keys = sorted(options)
        for values in itertools.product(*(options[k] for k in keys)):
            chosen = dict(zip(keys, values))
            parts = ([hook] if len(hooks) > 1 else []) + ([arch] if len(args.arch) > 1 else [])
            parts += [f"n{size[0]}" if len(args.n_latents) > 1 else "", f"x{size[1]}" if len(args.expansion_factor) > 1 else ""]
            parts += [f"{k}{chosen[k]}" for k in keys if k in swept]
            plans.append(Planned("-".join(p for p in parts if p), arch, hook, size, chosen, targets.get(hook)))
    for name in model_option_table():  # an option given must apply to at least one architecture asked for
        if getattr(args, name) is not None and not any(name in p.options for p in plans):
            raise OptionError(name, f"applies to none of --arch {' '.join(args.arch)}")
    return plans


def check_targets(archs: list[str], hooks: list[str], targets: list[str]) -> dict[str, str]:
    """input hook -> output hook for transcoders; refuses targets without transcoders and back."""
    transcoders = [a for a in archs if "d_out" in SAE.registry[a].options()]
    if targets and len(transcoders) < len(archs):
        raise OptionError("target_hook", f"is for transcoders (--arch {' '.join(transcoders or ['transcoder'])}); "
                          f"{', '.join(a for a in archs if a not in transcoders)} reconstruct their own hook")
    if transcoders and not targets:
        raise OptionError("target_hook", f"is needed by --arch {transcoders[0]}: the hook it reconstructs")
    if targets and len(targets) != len(hooks):
        raise OptionError("target_hook", f"names {len(targets)} hooks for {len(hooks)} input hooks: "
                          "each --hook needs one, paired in order")
    return dict(zip(hooks, targets))


def refuse_repeats(name: str, values):
    if isinstance(values, list) and len(values) != len(set(map(str, values))):
        repeated = next(v for v in values if values.count(v) > 1)
        raise OptionError(name, f"lists {repeated} twice")


def arch_options(args, arch: str) -> dict[str, list]:
    """Option name -> values for one architecture; refuses options it does not take when it is the
    only architecture asked for (with several, each takes the options that apply to it)."""
    cls = SAE.registry[arch]
    structured = "sparsity" in cls.options()  # a structure that takes any of several sparsity rules
    sparsity = (getattr(args, "sparsity") or [None])[0] if structured else None
    rule = cls.rule_class(sparsity)
    applicable = cls.options(rule.name)
    where = f"--arch {arch} ({cls.__name__}" + (f" with sparsity {rule.name})" if structured else ")")
    options = {}
    for name in model_option_table():
        values = getattr(args, name)
        if values is None and name in applicable and name in DEFAULT_JOB:
            values = [DEFAULT_JOB[name]]
        if values is None:
            continue
        if name not in applicable:
            if len(args.arch) == 1:
                raise ValueError(f"--{name.replace('_', '-')} does not apply to {where}")
            continue
        options[name] = values if isinstance(values, list) and not is_list_option(name) else [values]
    return options


def is_list_option(name: str) -> bool:
    """Options whose one value is a list (group sizes): not swept."""
    return any(typing.get_origin(kind) is list for cls in SAE.registry.values()
               for n, (kind, _, _) in cls.options().items() if n == name)


def build_sae(plan: Planned, d_in: int, d_out: int = 0) -> SAE:
    n_latents, expansion = plan.size
    if n_latents < 0:
        raise OptionError("n_latents", f"must be >= 0 (0 = --expansion-factor * d_in), got {n_latents}")
    if not n_latents and expansion <= 0:
        raise OptionError("expansion_factor", f"must be a positive integer, got {expansion}")
    width = {"d_out": d_out} if plan.target and "d_out" not in plan.options else {}  # a transcoder's target width
    return SAE.registry[plan.arch](d_in, n_latents or expansion * d_in, **width, **plan.options)


def expand_hooks(patterns: list[str], available: list[str], where: str, option: str = "hook") -> list[str]:
    """Hook names from names, globs and {a..b} ranges, in the order asked, each once."""
    if not patterns:
        if len(available) > 1:
            raise OptionError(option, f"is needed: {where} holds several hooks ({', '.join(available)})")
        return list(available)
    found = []
    for pattern in patterns:
        matches = [h for p in expand_ranges(pattern) for h in available if fnmatch.fnmatchcase(h, p)]
        if not matches:
            raise OptionError(option, f"{pattern} matches no hook of {where} (it holds {', '.join(available)})")
        found += [h for h in matches if h not in found]
    return found


def expand_ranges(pattern: str) -> list[str]:
    """blocks.{0..2}.x -> blocks.0.x, blocks.1.x, blocks.2.x (one range per pattern)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    return [pattern[: m.start()] + str(i) + pattern[m.end():] for i in range(lo, hi + 1)]


def ensure_default_cache() -> Path:
    cfg = CacheConfig(out=str(DEFAULT_CACHE))
    if not (DEFAULT_CACHE / "manifest.json").exists():
        print(f"caching the built-in model's residual stream to {DEFAULT_CACHE} ...")
    return Path(write_cache(cfg))  # returns at once when complete; resumes a partial cache


def open_data(args):
    """(data for sae.train, its hooks as asked, transcoders' target hooks, hook -> width): a cache
    (--data, or the built-in default), or the model itself (--model: a stream, no cache on disk)."""
    if args.model and args.data:
        raise OptionError("data", "and {model} are two sources: give a cache or a model to stream from", model="model")
    if args.model:
        model = lm_models.load_model(args.model, "cpu", args.model_processing, model_kwargs(args))
        available = [h for h in model.hook_dict if not h.endswith(("hook_pattern", "hook_attn_scores"))]
        hooks = expand_hooks(args.hook, available, args.model) if args.hook else lm_models.default_hooks(args.model, model)
        # any hook may be a target: one that is not per token is refused by the stream, in one line
        targets = expand_hooks(args.target_hook, list(model.hook_dict), args.model, "target_hook") \
            if args.target_hook else []
        read = hooks + [t for t in targets if t not in hooks]  # one forward pass feeds inputs and targets
        stream = ModelStream(from_args(StreamConfig, args, hooks=read), model=model)
        return stream, hooks, targets, stream.plan.d_in
    data = Path(args.data) if args.data else ensure_default_cache()
    # Read the manifest for hook names and widths (full checksums are verified by the trainer's reader).
    cache = open_cache(str(data), verify=False)
    hooks = expand_hooks(args.hook, cache.hook_names, str(data))
    targets = expand_hooks(args.target_hook, cache.hook_names, str(data), "target_hook") if args.target_hook else []
    return str(data), hooks, targets, {h: cache.d_in(h) for h in hooks + targets}


def run_training(argv) -> int:
    args = build_train_parser().parse_args(argv)
    set_threads(args.threads)
    data, hooks, targets, widths = open_data(args)
    plans = plan_dictionaries(args, hooks, targets)
    train_options = {f.name: getattr(args, f.name) for f in dataclasses.fields(sae.TrainConfig) if f.name != "hook"}
    if not train_options["run_dir"]:
        what = args.arch[0] if len(plans) == 1 else "set"
        train_options["run_dir"] = str(Path("runs") / f"{what}-{time.strftime('%Y%m%d-%H%M%S')}")
    models, seen = {}, {}
    for plan in plans:
        torch.manual_seed(args.seed)  # each dictionary starts as it would alone: its initialisation is part of the run
        models[plan.name] = build_sae(plan, widths[plan.hook], widths.get(plan.target, 0))
        key = (plan.hook, plan.target, plan.arch, repr(sorted(models[plan.name].config_dict().items())))
        if key in seen:  # e.g. --n-latents 0 256 with --expansion-factor 4 on d_in 64
            raise ValueError(f"the options make {seen[key]} and {plan.name} the same dictionary: drop one value")
        seen[key] = plan.name
    start = time.time()
    if distributed.launched():  # one of several processes torchrun started (README: scale-out)
        results = train_distributed(args, plans, models, data, train_options)
    elif len(plans) == 1:
        model = models[plans[0].name]
        hook = plans[0].hook + (f" -> {plans[0].target}" if plans[0].target else "")
        print(f"{type(model).__name__}: d_in={model.d_in}, n_latents={model.n_latents}, "
              f"data={data} ({hook}), run_dir={train_options['run_dir']}")
        results = {"": sae.train(model, data, hook=plans[0].hook, target=plans[0].target, **train_options)}
    else:
        print(f"{len(plans)} dictionaries from one pass over {data}: {', '.join(models)}; run_dir={train_options['run_dir']}")
        results = sae.train_many(models, data, hooks={p.name: p.hook for p in plans},
                                 targets={p.name: p.target for p in plans if p.target}, **train_options)
    for name, result in results.items():
        print_metrics(result.metrics, name)
        print(f"dictionary saved to {result.run_dir / 'sae'} (load with sae.load('{result.run_dir / 'sae'}'))")
    print(f"done in {time.time() - start:.0f} s")
    return 0


def train_distributed(args, plans, models: dict, data, train_options: dict) -> dict:
    """The set (or the one dictionary, in the flat run layout) through sae.core.distributed;
    the results of the ranks that wrote them (rank 0; in sets mode each rank its share)."""
    names = {p.name: p.name if len(plans) > 1 else "" for p in plans}
    results = distributed.train({names[p.name]: models[p.name] for p in plans}, data, parallel=args.parallel,
                                hooks={names[p.name]: p.hook for p in plans},
                                targets={names[p.name]: p.target for p in plans if p.target}, **train_options)
    return {name: r for name, r in results.items() if r.run_dir is not None}


def print_metrics(metrics: dict, name: str = ""):
    keys = ["fvu", "explained_variance", "mse", "cossim", "l2_ratio", "l0", "l1", "dead_share", "dense_share"]
    width = max(map(len, keys))
    source = "from the stream" if metrics["data_rows"] is None else f"of the {metrics['data_rows']} in the data"
    print(f"{name + ': ' if name else ''}end-of-run metrics over {metrics['tokens']} activations {source} "
          "(eval mode, raw activations):")
    for key in keys:
        print(f"  {key:<{width}}  {metrics[key]:.4g}")


def run_cache(argv) -> int:
    parser = argparse.ArgumentParser(prog="train.py cache", description="Write an activation cache.",
                                     formatter_class=HelpFormatter)
    add_options(parser, CacheConfig)
    add_threads_option(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    path = write_cache(from_args(CacheConfig, args))
    print(f"cache written to {path}")
    return 0


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same one with --resume (under torchrun, its launcher
    on one node; several nodes rerun their own torchrun commands)."""
    launcher = ["python"]
    if distributed.launched():
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if nodes > 1:
            return "the same torchrun command on every node, with --resume"
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={os.environ['WORLD_SIZE']}"]
    return " ".join(shlex.quote(a) for a in [*launcher, "train.py", *argv] if a != "--resume") + " --resume"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["cache"]:
            return run_cache(argv[1:])
        if argv[:1] == ["dashboard"]:  # its own options and one-line errors (sae/eval/dashboard.py)
            return dashboard.main(argv[1:])
        return run_training(argv)
    except TrainingStopped as e:
        print(f"{e.signal_name} at step {e.step}: checkpoint written in {e.run_dir}; "
              f"continue with: {resume_command(argv)}", file=sys.stderr)
        return 128 + e.signum
    except distributed.PeerLost as e:  # another rank died: this one says what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except OptionError as e:
        print(f"error: {e.cli_message()}", file=sys.stderr)
        return 2
    except OSError as e:  # the file and the reason, not a bare errno
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{describe_os_error(e)}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError) as e:  # LoadError, CacheError, OutputError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
