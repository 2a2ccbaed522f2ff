"""Train a sparse autoencoder on cached residual activations.

    python train.py                    # default job: cache the built-in scenes model, train a TopK SAE
    python train.py --arch jumprelu --l0-coeff 0.05 --data cache/my_cache --run-dir runs/jr
    python train.py --run-dir runs/jr --resume ...   # same options again: continue where it stopped
    python train.py cache --model scenes --hooks blocks.1.hook_resid_post --out cache/my_cache

Every option comes from a config dataclass (sae.TrainConfig, each architecture's Config, and
sae.lm.cache.CacheConfig), so --help always lists all of them with their defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

import sae
from sae.core.architectures.base import SAE
from sae.core.config import HelpFormatter, OptionError, add_option, add_options, from_args
from sae.core.files import describe_os_error
from sae.core.store import make_store
from sae.core.trainer import TrainingStopped
from sae.lm.cache import CacheConfig, write_cache

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
        description="Train a sparse autoencoder. With no arguments: the built-in default job. "
                    "`python train.py cache --help` for writing activation caches.",
        formatter_class=HelpFormatter)
    run = parser.add_argument_group("data and model")
    run.add_argument("--data", default="", help=f"activation cache directory ('' = built-in scenes cache, "
                                                f"written to {DEFAULT_CACHE} if absent)")
    run.add_argument("--arch", default=DEFAULT_JOB["arch"], choices=sorted(SAE.registry), help="architecture")
    run.add_argument("--n-latents", type=int, default=0, help="dictionary size (0 = expansion-factor * d_in)")
    run.add_argument("--expansion-factor", type=int, default=DEFAULT_JOB["expansion_factor"],
                     help="dictionary size as a multiple of d_in, when --n-latents is 0")
    add_threads_option(run)
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
        add_option(arch, name, kind, None, text)  # None: the architecture's own default
    training = parser.add_argument_group("training (sae.TrainConfig)")
    add_options(training, sae.TrainConfig, defaults=DEFAULT_JOB)
    return parser


def add_threads_option(parser):
    parser.add_argument("--threads", type=int, default=DEFAULT_JOB["threads"],
                        help="CPU threads for torch (0 = torch's default)")


def set_threads(n: int):
    if n < 0:
        raise OptionError("threads", f"must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


def build_sae(args, d_in: int) -> SAE:
    cls = SAE.registry[args.arch]
    structured = "sparsity" in cls.options()  # a structure that takes any of several sparsity rules
    rule = cls.rule_class(args.sparsity if structured else None)
    applicable = cls.options(rule.name)
    where = f"--arch {args.arch} ({cls.__name__}" + (f" with sparsity {rule.name})" if structured else ")")
    options = {}
    for name in model_option_table():
        value = getattr(args, name)
        if value is None:
            value = DEFAULT_JOB.get(name) if name in applicable else None
        if value is None:
            continue
        if name not in applicable:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {where}")
        options[name] = value
    if args.n_latents < 0:
        raise OptionError("n_latents", f"must be >= 0 (0 = --expansion-factor * d_in), got {args.n_latents}")
    if not args.n_latents and args.expansion_factor <= 0:
        raise OptionError("expansion_factor", f"must be a positive integer, got {args.expansion_factor}")
    return cls(d_in, args.n_latents or args.expansion_factor * d_in, **options)


def ensure_default_cache() -> Path:
    cfg = CacheConfig(out=str(DEFAULT_CACHE))
    if not (DEFAULT_CACHE / "manifest.json").exists():
        print(f"caching the built-in model's residual stream to {DEFAULT_CACHE} ...")
    return Path(write_cache(cfg))  # returns at once when complete; resumes a partial cache


def run_training(argv) -> int:
    args = build_train_parser().parse_args(argv)
    set_threads(args.threads)
    data = Path(args.data) if args.data else ensure_default_cache()
    # Read the manifest once for d_in and names (full checksums are verified by the trainer's reader).
    probe = make_store(str(data), batch_size=1, hook=args.hook or None, verify=False)
    info = {"d_in": probe.d_in, "hook": probe.hook}
    torch.manual_seed(args.seed)  # the SAE's initialisation is part of the run
    model = build_sae(args, info["d_in"])
    train_options = {f.name: getattr(args, f.name) for f in dataclasses.fields(sae.TrainConfig)}
    if not train_options["run_dir"]:
        train_options["run_dir"] = str(Path("runs") / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"{type(model).__name__}: d_in={model.d_in}, n_latents={model.n_latents}, "
          f"data={data} ({info['hook']}), run_dir={train_options['run_dir']}")
    start = time.time()
    result = sae.train(model, str(data), **train_options)  # model and hook names come from the cache
    print_metrics(result.metrics)
    print(f"done in {time.time() - start:.0f} s; dictionary saved to {result.run_dir / 'sae'} "
          f"(load with sae.load('{result.run_dir / 'sae'}'))")
    return 0


def print_metrics(metrics: dict):
    keys = ["fvu", "explained_variance", "mse", "cossim", "l2_ratio", "l0", "l1", "dead_share", "dense_share"]
    width = max(map(len, keys))
    print(f"end-of-run metrics over {metrics['tokens']} activations of the {metrics['data_rows']} in the data "
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["cache"]:
            return run_cache(argv[1:])
        return run_training(argv)
    except TrainingStopped as e:
        again = " ".join(shlex.quote(a) for a in ["python", "train.py", *argv] if a != "--resume")
        print(f"{e.signal_name} at step {e.step}: checkpoint written in {e.run_dir}; "
              f"continue with: {again} --resume", file=sys.stderr)
        return 128 + e.signum
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
