"""Benchmark: each scale-out mode as one process against `nproc` processes under torchrun.

    python -m sae.eval.scale_bench --out results/scale_bench.json                 # 1 vs 2 processes, CPU
    python -m sae.eval.scale_bench --nproc 8 --device cuda --d-in 768 --n-latents 65536 \\
        --wide-latents 1048576 --batch-size 8192 --out results/scale_bench_8gpu.json   # 8 GPUs

Modes (sae.core.distributed): data (one dictionary, the global batch split over the ranks), sets
(`nproc` dictionaries, one per rank, against all of them in one process: train_many), latents
(one dictionary of `wide_latents` latents, n/R per rank). Every variant is a fresh process (or
torchrun job) training on random data with the same options; warm-up steps are dropped and the
median of the timed steps kept. Reported: ms per step, tokens per second, and the communication
share of a step (rank 0's time inside collectives over its step time: on one machine that time
includes waiting for the slower rank). One process runs with `nproc` threads (the cores the
processes use) and with one thread.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sae
from sae.core import distributed
from sae.core.config import option, parse_config
from sae.core.files import write_result


@dataclass
class ScaleBenchConfig:
    out: str = option("", "write the table as JSON here ('' = print only)")
    nproc: int = option(2, "processes per torchrun job (one per GPU on CUDA)")
    device: str = option("cpu", "cpu (gloo) or cuda (NCCL)")
    d_in: int = option(128, "activation width")
    n_latents: int = option(2048, "latents of each dictionary in the data and sets modes")
    wide_latents: int = option(16384, "latents of the latent-sharded dictionary")
    k: int = option(16, "TopK's k")
    batch_size: int = option(2048, "global batch (tokens per step)")
    steps: int = option(25, "steps per run, warm-up included")
    warmup: int = option(5, "first steps left out of the timing")
    modes: str = option("data,sets,latents", "modes to measure, comma-separated")


# A variant's process gets its settings here, not as arguments: torchrun would read (abbreviated)
# options such as --nproc or --role as its own.
WORKER = "SAE_SCALE_BENCH_WORKER"


def job(args: ScaleBenchConfig, mode: str) -> tuple[dict, dict]:
    """(name -> dictionary, training options) of a mode: the same for one process and for R."""
    torch.manual_seed(0)
    n = args.wide_latents if mode == "latents" else args.n_latents
    names = [f"d{i}" for i in range(args.nproc)] if mode == "sets" else [""]
    models = {name: sae.TopKSAE(args.d_in, n, k=args.k) for name in names}
    options = dict(steps=args.steps, batch_size=args.batch_size, lr=1e-3, seed=0, log_every=args.steps,
                   eval_tokens=args.batch_size, device=args.device, checkpoint_every=0)
    return models, options


def work(args: ScaleBenchConfig, mode: str, variant: str, result: str) -> int:
    """One variant: train, timing every step (and rank 0's time in collectives)."""
    models, options = job(args, mode)
    data = torch.randn(args.batch_size * 4, args.d_in, generator=torch.Generator().manual_seed(0)).relu_()
    stamps, comm = [], []

    def tick(step, logs):
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        comm.append(distributed._GROUP[0].comm_seconds if distributed._GROUP else 0.0)

    if variant == "single":
        names = list(models)
        if names == [""]:
            sae.train(models[""], data, callback=tick, **options)
        else:
            sae.train_many(models, data, callback=tick, **options)
    else:
        distributed.train(models, data, parallel=mode, callback=tick, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
        comms = [b - a for a, b in zip(comm[args.warmup:], comm[args.warmup + 1:])]
        Path(result).write_text(json.dumps({"step_s": statistics.median(steps), "comm_s": statistics.median(comms)}))
    return 0


def run_variant(args: ScaleBenchConfig, mode: str, variant: str, threads: int, tmp: Path) -> dict:
    result = tmp / f"{mode}-{variant}-{threads}.json"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}"]
    me = ["-m", "sae.eval.scale_bench"]
    cmd = [sys.executable, *me] if variant == "single" else [*torchrun, *me]
    setting = {"args": asdict(args), "mode": mode, "variant": variant, "result": str(result)}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), WORKER: json.dumps(setting)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    timing = json.loads(result.read_text())
    tokens = args.batch_size * (args.nproc if mode == "sets" else 1)  # sets: every dictionary sees the batch
    return {"ms_per_step": 1e3 * timing["step_s"], "tokens_per_s": tokens / timing["step_s"],
            "comm_share": timing["comm_s"] / timing["step_s"], "threads_per_process": threads}


def main(argv=None) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if WORKER in os.environ:
        setting = json.loads(os.environ[WORKER])
        return work(ScaleBenchConfig(**setting["args"]), setting["mode"], setting["variant"], setting["result"])
    args = parse_config(ScaleBenchConfig, argv, "python -m sae.eval.scale_bench", __doc__.split("\n\n")[0])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        for mode in args.modes.split(","):
            rows[mode] = row = {
                f"1 process, {args.nproc} threads": run_variant(args, mode, "single", args.nproc, Path(tmp)),
                "1 process, 1 thread": run_variant(args, mode, "single", 1, Path(tmp)),
                f"{args.nproc} processes": run_variant(args, mode, "parallel", 1, Path(tmp))}
            for name, r in row.items():
                print(f"{mode:8s} {name:22s} {r['ms_per_step']:8.1f} ms/step {r['tokens_per_s']:10.0f} tokens/s "
                      f"comm {r['comm_share']:5.1%}", flush=True)
    report = {"command": "python -m sae.eval.scale_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "options": {k: getattr(args, k) for k in ("nproc", "device", "d_in", "n_latents", "wide_latents", "k",
                                                         "batch_size", "steps", "warmup")},
              "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "modes": rows}
    if args.out:
        write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
