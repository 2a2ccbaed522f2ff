"""Do the library defaults work out of the box on planted sparse data, at every scale?

    python -m sae.eval.defaults_study --out results/defaults_study.json      # the full grid (~35 min CPU)
    python -m sae.eval.defaults_study --cells 32x4 --archs relu,topk --steps 300 --out /tmp/s.json

A planted world: n_atoms = 2·d random unit directions, exactly L0 of them active per sample with
magnitudes U(0.5, 1.5), plus Gaussian noise at 5% of the signal's RMS (an FVU floor of ~0.0025).
Every architecture is trained by `sae.train` at its library defaults with the same steps, batch
and lr, on n_latents = 4·d (an expansion factor a user picks without knowing the truth; the atom
count is never used). Fairness: a method gets only what its user would know and no option away
from its default. The one piece of truth handed out is the *wanted* L0, and only where the API
asks for it: k for TopK, BatchTopK and Matryoshka (a user sets k to the sparsity they want, and
here that is the planted L0). ReLU and JumpReLU have no L0 knob at their defaults and get nothing.
`relu_l1_5` is ReLU at the old default l1_coeff=5.0, kept to show the failure being fixed.

Also run (optional sections):
  sweep     ReLU over l1_coeff, the evidence for the default.
  steering  target_l0 = wanted L0 for ReLU and JumpReLU: does the controller reach it?
  issue     the issue's own world (worlds.py: d=32, 4 families of 32 atoms, 256 latents).
FVU and L0 are measured on held-out samples; dead share (never fired in 65,536 training tokens)
and the final loss parts (mse, sparsity, in training units) come from the trainer.
"""
from __future__ import annotations

import contextlib
import io as _io
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

import sae
from sae.core.config import option, parse_config
from sae.core.files import write_json
from sae.core.io import read_json
from sae.core.metrics import evaluate
from sae.eval.worlds import WorldConfig, make_world

OLD_L1_COEFF = 5.0  # ReLU's default before this study: collapses reconstruction at d=32, L0=4
# ReLU at its default stayed within this factor of the best TopK/BatchTopK FVU on every grid cell.
FVU_FACTOR = 3.0
COLLAPSE_FVU = 0.5    # the penalty-collapse rule (penalty_collapsed): explains under half the variance,
COLLAPSE_GAMMA = 1.5  # or codes shrunk so that x_hat - b_dec is best scaled up by 1.5x or more


@dataclass(frozen=True)
class Cell:
    """One scale of the grid: a planted world and the training budget every method gets."""

    d: int
    l0: int                 # planted (and, for the TopK family, wanted) active atoms per sample
    steps: int = 1000
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    n_train: int = 65536
    atoms_per_dim: int = 2  # n_atoms = atoms_per_dim * d
    expansion: int = 4      # n_latents = expansion * d: the user's rule, blind to n_atoms
    world: str = "planted"  # planted | issue (worlds.py, the issue's exact world)

    @property
    def name(self) -> str:
        return f"{self.world}_d{self.d}_l0{self.l0}_s{self.seed}"


# name -> (class, options from the wanted L0). Library defaults except what the API requires.
ARCHS = {
    "relu": (sae.ReLUSAE, lambda k: {}),
    "relu_l1_5": (sae.ReLUSAE, lambda k: {"l1_coeff": OLD_L1_COEFF}),
    "topk": (sae.TopKSAE, lambda k: {"k": k}),
    "batchtopk": (sae.BatchTopKSAE, lambda k: {"k": k}),
    "jumprelu": (sae.JumpReLUSAE, lambda k: {}),
    "matryoshka": (sae.MatryoshkaSAE, lambda k: {"k": k}),
}
DEFAULT_ARCHS = ("relu", "relu_l1_5", "topk", "batchtopk", "jumprelu")
# Spans d 32-768 and L0 4-64; L0 <= d/8 (denser than that is past what 2d atoms allow recovering).
DEFAULT_CELLS = ("32x4", "128x4", "128x16", "768x4", "768x64")
SWEEP_L1 = (0.25, 0.5, 1.0, 2.0, 5.0)


def planted(cell: Cell, n: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """(n, d) samples of the cell's world; the atoms depend on cell.seed only, the draw on `seed`."""
    d, n_atoms = cell.d, cell.atoms_per_dim * cell.d
    atoms = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(cell.seed))
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1_000_003 * (cell.seed + 1) + seed)
    chunks = []
    for start in range(0, n, 4096):  # chunked: the (rows, n_atoms) draw is large at d=768
        rows = min(4096, n - start)
        idx = torch.rand(rows, n_atoms, generator=g).argsort(1)[:, : cell.l0]
        mags = 0.5 + torch.rand(rows, cell.l0, generator=g)
        chunks.append(torch.einsum("bk,bkd->bd", mags, atoms[idx]))
    x = torch.cat(chunks)
    rms = x.pow(2).mean().sqrt()
    return x + noise * rms * torch.randn(n, d, generator=g)


def issue_world(cell: Cell, n: int, seed: int) -> torch.Tensor:
    """The issue's world: worlds.py with d=32, 4 families of 32 atoms (one active per family)."""
    families = (cell.atoms_per_dim * cell.d // cell.l0,) * cell.l0
    world = make_world(WorldConfig(d=cell.d, families=families, n_slots=1, held_out_frac=0.0, seed=cell.seed))
    return world.sample(n, seed=seed).x


def make_data(cell: Cell, n_test: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    draw = issue_world if cell.world == "issue" else planted
    return draw(cell, cell.n_train, seed=0), draw(cell, n_test, seed=1)


@torch.no_grad()
def held_out_metrics(model: sae.SAE, x: torch.Tensor) -> dict:
    """FVU and L0 on unseen samples, and the reconstruction bias gamma (the metrics' `shrinkage`:
    the best single rescale of x_hat - b_dec onto x - b_dec; > 1 means codes are shrunk)."""
    metrics, _ = evaluate(model, x.split(1024))
    return {"fvu": metrics["fvu"], "l0": metrics["l0"], "gamma": metrics["shrinkage"]}


def run_one(cell: Cell, arch: str, data, *, model_options: dict | None = None, train_options: dict | None = None,
            label: str | None = None, step_hook=None) -> dict:
    """Train one SAE on the cell's data and measure it; returns a flat JSON-able record.

    `step_hook(model)` returns a per-step callback (used to try a trainer change without making it)."""
    cls, options_for = ARCHS[arch]
    options = {**options_for(cell.l0), **(model_options or {})}
    torch.manual_seed(cell.seed)
    model = cls(cell.d, cell.expansion * cell.d, **options)
    last: dict = {}
    extra = step_hook(model) if step_hook else None

    def callback(step, logs):
        last.update(logs)
        if extra is not None:
            extra(step, logs)

    started = time.time()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(_io.StringIO()):
        warnings.simplefilter("always")  # the inner progress bar is hidden; warnings are recorded
        result = sae.train(model, data[0], steps=cell.steps, batch_size=cell.batch_size, lr=cell.lr,
                           seed=cell.seed, callback=callback, **(train_options or {}))
    record = {"cell": cell.name, "setting": asdict(cell), "arch": label or arch, "options": options,
              "train_options": train_options or {}, **held_out_metrics(result.model, data[1]),
              "dead_share": result.metrics["dead_share"], "seconds": round(time.time() - started, 1),
              "warnings": [str(w.message) for w in caught]}
    # Final training-batch loss parts (training units, coefficient at its final value).
    record["final"] = {k: last.get(k) for k in ("mse", "sparsity", "fvu", "l0", "sparsity_coeff_mult")}
    if hasattr(result.model, "log_threshold"):
        record["threshold_median"] = float(result.model.threshold.detach().median())
    return record


def threshold_controller(target: float, gain: float, warmup: float, steps: int):
    """The proposed target_l0 fix for JumpReLU, tried through the callback: move every log-threshold by
    gain * log(L0 / target) after each step instead of steering the coefficient (see the report)."""
    def make(model):
        seen = {}
        model.register_forward_hook(lambda mod, inp, out: seen.__setitem__("l0", out.code.l0().item()))

        @torch.no_grad()
        def hook(step, logs):
            if step >= warmup * steps:
                model.log_threshold.add_(gain * (math.log(max(seen["l0"], 1e-3)) - math.log(target)))
        return hook
    return make


# ---- the plan ----------------------------------------------------------------------------------
def parse_cell(spec: str, **overrides) -> Cell:
    d, l0 = (int(v) for v in spec.lower().split("x"))
    return Cell(d=d, l0=l0, **overrides)


def issue_cell(seed: int = 0) -> Cell:
    """The setting the issue measured: d=32, 128 atoms (4 per family), 256 latents, 2,000 steps."""
    return Cell(d=32, l0=4, steps=2000, batch_size=1024, lr=3e-3, seed=seed, n_train=20000,
                atoms_per_dim=4, expansion=8, world="issue")


def plan(cells: list[Cell], archs: list[str], sections: set[str]) -> list[tuple]:
    """(section, cell, arch, model_options, train_options, label, step_hook) for every run."""
    runs = []
    for cell in cells:
        large = cell.d >= LARGE_D
        if "grid" in sections:
            runs += [("grid", cell, a, {}, {}, a, None) for a in archs]
        if "sweep" in sections and cell.seed == 0:
            for arch, key, values in (SWEEP_LARGE if large else SWEEP):
                runs += [("sweep", cell, arch, {key: v}, {}, f"{arch}_{key}_{v:g}", None) for v in values]
        if "steering" in sections and cell.seed == 0 and not large:
            runs += steering_runs(cell)
    if "issue" in sections:
        runs += [("issue", issue_cell(), a, {}, {}, a, None) for a in archs]
    return runs


def steering_runs(cell: Cell) -> list[tuple]:
    """target_l0 = wanted L0 at the cell's lr and at the trainer's default lr (1e-3, the user's case)."""
    runs = []
    for lr in sorted({cell.lr, 1e-3}):
        c = replace(cell, lr=lr)
        to = {"target_l0": float(cell.l0)}
        runs.append(("steering", c, "relu", {}, to, f"relu_target_lr{lr:g}", None))
        runs.append(("steering", c, "jumprelu", {}, to, f"jumprelu_target_lr{lr:g}", None))
        fix = threshold_controller(cell.l0, gain=0.01, warmup=0.05, steps=c.steps)
        runs.append(("steering", c, "jumprelu", {}, {}, f"jumprelu_threshold_control_lr{lr:g}", fix))
    return runs


LARGE_D = 512  # cells at or above this are costly on CPU: one seed, a smaller batch, a shorter sweep
# (arch, option, values): evidence for the defaults beside the grid, including deliberate
# over-penalisation (relu 20, jumprelu 10) to calibrate the collapse warning.
SWEEP = (("relu", "l1_coeff", (0.25, 0.5, 2.0, 20.0)), ("jumprelu", "l0_coeff", (1.0, 10.0)))
SWEEP_LARGE = (("relu", "l1_coeff", (2.0,)), ("jumprelu", "l0_coeff", (1.0,)))


# ---- summary -----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 0.0, "n": len(values)}


def summarize(records: list[dict]) -> dict:
    """Per grid cell and arch: FVU, L0, dead share over seeds, and FVU over the TopK family's best."""
    table: dict = {}
    for section in ("grid", "issue"):
        groups: dict = {}
        for r in records:
            if r["section"] == section:
                c = r["setting"]
                key = f"{c['world']}_d{c['d']}_l0{c['l0']}"
                groups.setdefault(key, {}).setdefault(r["arch"], []).append(r)
        for key, by_arch in groups.items():
            row = {arch: {m: mean_std([r[m] for r in rs]) for m in ("fvu", "l0", "dead_share")}
                   for arch, rs in by_arch.items()}
            refs = [row[a]["fvu"]["mean"] for a in ("topk", "batchtopk") if a in row]
            for arch in row:
                row[arch]["fvu_over_topk_family"] = row[arch]["fvu"]["mean"] / min(refs) if refs else None
            table[f"{section}:{key}"] = row
    worst = {arch: max((row[arch]["fvu_over_topk_family"] for row in table.values()
                        if arch in row and row[arch]["fvu_over_topk_family"] is not None), default=None)
             for arch in {a for row in table.values() for a in row}}
    collapse = {f"{r['section']}:{r['cell']}:{r['arch']}": penalty_collapsed(r) for r in records
                if r["final"].get("sparsity") is not None}
    return {"table": table, "worst_fvu_over_topk_family": worst, "collapse_rule_fires": collapse}


def penalty_collapsed(record: dict) -> bool:
    """The collapse warning proposed for the trainer, calibrated on this grid: a run with a sparsity
    penalty that explains less than half the variance, or whose codes the penalty has shrunk so far
    that the best single rescale of the reconstruction, gamma, is >= 1.5 (gamma <= 0 or NaN: nothing
    is reconstructed). The sparsity/MSE ratio does not separate the cases: healthy L1 runs carry a
    sparsity term 2-3x their MSE, collapsed ones 0.4-2x."""
    if record["final"].get("sparsity") is None:
        return False
    gamma = record["gamma"]
    return record["fvu"] >= COLLAPSE_FVU or not 0 < gamma < COLLAPSE_GAMMA


def print_table(summary: dict, file=sys.stdout):
    archs = sorted({a for row in summary["table"].values() for a in row})
    print("| cell | " + " | ".join(archs) + " |", file=file)
    print("|---" * (len(archs) + 1) + "|", file=file)
    for key, row in summary["table"].items():
        cells = [f"{row[a]['fvu']['mean']:.3f} / {row[a]['l0']['mean']:.1f}" if a in row else "" for a in archs]
        print(f"| {key} | " + " | ".join(cells) + " |", file=file)
    print("(FVU / L0 on held-out samples, mean over seeds)", file=file)


# ---- command line ------------------------------------------------------------------------------
def build_cells(args) -> list[Cell]:
    cells = []
    for spec in args.cells.split(","):
        cell = parse_cell(spec, steps=args.steps, lr=args.lr, n_train=args.n_train)
        large = cell.d >= LARGE_D
        seeds = args.seeds_large if large else args.seeds
        batch = args.batch_size_large if large else args.batch_size
        cells += [replace(cell, seed=int(s), batch_size=batch) for s in seeds.split(",")]
    return cells


def run_plan(runs: list[tuple], out: str | None) -> list[dict]:
    records, data_for = [], {}
    for section, cell, arch, mo, to, label, hook in tqdm(runs, desc="defaults study", dynamic_ncols=True):
        key = replace(cell, steps=0, lr=0.0, batch_size=0)  # the data depend on the world only
        if key not in data_for:
            data_for = {key: make_data(cell)}  # one world in memory at a time (d=768 is large)
        records.append({"section": section, **run_one(cell, arch, data_for[key], model_options=mo,
                                                       train_options=to, label=label, step_hook=hook)})
        if out:  # after every run, so a long study that is stopped keeps what it measured
            write_json(out, {"records": records})
    return records


@dataclass
class StudyConfig:
    out: str = option("results/defaults_study.json", "JSON output (written atomically)")
    cells: str = option(",".join(DEFAULT_CELLS), "comma-separated DxL0 planted worlds")
    archs: str = option(",".join(DEFAULT_ARCHS), f"from {', '.join(ARCHS)}")
    sections: str = option("grid,sweep,steering,issue", "which parts to run")
    seeds: str = option("0,1", f"seeds for cells with d < {LARGE_D}")
    seeds_large: str = option("0", f"seeds for cells with d >= {LARGE_D}")
    steps: int = option(1000, "training steps of every run")
    batch_size: int = option(256, "batch size")
    batch_size_large: int = option(128, f"batch size for d >= {LARGE_D} (CPU time)")
    lr: float = option(3e-3, "learning rate")
    n_train: int = option(65536, "training samples per world")
    threads: int = option(1, "torch threads")
    summarize_only: bool = option(False, "recompute the summary of --out's records")


def main(argv=None) -> int:
    args = parse_config(StudyConfig, argv, "python -m sae.eval.defaults_study", __doc__.split("\n\n")[0])
    if args.summarize_only:
        saved = read_json(args.out)
        saved["summary"] = summarize(saved["records"])
        write_json(args.out, saved)
        print_table(saved["summary"])
        return 0
    torch.set_num_threads(args.threads)
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        print(f"defaults_study: error: --archs: unknown {', '.join(unknown)}; choose from {', '.join(ARCHS)}",
              file=sys.stderr)
        return 2
    started = time.time()
    records = run_plan(plan(build_cells(args), archs, set(args.sections.split(","))), args.out)
    summary = summarize(records)
    write_json(args.out, {"command": "python -m sae.eval.defaults_study " + " ".join(argv or sys.argv[1:]),
                          "args": asdict(args), "seconds": round(time.time() - started), "summary": summary,
                          "records": records})
    print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
