"""Benchmark: N dictionaries from one pass over the data against N separate runs.

    python -m sae.eval.sets_bench --out results/sets_bench.json          # MiniLM, ~15 min on 2 cores
    python -m sae.eval.sets_bench --smoke                                # the scenes model, seconds

Four dictionaries, two ways to make them a set (four hooks; four values of k on one hook), two
sources (a cache on disk; the model itself, streamed): each set is trained once by `train.py` as
one process and once as four processes run one after the other, with the same options. Reported
per case: wall time and peak RSS of the set's process against the four separate runs' summed wall
time and largest peak RSS, and their ratio. The variants are interleaved (set, separate, set,
separate ...) and each measured `--repeats` times, median kept, so a busy machine hits both alike.
Every process is a real `train.py` run: its own imports, model load and cache reads included.
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.core.config import option, parse_config
from sae.core.files import write_result
from sae.eval.minilm_study import write_corpus

TRAIN_PY = str(Path(__file__).resolve().parents[2] / "train.py")
CASES = {  # name -> (hooks, k values); each case is 4 dictionaries
    "4 hooks": (["blocks.{0..3}.hook_normalized_resid_post"], ["32"]),
    "4 k on one hook": (["blocks.3.hook_normalized_resid_post"], ["8", "16", "32", "64"]),
}
SMOKE_CASES = {
    "4 hooks": (["blocks.{0..3}.hook_resid_post"], ["4"]),
    "4 k on one hook": (["blocks.1.hook_resid_post"], ["2", "4", "6", "8"]),
}


def measure(args: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `train.py` process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, TRAIN_PY, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed: {proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def expand(pattern: str) -> list[str]:
    if "{0..3}" in pattern:
        return [pattern.replace("{0..3}", str(i)) for i in range(4)]
    return [pattern]


def variants(case, source: list[str], common: list[str], work: Path):
    """The set's arguments, and the four separate runs' arguments."""
    hooks, ks = case
    together = [*source, "--hook", *hooks, "--k", *ks, *common, "--run-dir", str(work / "set")]
    apart = [[*source, "--hook", hook, "--k", k, *common, "--run-dir", str(work / f"one-{i}-{k}")]
             for i, hook in enumerate(h for p in hooks for h in expand(p)) for k in ks]
    return together, apart


def run_case(name: str, case, source: list[str], common: list[str], repeats: int, work: Path) -> dict:
    walls = {"set": [], "separate": []}
    rss = {"set": [], "separate": []}
    for r in range(repeats):
        folder = work / f"{name.replace(' ', '_')}-{r}"
        together, apart = variants(case, source, common, folder)
        wall, peak = measure(together, work)
        walls["set"].append(wall), rss["set"].append(peak)
        parts = [measure(args, work) for args in apart]
        walls["separate"].append(sum(w for w, _ in parts)), rss["separate"].append(max(p for _, p in parts))
        shutil.rmtree(folder, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    peak = {k: statistics.median(v) for k, v in rss.items()}
    return {"wall_s": med, "peak_rss_mib": peak, "wall_ratio": med["set"] / med["separate"],
            "rss_ratio": peak["set"] / peak["separate"], "repeats": repeats, "all_walls": walls}


@dataclass
class SetsBenchConfig:
    out: str = option("", "write the table as JSON here ('' = print only)")
    smoke: bool = option(False, "the scenes model at tiny sizes (a check, not a measurement)")
    repeats: int = option(2, "measurements of each variant (median kept)")
    steps: int = option(300, "training steps of every dictionary")


def main(argv=None) -> int:
    args = parse_config(SetsBenchConfig, argv, "python -m sae.eval.sets_bench", __doc__.split("\n\n")[0])
    model, cases = ("scenes", SMOKE_CASES) if args.smoke else ("minilm", CASES)
    steps = 20 if args.smoke else args.steps
    common = ["--steps", str(steps), "--batch-size", "256", "--expansion-factor", "4", "--checkpoint-every", "0",
              "--eval-tokens", "4096", "--threads", "1"]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sets-bench-") as tmp:
        work = Path(tmp)
        source = ["--n-sequences", "256"]
        if not args.smoke:  # MiniLM reads text: scene captions and the shipped English, one per line
            write_corpus(work / "corpus.txt", n_captions=2000, seed=0)
            source = ["--source", str(work / "corpus.txt")]
        stream = ["--model", model, *source, "--buffer-rows", "16384"]
        cache_dir = work / "cache"  # the cache holds what the stream computes: the same sequences and hooks
        subprocess.run([sys.executable, TRAIN_PY, "cache", "--model", model, "--out", str(cache_dir), "--hooks",
                        *all_hooks(cases), *source, "--threads", "1"], cwd=work, check=True, capture_output=True)
        for source_name, source in (("cache", ["--data", str(cache_dir)]), ("stream", stream)):
            for name, case in cases.items():
                rows[f"{source_name}: {name}"] = row = run_case(name, case, source, common, args.repeats, work)
                print(f"{source_name:6s} {name:16s} set {row['wall_s']['set']:7.1f} s vs separate "
                      f"{row['wall_s']['separate']:7.1f} s (x{row['wall_ratio']:.2f}); peak RSS "
                      f"{row['peak_rss_mib']['set']:.0f} vs {row['peak_rss_mib']['separate']:.0f} MiB "
                      f"(x{row['rss_ratio']:.2f})", flush=True)
    report = {"command": "python -m sae.eval.sets_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": model, "steps": steps, "torch": torch.__version__, "python": platform.python_version(),
              "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "cases": rows}
    if args.out:
        write_result(args.out, report)
    return 0


def all_hooks(cases) -> list[str]:
    hooks = []
    for patterns, _ in cases.values():
        hooks += [h for p in patterns for h in expand(p) if h not in hooks]
    return hooks


if __name__ == "__main__":
    sys.exit(main())
