"""Synthetic binding benchmark: a binding SAE next to a standard SAE of the same latent budget and
sparsity, on matrix-bound worlds and on the controls that are not (binding.md §1-2).

    python -m sae.eval.binding_bench                          # CPU default: ref + 3 controls, 3 seeds
    python -m sae.eval.binding_bench --worlds ref,under --seeds 0,1,2,3,4 --steps 8000
    python -m sae.eval.binding_bench --list                   # the named worlds

All models go through `sae.train` with the same budget (n_latents per slot = --latents-per-dim × d,
a size a user would pick, never the world's atom count; every other option at its default): the standard TopK SAE, the binding SAE with
the defaults (the standard/find/rebind recipe of sae/recipes/binding.py; where it finds no map
the result it returns is the standard SAE, scored as one), and the same binding SAE trained
plainly (binding_recipe="plain": one run from the identity init) to show what the recipe adds.
Per world: mean ± std over seeds of

    fvu, l0, dead            reconstruction, sparsity, never-firing latents (on fresh samples)
    eff_mmcs                 Hungarian-matched |cos| of the decoder rows to all S·n effective atoms M_s d_a
    dict_mmcs                binding SAE: D against each slot's atoms, best slot
    transfer_seen / _ho      binding SAE: cos(M̂_s d̂_a, M_s d_a) on pairs seen / held out in training
    slot_acc, exact          the model's own claim (latent (s, a) = atom a in slot s; for the standard
                             SAE the latent matched to each effective atom): detected pairs put in the
                             right slot, and samples bound entirely right
    swap                     P(codes score their own scene above its attribute-swapped version); 0.5 = bag
    ho_slot, ho_coverage     held-out (atom, slot) pairs: bound in the right slot; best cos of any
                             decoder row with the held-out effective atom
    echo_pairs, echo_share   standard SAE: the echo detector (eval/echo.py) on its live decoder rows
    rebind_pairs, tie_cost, slot_usage   the recipe's truth-free verdicts

Results go to --out (JSON, one record per run plus the summary) and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, replace

import torch

import sae
from sae.core.files import write_result
from sae.core.metrics import fvu
from sae.eval import binding_metrics as bm
from sae.eval.echo import find_echoes
from sae.eval.worlds import WorldConfig, make_world

# name -> (world overrides of WorldConfig(), k); k = active latents (objects x families)
WORLDS = {
    "ref": (dict(), 6),                                         # d=32, 48 atoms, 2 slots, orthogonal M
    "over": (dict(families=(32, 32, 32)), 6),                   # 96 atoms: more superposition
    "under": (dict(families=(8, 8, 8)), 6),                     # 24 atoms < d: M not pinned down
    "sparse": (dict(family_prob=0.5), 3),
    "noisy": (dict(noise=0.3, coef_noise=0.4), 6),
    "occ75": (dict(occupancy=0.75), 5),
    "three_slots": (dict(n_slots=3), 9),
    "rotation_small": (dict(m_kind="rotation", theta=0.3), 6),
    "rotation_large": (dict(m_kind="rotation", theta=1.0), 6),
    "gaussian": (dict(m_kind="gaussian"), 6),
    "bag": (dict(control="bag"), 6),                            # controls: no shared map exists
    "independent": (dict(control="independent"), 6),
    "slot_id": (dict(control="slot_id"), 8),
    "magnitude": (dict(control="magnitude"), 6),
    "wide": (dict(d=256, families=(128, 128, 128)), 6),       # 384 atoms in d=256: real-model widths
    "wide_independent": (dict(d=256, families=(128, 128, 128), control="independent"), 6),
}
DEFAULT_WORLDS = "ref,bag,slot_id,under"
N_TEST = 4096  # test samples per (world, seed)
LATENTS_PER_DIM = 4  # n_latents per slot = this × d
MODELS = ("standard", "binding", "binding_plain")


def run_one(world_name: str, seed: int, steps: int, n_train: int, batch_size: int, lr: float,
            save_dir: str = "", latents_per_dim: int = LATENTS_PER_DIM, models: tuple = MODELS) -> dict:
    overrides, k = WORLDS[world_name]
    world = make_world(replace(WorldConfig(seed=seed), **overrides))
    x = world.sample(n_train, seed=seed).x
    S, d = world.n_slots, world.cfg.d
    # the dictionary size a user would pick: a multiple of d (never the world's atom count), and
    # every other option at its default
    n = latents_per_dim * d
    train = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_tokens=4 * batch_size)
    out = {"world": world_name, "seed": seed, "n_atoms": world.n_atoms, "n_latents": n, "d": d, "slots": S, "k": k}
    for name, make, recipe in (("standard", lambda: sae.TopKSAE(d, S * n, k=k), {}),
                               ("binding", lambda: sae.BindingSAE(d, n, n_slots=S, k=k), {}),
                               ("binding_plain", lambda: sae.BindingSAE(d, n, n_slots=S, k=k),
                                {"binding_recipe": "plain"})):
        if name not in models:
            continue
        t0 = time.time()
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recipe's fallback warning: recorded in its metrics
            result = sae.train(make(), x, **train, **recipe)
        model = result.model  # where the recipe found no map, the standard SAE it fell back to
        if save_dir:  # so later analyses (e.g. a new echo detector) need not retrain
            model.save(os.path.join(save_dir, world_name, str(seed), name))
        scores = score(model, world, seed)
        scores["time_s"] = time.time() - t0
        scores["architecture"] = model.architecture
        for key in ("rebind_pairs", "rebind_fallback", "rebind_rejected", "tie_cost", "tie_cost_start", "slot_usage"):
            if key in result.metrics:
                scores[key] = result.metrics[key]
        out[name] = scores
    return out


@torch.no_grad()
def score(model, world, seed: int, n_test: int = N_TEST, echo: bool = True) -> dict:
    test = world.sample(n_test, seed=10_000 + seed)
    codes = model.encode(test.x)
    W = model.W_dec.detach()
    sa, sb = world.swap_pairs(2048, seed=10_000 + seed)
    ca, cb = model.encode(sa.x), model.encode(sb.x)
    if model.architecture == "binding":
        D, M = model.dictionary.detach(), model.slot_transforms.detach()
        latent = bm.binding_latents(D, M, world.slot_atoms)  # the model's own claim
    else:
        latent, _ = bm.match_latents(W, world.slot_atoms)
    acc = bm.binding_accuracy(codes, test.coefs, latent)
    out = {"fvu": fvu(test.x, model.decode(codes)), "l0": bm.l0(codes), "dead": bm.dead_fraction(codes),
           "eff_mmcs": bm.effective_mmcs(W, world.slot_atoms), "slot_acc": acc.slot, "exact": acc.exact,
           "recall": acc.detection * acc.slot,
           "swap": bm.swap_discrimination(ca, cb, sa.coefs, sb.coefs, latent)}
    held = world.held_out
    if held.any():
        ht = world.sample(n_test, seed=10_000 + seed, split="held_out")
        ho = bm.binding_accuracy(model.encode(ht.x), ht.coefs, latent, pairs=held)
        out["ho_slot"], out["ho_recall"] = ho.slot, ho.detection * ho.slot
        out["ho_coverage"] = float(bm.coverage(W, world.slot_atoms[held]).mean())
    if echo and model.architecture != "binding":  # the echo detector on the standard SAE's live rows
        out.update(echo_scores(model, world, seed, codes if n_test == N_TEST else None))
    if model.architecture == "binding":
        out["dict_mmcs"], _ = bm.dictionary_mmcs(D, world.slot_atoms)
        if world.transforms is not None:
            seen = ~held
            seen[0] = False  # slot 1's map is the identity by construction
            out["transfer_seen"] = float(bm.transfer(D, M, world.slot_atoms, seen).mean())
            if held.any():
                out["transfer_ho"] = float(bm.transfer(D, M, world.slot_atoms, held).mean())
    return out


@torch.no_grad()
def echo_scores(model, world, seed: int, codes=None) -> dict:
    """The echo detector on a standard SAE's live rows, those that fire on the test sample
    (`codes`: the model's codes on it, when already computed; `world` may be given by name)."""
    if codes is None:
        if isinstance(world, str):
            overrides, _ = WORLDS[world]
            world = make_world(replace(WorldConfig(seed=seed), **overrides))
        codes = model.encode(world.sample(N_TEST, seed=10_000 + seed).x)
    echoes = find_echoes(model.W_dec.detach(), live=(codes != 0).any(0))
    return {"echo_pairs": len(echoes.pairs), "echo_share": echoes.share}


def summarise(records: list[dict]) -> dict:
    """world -> model -> metric -> [mean, std, n]."""
    out: dict = {}
    for r in records:
        for model in MODELS:
            for key, v in r.get(model, {}).items():
                if isinstance(v, str):
                    continue
                out.setdefault(r["world"], {}).setdefault(model, {}).setdefault(key, []).append(v)
    for world in out.values():
        for model in world.values():
            for key, vs in model.items():
                t = torch.tensor(vs, dtype=torch.float64)
                model[key] = [t.mean().item(), t.std().item() if len(vs) > 1 else 0.0, len(vs)]
    return out


COLUMNS = ("fvu", "eff_mmcs", "dict_mmcs", "transfer_seen", "transfer_ho", "slot_acc", "exact", "swap",
           "ho_slot", "ho_coverage", "echo_share", "rebind_pairs", "tie_cost", "slot_usage")


def table(summary: dict) -> str:
    lines = ["| world | model | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for world, models in summary.items():
        for model, m in models.items():
            cells = [f"{m[c][0]:.3f} ± {m[c][1]:.3f}" if c in m else "" for c in COLUMNS]
            lines.append(f"| {world} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(args, argv, worlds, records) -> dict:
    summary = summarise(records)
    report = {"command": "python -m sae.eval.binding_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": vars(args), "torch": torch.__version__,
              "worlds": {w: {"k": WORLDS[w][1], **asdict(replace(WorldConfig(), **WORLDS[w][0]))} for w in worlds},
              "summary": summary, "runs": records}
    write_result(args.out, report)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae.eval.binding_bench", description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default=DEFAULT_WORLDS, help=f"comma-separated names (default {DEFAULT_WORLDS})")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--n-train", type=int, default=65536, help="training samples drawn from each world")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--latents-per-dim", type=int, default=LATENTS_PER_DIM,
                   help=f"n_latents per slot = this × d (default {LATENTS_PER_DIM}); the standard SAE gets n_slots times that")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--out", default="binding_bench.json")
    p.add_argument("--save", default="", help="directory to save every trained SAE in (world/seed/model)")
    p.add_argument("--rescore-echo", action="store_true",
                   help="recompute the echo columns of the runs in --out from the SAEs in --save (no training)")
    p.add_argument("--list", action="store_true", help="print the named worlds and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (overrides, k) in WORLDS.items():
            print(f"{name:16s} k={k}  {overrides}")
        return 0
    worlds = args.worlds.split(",")
    models = tuple(m for m in MODELS if m in args.models.split(","))
    if not models or set(args.models.split(",")) - set(MODELS):
        print(f"error: --models must name some of {','.join(MODELS)}, got {args.models!r}", file=sys.stderr)
        return 2
    unknown = [w for w in worlds if w not in WORLDS]
    if unknown:
        print(f"error: unknown world {unknown[0]!r}; --list shows the names", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    # Results are rewritten after every run and runs already in --out are skipped, so a stopped
    # benchmark resumes where it was; seeds outermost so a partial run covers every world.
    records = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        same = ("steps", "n_train", "batch_size", "lr", "latents_per_dim")
        if any(previous["config"].get(key, LATENTS_PER_DIM) != getattr(args, key) for key in same):
            print(f"error: {args.out} holds runs with other --steps/--n-train/--batch-size/--lr/--latents-per-dim; "
                  "choose another --out", file=sys.stderr)
            return 2
        # runs from before a model was added to MODELS are redone
        records = [r for r in previous["runs"] if r["world"] in worlds and r["seed"] in seeds
                   and all(m in r for m in models)]
    if args.rescore_echo:  # e.g. after a change to the echo detector
        if not args.save:
            print("error: --rescore-echo needs --save, the directory the runs' SAEs were saved in", file=sys.stderr)
            return 2
        for r in records:
            where = os.path.join(args.save, r["world"], str(r["seed"]), "standard")
            if not os.path.isdir(where):
                print(f"error: {where}: no saved standard SAE for this run", file=sys.stderr)
                return 2
            r["standard"].update(echo_scores(sae.load(where), r["world"], r["seed"]))
        write_report(args, argv, worlds, records)
        print(table(summarise(records)))
        return 0
    done = {(r["world"], r["seed"]) for r in records}
    for seed in seeds:
        for world in worlds:
            if (world, seed) in done:
                continue
            records.append(run_one(world, seed, args.steps, args.n_train, args.batch_size, args.lr, args.save,
                                   args.latents_per_dim, models))
            r = records[-1]
            print(f"{world} seed {seed}: " + " | ".join(
                f"{m} dict_mmcs {r[m].get('dict_mmcs', math.nan):.3f} transfer_ho "
                f"{r[m].get('transfer_ho', math.nan):.3f} swap {r[m]['swap']:.3f} fvu {r[m]['fvu']:.3f}"
                for m in models if m != "standard")
                  + (f" | standard fvu {r['standard']['fvu']:.3f} swap {r['standard']['swap']:.3f} echo_share "
                     f"{r['standard']['echo_share']:.3f}" if "standard" in r else ""),
                  file=sys.stderr, flush=True)
            write_report(args, argv, worlds, records)
    print(table(summarise(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
