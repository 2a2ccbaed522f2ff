"""Synthetic matrix-bound worlds (binding.md §1–2) and their misspecified controls.

A world is S slots ("objects") that each carry one attribute per family (a colour, a shape, ...):

    x = Σ_s  M_s · ( Σ_{attributes a in slot s}  c_a d_a )  + b + ε,      M_1 = I

with one shared dictionary D (rows d_a, unit norm) and one d×d matrix M_s per slot. The vector that
(atom a, slot s) adds to x is `slot_atoms[s, a]` = M_s d_a, the "effective atom" a standard SAE can
learn. The controls replace the shared-matrix structure with something that is *not* matrix binding
(a bag, per-slot dictionaries, slot-ID vectors, magnitudes), so that a method can be caught finding
structure that is not there.

    world = make_world(WorldConfig(d=32, families=(16, 16, 16), held_out_frac=0.25))
    train = world.sample(65536)                      # Samples(x, coefs)
    test = world.sample(4096, seed=1, split="held_out")   # every sample holds a held-out pair
    a, b = world.swap_pairs(2048)                    # scenes with one family's values exchanged

Realism knobs (all off by default, so the named worlds draw exactly what they always drew): atom
frequencies skewed within each family (`zipf`), per-atom magnitudes (`magnitude_spread`, log-normal),
optional families (`family_probs`), slot occupancy, and unbound features (`n_unbound`,
`unbound_share`): directions that fire whatever the slots hold and belong to no slot.
`World.interference()` measures how crowded the effective atoms are; `World.identifiable()` says
whether the atoms each slot uses span R^d (only then is M_s pinned down by the data).
sae/eval/world_sample.py draws whole worlds at random from ranges of every knob.

Everything is deterministic given the config's seed (world) and the seed passed to a sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

M_KINDS = ("orthogonal", "gaussian", "rotation", "identity")
CONTROLS = ("none", "bag", "independent", "slot_id", "magnitude")


@dataclass(frozen=True)
class WorldConfig:
    d: int = 32                                  # ambient dimension; superposition = n_atoms / d
    families: tuple[int, ...] = (16, 16, 16)     # attribute-family sizes; atoms = their sum
    n_slots: int = 2
    m_kind: str = "orthogonal"                   # orthogonal | gaussian | rotation | identity
    theta: float = 0.3                           # rotation angle (radians) for m_kind="rotation"
    occupancy: float = 1.0                       # P(a slot holds an object); ≥1 slot always does
    family_prob: float = 1.0                     # P(an object carries a family); ≥1 family always
    coef_noise: float = 0.2                      # coefficient c = 1 + coef_noise·N(0,1), ≥ 0.1
    noise: float = 0.05                          # additive Gaussian noise, expected norm ≈ noise
    bias_norm: float = 0.0                       # norm of a constant offset b
    held_out_frac: float = 0.125                 # share of each family held out of each slot s≥2
    held_out_pairs: tuple[tuple[int, int], ...] = ()   # extra (atom, slot) pairs, slot 0-based
    control: str = "none"                        # none | bag | independent | slot_id | magnitude
    slot_id_norm: float = 1.0                    # control="slot_id": norm of each slot's vector
    magnitude_ratio: float = 0.5                 # control="magnitude": slot s scaled by ratio**s
    zipf: float = 0.0                            # P(atom of rank r in its family) ∝ r^-zipf (0: uniform)
    magnitude_spread: float = 0.0                # atom a's coefficients scaled by exp(spread·N(0,1))
    family_probs: tuple[float, ...] = ()         # per family P(an object carries it); () = family_prob
    n_unbound: int = 0                           # unbound features: fire whatever the slots hold
    unbound_share: float = 0.0                   # ...with this share of E||x - b||² (set via their rate)
    seed: int = 0

    @property
    def n_atoms(self) -> int:
        return sum(self.families)

    @property
    def superposition(self) -> float:
        """Atoms per dimension n/d; M is pinned down by the data only when this exceeds 1."""
        return self.n_atoms / self.d


@dataclass
class Samples:
    x: torch.Tensor        # (N, d)
    coefs: torch.Tensor    # (N, S, n): coefficient of atom a in slot s (0 where absent)
    unbound: torch.Tensor | None = None   # (N, n_unbound) coefficients of the unbound features


@dataclass
class World:
    cfg: WorldConfig
    atoms: torch.Tensor              # (n, d) shared dictionary D, unit rows
    slot_atoms: torch.Tensor         # (S, n, d) what (atom a, slot s) adds to x
    transforms: torch.Tensor | None  # (S, d, d), M_1 = I; None when no shared map exists
    family: torch.Tensor             # (n,) family index of each atom
    held_out: torch.Tensor           # (S, n) bool: (a, s) never occurs in the training split
    slot_vectors: torch.Tensor       # (S, d) additive slot-ID vectors (zero unless control=slot_id)
    bias: torch.Tensor               # (d,)
    atom_weight: torch.Tensor | None = None    # (n,) within-family draw weights (None: uniform)
    atom_scale: torch.Tensor | None = None     # (n,) per-atom magnitude (None: 1)
    unbound_atoms: torch.Tensor | None = None  # (n_unbound, d) unit directions
    unbound_rate: float = 0.0                  # P(an unbound feature fires in a sample)

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def n_slots(self) -> int:
        return self.slot_atoms.shape[0]

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, n: int, seed: int | None = None, split: str = "train") -> Samples:
        """`split="train"` never uses a held-out (atom, slot) pair; `"held_out"` puts at least one
        held-out pair in every sample (the rest drawn as in training); `"all"` ignores hold-outs."""
        if split not in ("train", "held_out", "all"):
            raise ValueError(f"unknown split {split!r}")
        if split == "held_out" and not self.held_out.any():
            raise ValueError("this world holds nothing out")
        g = torch.Generator().manual_seed(self._seed(seed, split))
        coefs = self._draw_coefs(n, g, allow_held_out=(split != "train"))
        if split == "held_out":
            coefs = self._plant_held_out(coefs, g)
        unbound = self._draw_unbound(n, g)
        return Samples(self.render(coefs, g, unbound=unbound), coefs, unbound)

    def swap_pairs(self, n: int, seed: int | None = None) -> tuple[Samples, Samples]:
        """Training-split scenes and the same scenes with one family's attributes exchanged between
        two occupied slots ("red cube, blue sphere" vs "blue cube, red sphere"). Only pairs whose
        two scenes differ are kept; the swapped scene may use a held-out pair (it is never trained
        on, it is only scored). Same noise draw for both members of a pair."""
        g = torch.Generator().manual_seed(self._seed(seed, "swap"))
        S, fam = self.n_slots, self.family
        kept_a, kept_b = [], []
        while sum(len(c) for c in kept_a) < n:
            coefs = self._draw_coefs(2 * n, g, allow_held_out=False)
            s1 = torch.randint(0, S, (2 * n,), generator=g)
            s2 = (s1 + torch.randint(1, S, (2 * n,), generator=g)) % S
            f = torch.randint(0, len(self.cfg.families), (2 * n,), generator=g)
            swapped = coefs.clone()
            rows = torch.arange(2 * n)
            in_f = (fam[None, :] == f[:, None]).float()               # (2n, n)
            a1 = coefs[rows, s1] * in_f
            a2 = coefs[rows, s2] * in_f
            swapped[rows, s1] = coefs[rows, s1] - a1 + a2
            swapped[rows, s2] = coefs[rows, s2] - a2 + a1
            differ = ((a1 > 0).any(1) & (a2 > 0).any(1) & ((a1 > 0) != (a2 > 0)).any(1))
            kept_a.append(coefs[differ])
            kept_b.append(swapped[differ])
        ca, cb = torch.cat(kept_a)[:n], torch.cat(kept_b)[:n]
        eps = self._noise(n, g)
        u = self._draw_unbound(n, g)            # the same unbound features in both scenes
        return (Samples(self.render(ca, noise=eps, unbound=u), ca, u),
                Samples(self.render(cb, noise=eps, unbound=u), cb, u))

    def render(self, coefs: torch.Tensor, g: torch.Generator | None = None,
               noise: torch.Tensor | None = None, unbound: torch.Tensor | None = None) -> torch.Tensor:
        """x from coefficients (N, S, n): Σ_s coefs_s · slot_atoms_s + unbound + slot-ID + b + ε."""
        x = torch.einsum("bsn,snd->bd", coefs, self.slot_atoms)
        if unbound is not None and self.unbound_atoms is not None:
            x = x + unbound @ self.unbound_atoms
        occupied = (coefs > 0).any(-1).float()                          # (N, S)
        x = x + occupied @ self.slot_vectors + self.bias
        if noise is None:
            noise = self._noise(coefs.shape[0], g)
        return x + noise

    # -- what a benchmark reports beside the results ----------------------------------------------
    def interference(self) -> dict:
        """How crowded the effective atoms M_s d_a are: mean and max |cos| between distinct ones, next to
        the Johnson–Lindenstrauss scale √(2 ln N / d) that N random unit vectors in R^d reach."""
        E = self.slot_atoms.reshape(-1, self.slot_atoms.shape[-1]).double()
        E = E / E.norm(dim=1, keepdim=True).clamp_min(1e-12)
        N, d = E.shape
        C = (E @ E.T).abs()
        off = C[~torch.eye(N, dtype=torch.bool)]
        # controls may repeat a direction in every slot (bag, magnitude): those are one atom
        distinct = off[off < 1 - 1e-6]
        return {"n_effective": N, "mean_abs_cos": float(distinct.mean()) if len(distinct) else 0.0,
                "max_abs_cos": float(distinct.max()) if len(distinct) else 0.0,
                "jl_scale": math.sqrt(2 * math.log(N) / d)}

    def identifiable(self) -> bool:
        """Whether the data pin M_s down: a shared map exists, it is invertible, and for every slot the
        atoms that occur there (not held out) span R^d. Where they do not, M_s is free on the missing
        directions and no method can be asked to predict held-out pairs."""
        if self.cfg.control != "none" or self.transforms is None:
            return False
        d = self.atoms.shape[1]
        if any(torch.linalg.matrix_rank(M.double()) < d for M in self.transforms):
            return False
        return all(int(torch.linalg.matrix_rank(self.atoms[~self.held_out[s]].double())) >= d
                   for s in range(self.n_slots))

    def variance_shares(self, n: int = 8192, seed: int = 12345) -> dict:
        """Measured shares of E||x - mean||² carried by the bound atoms, the unbound features and noise."""
        g = torch.Generator().manual_seed(seed)
        coefs = self._draw_coefs(n, g, allow_held_out=False)
        u = self._draw_unbound(n, g)
        bound = torch.einsum("bsn,snd->bd", coefs, self.slot_atoms)
        unbound = u @ self.unbound_atoms if u is not None else torch.zeros_like(bound)
        noise = self._noise(n, g)
        total = self.render(coefs, noise=noise, unbound=u)
        var = lambda v: float((v - v.mean(0)).pow(2).sum(1).mean())  # noqa: E731
        t = var(total)
        return {"bound": var(bound) / t, "unbound": var(unbound) / t, "noise": var(noise) / t}

    def mean_l0(self, n: int = 8192, seed: int = 12345) -> float:
        """Mean number of active (slot, atom) pairs and unbound features per sample."""
        g = torch.Generator().manual_seed(seed)
        coefs = self._draw_coefs(n, g, allow_held_out=False)
        u = self._draw_unbound(n, g)
        l0 = (coefs > 0).sum((1, 2)).float()
        if u is not None:
            l0 = l0 + (u > 0).sum(1).float()
        return float(l0.mean())

    # -- internals ------------------------------------------------------------------------------
    def _seed(self, seed: int | None, split: str) -> int:
        # Distinct, reproducible streams per (world seed, sample seed, split).
        # (Not hash(): str hashing is salted per process.)
        base = 0 if seed is None else seed + 1
        split_id = ("train", "held_out", "all", "swap").index(split)
        return (self.cfg.seed * 1_000_003 + base * 1009 + split_id + 1) % (2**62)

    def _noise(self, n: int, g: torch.Generator | None) -> torch.Tensor:
        d = self.atoms.shape[1]
        if self.cfg.noise == 0:
            return torch.zeros(n, d)
        return torch.randn(n, d, generator=g) * (self.cfg.noise / math.sqrt(d))

    def _draw_unbound(self, n: int, g: torch.Generator) -> torch.Tensor | None:
        if self.unbound_atoms is None:
            return None
        fires = torch.rand(n, len(self.unbound_atoms), generator=g) < self.unbound_rate
        c = (1 + self.cfg.coef_noise * torch.randn(fires.shape, generator=g)).clamp_min(0.1)
        return c * fires

    def _draw_coefs(self, n: int, g: torch.Generator, allow_held_out: bool) -> torch.Tensor:
        cfg, S, na, F = self.cfg, self.n_slots, self.n_atoms, len(self.cfg.families)
        occupied = torch.rand(n, S, generator=g) < cfg.occupancy
        empty = ~occupied.any(1)
        occupied[empty, torch.randint(0, S, (int(empty.sum()),), generator=g)] = True
        # which families an object carries; an object carries at least one
        probs = torch.tensor(cfg.family_probs) if cfg.family_probs else torch.full((F,), float(cfg.family_prob))
        has = (torch.rand(n, S, F, generator=g) < probs) & occupied[..., None]
        bare = occupied & ~has.any(-1)
        has[bare.nonzero(as_tuple=True) + (torch.randint(0, F, (int(bare.sum()),), generator=g),)] = True
        coefs = torch.zeros(n, S, na)
        for f in range(F):
            members = (self.family == f).nonzero().squeeze(1)
            for s in range(S):
                w = torch.ones(len(members)) if self.atom_weight is None else self.atom_weight[members].clone()
                if not allow_held_out:
                    w = w * (~self.held_out[s, members]).float()
                if w.sum() == 0:            # every member held out of this slot: family absent
                    continue
                pick = members[torch.multinomial(w, n, replacement=True, generator=g)]
                c = (1 + cfg.coef_noise * torch.randn(n, generator=g)).clamp_min(0.1)
                if self.atom_scale is not None:
                    c = c * self.atom_scale[pick]
                rows = has[:, s, f].nonzero().squeeze(1)
                coefs[rows, s, pick[rows]] = c[rows]
        return coefs

    def _plant_held_out(self, coefs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Overwrite one (family, slot) per sample with a held-out pair."""
        pairs = self.held_out.nonzero()                                  # (P, 2): slot, atom
        pick = pairs[torch.randint(0, len(pairs), (coefs.shape[0],), generator=g)]
        rows = torch.arange(coefs.shape[0])
        s, a = pick[:, 0], pick[:, 1]
        same_family = self.family[None, :] == self.family[a][:, None]  # (N, n)
        coefs[rows, s] = coefs[rows, s] * (~same_family).float()
        c = (1 + self.cfg.coef_noise * torch.randn(len(rows), generator=g)).clamp_min(0.1)
        coefs[rows, s, a] = c if self.atom_scale is None else c * self.atom_scale[a]
        return coefs


# -- construction ---------------------------------------------------------------------------------
def random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def small_rotation(d: int, theta: float, g: torch.Generator) -> torch.Tensor:
    """Rotate by θ in ⌊d/2⌋ random orthogonal planes: every vector in their span turns by exactly θ."""
    q = random_orthogonal(d, g).double()
    r = torch.eye(d, dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    for i in range(0, d - 1, 2):
        r[i, i], r[i, i + 1], r[i + 1, i], r[i + 1, i + 1] = c, -s, s, c
    return (q @ r @ q.T).float()


def _transform(kind: str, d: int, theta: float, g: torch.Generator) -> torch.Tensor:
    if kind == "orthogonal":
        return random_orthogonal(d, g)
    if kind == "gaussian":        # entries N(0, 1/d): preserves norms on average, not exactly
        return torch.randn(d, d, generator=g) / math.sqrt(d)
    if kind == "rotation":
        return small_rotation(d, theta, g)
    if kind == "identity":
        return torch.eye(d)
    raise ValueError(f"unknown m_kind {kind!r}; expected one of {M_KINDS}")


def _unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=1, keepdim=True)


def make_world(cfg: WorldConfig) -> World:
    if cfg.control not in CONTROLS:
        raise ValueError(f"unknown control {cfg.control!r}; expected one of {CONTROLS}")
    g = torch.Generator().manual_seed(cfg.seed)
    S, n, d = cfg.n_slots, cfg.n_atoms, cfg.d
    atoms = _unit_rows(n, d, g)
    family = torch.repeat_interleave(torch.arange(len(cfg.families)), torch.tensor(cfg.families))

    transforms: torch.Tensor | None
    if cfg.control in ("bag", "slot_id"):
        transforms = torch.eye(d).expand(S, d, d).clone()
    elif cfg.control == "magnitude":
        transforms = torch.stack([cfg.magnitude_ratio**s * torch.eye(d) for s in range(S)])
    elif cfg.control == "independent":
        transforms = None
    else:
        transforms = torch.stack([torch.eye(d)] + [_transform(cfg.m_kind, d, cfg.theta, g)
                                                    for _ in range(S - 1)])
    if transforms is None:   # each slot its own random dictionary: no map relates them
        slot_atoms = torch.stack([atoms] + [_unit_rows(n, d, g) for _ in range(S - 1)])
    else:
        slot_atoms = torch.einsum("sij,nj->sni", transforms, atoms)

    slot_vectors = torch.zeros(S, d)
    if cfg.control == "slot_id":
        slot_vectors = _unit_rows(S, d, g) * cfg.slot_id_norm
    bias = _unit_rows(1, d, g)[0] * cfg.bias_norm

    held_out = torch.zeros(S, n, dtype=torch.bool)
    for s in range(1, S):
        for f, size in enumerate(cfg.families):
            k = int(round(cfg.held_out_frac * size))
            members = (family == f).nonzero().squeeze(1)
            held_out[s, members[torch.randperm(size, generator=g)[:k]]] = True
    for a, s in cfg.held_out_pairs:
        held_out[s, a] = True
    world = World(cfg, atoms, slot_atoms, transforms, family, held_out, slot_vectors, bias)
    _add_realism(world, cfg)
    return world


def _add_realism(world: World, cfg: WorldConfig) -> None:
    """The realism knobs, drawn from their own stream so that worlds without them are unchanged."""
    if cfg.family_probs and len(cfg.family_probs) != len(cfg.families):
        raise ValueError(f"family_probs needs one probability per family ({len(cfg.families)}), got {cfg.family_probs}")
    if not 0 <= cfg.unbound_share < 1:
        raise ValueError(f"unbound_share must be in [0, 1), got {cfg.unbound_share}")
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    n, d = world.n_atoms, cfg.d
    if cfg.zipf > 0:  # a random rank order within each family
        weight = torch.zeros(n)
        for f in range(len(cfg.families)):
            members = (world.family == f).nonzero().squeeze(1)
            ranks = torch.randperm(len(members), generator=g).double() + 1
            weight[members] = (ranks ** -cfg.zipf).float()
        world.atom_weight = weight
    if cfg.magnitude_spread > 0:
        world.atom_scale = torch.exp(cfg.magnitude_spread * torch.randn(n, generator=g))
    if cfg.n_unbound > 0 and cfg.unbound_share > 0:
        world.unbound_atoms = _unit_rows(cfg.n_unbound, d, g)
        # E||bound part||² per sample, measured; the rate puts unbound_share of the signal there
        coefs = world._draw_coefs(8192, torch.Generator().manual_seed(cfg.seed + 99), allow_held_out=False)
        bound = torch.einsum("bsn,snd->bd", coefs, world.slot_atoms)
        e_bound = float((bound - bound.mean(0)).pow(2).sum(1).mean())
        e_one = 1 + cfg.coef_noise**2        # E c² of one unbound feature when it fires
        want = cfg.unbound_share / (1 - cfg.unbound_share) * e_bound
        # rate p: variance n_u·(p·E c² − p²·(E c)²) = want, the smaller root, at most 0.5
        a, b = cfg.n_unbound * 1.0, cfg.n_unbound * e_one
        disc = b * b - 4 * a * want
        world.unbound_rate = min(0.5, (b - math.sqrt(disc)) / (2 * a) if disc > 0 else 0.5)
