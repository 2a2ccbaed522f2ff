"""Draw synthetic binding worlds at random, from ranges of every knob (sae/eval/worlds.py).

A benchmark over a handful of named worlds shows what its authors tried; a sample shows where a
method breaks. `draw_worlds(seed, n)` draws n matrix-bound worlds (and `controls`, one per
misspecified control, whose other knobs are drawn the same way), each knob independently:

    d                 log-uniform 32-256
    superposition     atoms / d, log-uniform 1.05-3 (the atoms split into 2-4 families at random)
    n_slots           2, 3 or 4
    m_kind            orthogonal (2/3) or gaussian (1/3, not orthogonal)
    zipf              atom frequencies within a family ∝ rank^-zipf, zipf uniform 0-1.2
    magnitude_spread  per-atom log-normal magnitude, σ uniform 0-0.6
    optional families each family optional with probability 0.35, then present with p uniform 0.3-0.9
    occupancy         uniform 0.5-0.95
    unbound features  none (1/4), else 4-24 of them carrying 2-20% of the variance
    coef_noise, noise uniform 0.1-0.3 and 0.02-0.1
and what the user picks: a dictionary of `multiple` × the true atom count per slot (log-uniform
1.25-4, never the count itself), and k = the world's mean L0 rounded up (both models get both).
A draw whose standard SAE would have more than MAX_COST = n_slots·n_latents·d weights in its
encoder is redrawn whole (the CPU budget), and how many were is recorded: this removes only the
corner where d, superposition, slots and multiple are all large at once.

`bins(draw)` gives each knob's bin for the per-knob summary. Deterministic given the seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

from sae.eval.worlds import WorldConfig, make_world

CONTROLS = ("bag", "independent", "slot_id", "magnitude")
MAX_COST = 2**19   # n_slots * n_latents * d of a drawn world's standard SAE


@dataclass(frozen=True)
class Draw:
    name: str
    cfg: WorldConfig
    multiple: float       # n_latents / n_atoms
    n_latents: int        # per slot: the binding SAE's D; the standard SAE gets n_slots times this
    k: int
    unbound_share: float  # as drawn (the world measures its own: World.variance_shares)

    def record(self) -> dict:
        cfg = asdict(self.cfg)
        return {"name": self.name, "world": cfg, "multiple": self.multiple, "n_latents": self.n_latents,
                "k": self.k, "n_atoms": self.cfg.n_atoms, "superposition": self.cfg.superposition}


def _log_uniform(r: random.Random, lo: float, hi: float) -> float:
    return math.exp(r.uniform(math.log(lo), math.log(hi)))


def _families(r: random.Random, n_atoms: int) -> tuple[int, ...]:
    F = r.choice((2, 3, 4))
    weights = [r.gammavariate(3.0, 1.0) for _ in range(F)]
    sizes = [max(3, int(round(n_atoms * w / sum(weights)))) for w in weights]
    sizes[0] += n_atoms - sum(sizes)
    if sizes[0] < 3:  # rounding took too much from the first family: spread the deficit
        sizes = [n_atoms // F + (i < n_atoms % F) for i in range(F)]
    return tuple(sizes)


def draw_config(r: random.Random, world_seed: int, d_range=(32, 256)) -> tuple[WorldConfig, float, float]:
    d = int(round(_log_uniform(r, *d_range)))
    sup = _log_uniform(r, 1.05, 3.0)
    n_atoms = max(int(math.ceil(sup * d)), 6)
    families = _families(r, n_atoms)
    n_slots = r.choice((2, 3, 4))
    m_kind = "orthogonal" if r.random() < 2 / 3 else "gaussian"
    probs = tuple(1.0 if r.random() >= 0.35 else round(r.uniform(0.3, 0.9), 3) for _ in families)
    share = 0.0 if r.random() < 0.25 else r.uniform(0.02, 0.2)
    n_unbound = r.randint(4, 24) if share > 0 else 0
    cfg = WorldConfig(d=d, families=families, n_slots=n_slots, m_kind=m_kind, zipf=round(r.uniform(0, 1.2), 3),
                      magnitude_spread=round(r.uniform(0, 0.6), 3),
                      family_probs=probs if any(p < 1 for p in probs) else (),
                      occupancy=round(r.uniform(0.5, 0.95), 3), n_unbound=n_unbound,
                      unbound_share=round(share, 3), coef_noise=round(r.uniform(0.1, 0.3), 3),
                      noise=round(r.uniform(0.02, 0.1), 3), seed=world_seed)
    multiple = _log_uniform(r, 1.25, 4.0)
    return cfg, multiple, share


def draw_worlds(seed: int, n_worlds: int, controls: tuple[str, ...] = CONTROLS, d_range=(32, 256),
                max_cost: int = MAX_COST) -> tuple[list[Draw], int]:
    """(draws, how many draws were redrawn for cost): n_worlds bound worlds w00..., then one world
    per control c-<name>."""
    r = random.Random(seed)
    out, redrawn = [], 0
    kinds = ["none"] * n_worlds + list(controls)
    for i, control in enumerate(kinds):
        while True:
            cfg, multiple, share = draw_config(r, world_seed=seed * 1000 + i, d_range=d_range)
            if control != "none":
                cfg = replace(cfg, control=control, m_kind="orthogonal")
            n_latents = max(int(round(multiple * cfg.n_atoms)), cfg.n_atoms + 1)
            if cfg.n_slots * n_latents * cfg.d <= max_cost:
                break
            redrawn += 1
        k = max(1, int(math.ceil(make_world(cfg).mean_l0())))
        name = f"w{i:02d}" if control == "none" else f"c-{control}"
        out.append(Draw(name, cfg, round(multiple, 3), n_latents, k, round(share, 3)))
    return out, redrawn


def bins(draw: Draw) -> dict[str, str]:
    """Each knob's bin, for the per-knob summary."""
    c = draw.cfg
    sup = c.superposition
    return {
        "d": "32-63" if c.d < 64 else "64-127" if c.d < 128 else "128-256",
        "superposition": "1.05-1.5" if sup < 1.5 else "1.5-2.2" if sup < 2.2 else "2.2-3",
        "slots": str(c.n_slots),
        "M": c.m_kind,
        "zipf": "0-0.4" if c.zipf < 0.4 else "0.4-0.8" if c.zipf < 0.8 else "0.8-1.2",
        "magnitude_spread": "0-0.3" if c.magnitude_spread < 0.3 else "0.3-0.6",
        "optional_families": "yes" if c.family_probs else "no",
        "occupancy": "0.5-0.72" if c.occupancy < 0.725 else "0.72-0.95",
        "unbound_share": "0" if not c.n_unbound else "0.02-0.1" if draw.unbound_share < 0.1 else "0.1-0.2",
        "multiple": "1.25-2" if draw.multiple < 2 else "2-4",
    }
