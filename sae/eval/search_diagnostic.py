"""Why the binding recipe finds no map on a drawn world: the dictionary, or the search?

    python -m sae.eval.search_diagnostic w05 w10 --out results/search_diagnostic.json

For each named world of the random sample (sae/eval/world_sample.py, draw 0) this trains the
standard SAE of the recipe's first phase exactly as the sample benchmark does (TopK over
n_slots * n_latents codes, 75% of its 2,000 steps, lr 4e-3, batch 256, 65,536 samples), then runs
the recipe's search (`match_within`, the recipe's settings) on

    rows         the rows the recipe's first search takes (`search_rows`), seeds ranked by co-firing
    true         the effective atoms M_s d_a nearest those rows, each once: the same atoms, exact
    true+noise   those atoms, each turned by a random orthogonal direction to cos c with itself

and reports the pairs found, the rows' precision (best |cos| with an effective atom), and where
the search's first true seed sits in its seed order against its seed budget. A true seed is two
candidates {a->b, a'->b'} with a, a' one slot's rows and b, b' another slot's rows of the same
atoms. Where `true` finds a map and `rows` does not, the dictionary is not precise enough for the
search; where noise at the rows' own precision already loses it, the search's seed order is what
breaks (RESULTS.md §1).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

import sae
from sae.core.config import argument, option, parse_config
from sae.core.files import write_result
from sae.eval.world_sample import draw_worlds
from sae.eval.worlds import make_world
from sae.recipes import matching
from sae.recipes.binding import STANDARD_SHARE, never_together, search_config, search_rows

NOISE_COS = (0.999, 0.995, 0.99)


@dataclass
class DiagnosticConfig:
    worlds: list[str] = argument("names of drawn worlds (w00 ... w23 of draw 0, or c-bag etc.)")
    out: str = option("", "write the results as JSON here ('' = print only)")
    seed: int = option(0, "training seed")
    steps: int = option(2000, "the benchmark's step budget; the standard phase gets 75% of it")
    threads: int = option(1, "CPU threads for torch")


def standard_phase(draw, world, seed: int, steps: int):
    """The recipe's first phase as the sample benchmark runs it; returns the unit rows its first
    search takes and which of them never fire together."""
    x = world.sample(65536, seed=seed).x
    torch.manual_seed(seed)
    model = sae.TopKSAE(draw.cfg.d, world.n_slots * draw.n_latents, k=draw.k)
    model = sae.train(model, x, steps=int(STANDARD_SHARE * steps), batch_size=256, lr=4e-3, seed=seed).model
    with torch.no_grad():
        active = model.encode(x[:16384]) > 0
    _, searched = search_rows(active.float().mean(0))
    W = model.decoder_rows().detach()[searched]
    return W / W.norm(dim=1, keepdim=True), never_together(active, searched, searched)[0]


def true_seed_rank(V: torch.Tensor, slot: torch.Tensor, atom: torch.Tensor, n_seeds: int) -> int | None:
    """Position of the first true seed in the search's seed order (None: none among the seeds)."""
    K = matching._Evidence(matching.OneDictionary(V), search_config(len(V), 0))
    seeds = matching._seeds(K, 10 * n_seeds + 10**6)
    m = len(V)
    i, j, k, l = seeds[:, 0] // m, seeds[:, 0] % m, seeds[:, 1] // m, seeds[:, 1] % m
    true = (atom[i] == atom[j]) & (atom[k] == atom[l]) & (slot[i] == slot[k]) & (slot[j] == slot[l]) & (slot[i] != slot[j])
    hit = true.nonzero()
    return int(hit[0]) if len(hit) else None


def search(V: torch.Tensor, d: int, exclusive: torch.Tensor | None = None) -> int:
    return len(matching.match_within(V, search_config(len(V), 0), min_pairs=max(8, d), enough=d,
                                     exclusive=exclusive).pairs)


def diagnose(name: str, draw, cfg: DiagnosticConfig) -> dict:
    world = make_world(draw.cfg)
    d, A = draw.cfg.d, world.slot_atoms.shape[1]
    eff = world.slot_atoms.reshape(-1, d)
    eff = eff / eff.norm(dim=1, keepdim=True)
    t0 = time.time()
    U, exclusive = standard_phase(draw, world, cfg.seed, cfg.steps)
    best = (U @ eff.T).abs().max(1)
    out = {"world": name, "d": d, "n_slots": world.n_slots, "m_kind": draw.cfg.m_kind, "live_rows": len(U),
           "row_best_cos_median": float(best.values.median()), "effective_atoms": len(eff),
           "atoms_covered_0.9": float(((U @ eff.T).abs().max(0).values > 0.9).float().mean()),
           "train_s": round(time.time() - t0, 1)}
    out["pairs_rows"] = search(U, d, exclusive)
    nearest = best.indices.unique()
    T, slot, atom = eff[nearest], nearest // A, nearest % A
    budget = search_config(len(T), 0).n_seeds
    out.update(true_atoms=len(T), seed_budget=budget, pairs_true=search(T, d),
               first_true_seed_true=true_seed_rank(T, slot, atom, budget))
    g = torch.Generator().manual_seed(cfg.seed)
    for c in NOISE_COS:
        noise = torch.randn(T.shape, generator=g)
        noise = noise - (noise * T).sum(1, keepdim=True) * T
        P = c * T + math.sqrt(1 - c * c) * noise / noise.norm(dim=1, keepdim=True)
        out[f"pairs_noise_{c}"] = search(P, d)
        out[f"first_true_seed_noise_{c}"] = true_seed_rank(P, slot, atom, budget)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    cfg = parse_config(DiagnosticConfig, argv, "python -m sae.eval.search_diagnostic", __doc__.split("\n\n")[0],
                       positional=("worlds",))
    torch.set_num_threads(cfg.threads)
    draws = {d.name: d for d in draw_worlds(0, 24)[0]}
    unknown = [w for w in cfg.worlds if w not in draws]
    if unknown:
        print(f"error: no drawn world {unknown[0]!r} (valid: {', '.join(draws)})", file=sys.stderr)
        return 2
    results = []
    for name in cfg.worlds:
        results.append(diagnose(name, draws[name], cfg))
        print(results[-1], flush=True)
        if cfg.out:  # after each world, so a stop keeps what ran
            command = "python -m sae.eval.search_diagnostic " + " ".join(sys.argv[1:] if argv is None else argv)
            write_result(cfg.out, {"command": command, "torch": torch.__version__, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
