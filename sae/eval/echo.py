"""Echo-feature detector: does a standard SAE's dictionary hold pairs of latents related by one
shared linear map, w_j ≈ M w_i (binding.md §3)?

A standard SAE trained on matrix-bound data learns d_a and M d_a as separate latents ("echo
features"). Finding them is a registration problem with unknown correspondence *and* unknown
partition (which rows are "slot 1"), and a local search over M fails (binding.md: an imperfect
dictionary in superposition has many maps that align many rows a little). What survives is the
Gram structure: for orthogonal M, ⟨M d_a, M d_b⟩ = ⟨d_a, d_b⟩, so the true pairs are a large set
of candidate correspondences (i→j) that agree with each other, G_ik ≈ G_jl.

The search scores each comparison of two candidates as evidence (a log-likelihood ratio in nats:
"one inner product seen twice" against "two unrelated Gram entries", with the entries' own
distribution as the null), so agreeing on a large, rare cosine counts for much more than agreeing
near 0, and disagreeing costs (down to −llr_cap). Then:
  seed     pairs of candidates {i→j, k→l} whose *strong* Gram entries G_ik, G_jl agree, best first;
  cluster  per seed, the largest mutually consistent set among the candidates it supports most;
  grow     add Hungarian-best candidates with enough summed evidence against the set, one direction
           only (i→j with k→l slot-1→slot-2, never mixed with slot-2→slot-1: d_aᵀM d_b ≠ d_aᵀMᵀd_b);
  refine   fit M (Procrustes), rematch all rows by cos(M u_i, u_j), refit; the fit with the most
           evidence-supported pairs wins.
Pairs are kept if a map fitted *without them* predicts them (cross-validation), or if they fit
in-sample and agree with the other pairs on the Gram evidence (a right pair whose direction no
other pair covers fails the held-out test). The null: a pair must beat the cosine that chance
alignment of a random direction with the dictionary reaches, must not be a duplicate (M = I
explains it), each row is a source or a target but not both, and fewer than d pairs do not pin a
map down, so report none. (Graduated assignment on a Gaussian Gram-consistency affinity, the first
version, stopped in wrong local optima on trained dictionaries: 0 of 3 bench SAEs found.)

    res = find_echoes(W_dec)            # W_dec: (m, d) decoder rows of any SAE
    res.transform, res.pairs, res.share

With the partition known (two given blocks of rows) the same evidence search is much easier:
sae/matching.py does that for the binding recipe, and shares its map fit, cross-validation,
chance null and evidence score with this module.

Measured on the saved bench SAEs (TopK with 2n latents, seeds 0-2, one CPU thread): at d = 32
echoes found in all 3 SAEs of the bound `ref` world (36-39 pairs, 111 of 112 right, share 0.79 ±
0.04) and all 3 of `over` (96 atoms, 192 rows: 75-78 pairs, 228 of 229 right), none on any control
(bag, slot_id, independent, magnitude, under, small rotations) or random 96×32 / 192×32 dictionary,
1-38 s per SAE; at d = 256 (`wide`, 768 rows) all 336 pairs, none wrong, and none on its control,
23 s. Limits: only one orthogonal map (not 3 slots, not Gaussian M, whose Gram matrix is not
preserved); it reports nothing below d pairs, so a map that moves only part of a dictionary goes
unseen; dictionaries above `max_rows` (1,024) rows are analysed on a random subset, which loses
pairs quadratically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sae.recipes.matching import chance_cos, fit_map, largest_agreeing_set, llr, log_marginal, strong_entries, validate


@dataclass(frozen=True)
class EchoConfig:
    map_kind: str = "orthogonal"  # fitted map: "orthogonal" (Procrustes) or "linear" (least squares)
    # find_echoes: the search (seed → cluster → grow, module docstring)
    llr_sigma: float = 0.35       # spread of G_ik − G_jl for true echo pairs, units of 1/√d
                                  # (0.32-0.38 measured over the pairs found in ref and over SAEs)
    llr_cap: float = 3.0          # evidence floor (nats) for one disagreeing comparison
    seed_degree: float = 5.0      # "strong" Gram entries: the top seed_degree per row
    n_seeds: int = 4000           # seeds tried at most, best agreement first...
    # ...and at most seeds_per_candidate·m(m−1): caps the work on small dictionaries, binding only
    # below 96 rows (under's 48 live rows: 1,015 seeds, still 0 pairs; the planted tests pass)
    seeds_per_candidate: float = 0.45
    # ...and at most seed_work/m²: each seed costs ~m² evidence terms. Binds only above 192 rows
    # (250 seeds at 768): there the first seeds suffice (d = 256 split SAE: the same 331 pairs from
    # 300 seeds as from 4,000, in 23 s instead of 93 s; a random 720×256 dictionary: 23 s, not 382 s)
    seed_work: float = 4000 * 192**2
    seed_batch: int = 256         # at most; fewer when 2·batch·m² would pass 2^25 floats
    pool: int = 100               # candidates per seed handed to the clique step
    min_cluster: int = 7          # clique size a seed needs to be grown
    grow_evidence: float = 8.0    # nats a candidate needs against the growing set to join it
    stop_after: int = 2           # stop once this many seeds grew into ≥ min_pairs_per_dim·d pairs
    min_evidence: float = 0.5     # a pair the held-out map misses still counts if it fits in-sample
                                  # and agrees with the other pairs by ≥ this many nats per comparison
    refine_cos: float = 0.7       # pairs used to refit M while refining
    self_min_cos: float = 0.85    # kept pairs: cos(M w_i, w_j) ≥ this under a map not fitted on
                                  # (i, j) (0.8 where the partition is known): on TopK SAEs of the
                                  # bound world the wrong pairs that pass (merged latents) validate
                                  # at 0.74–0.87, the correct ones mostly at > 0.9
    null_false_pairs: float = 0.5 # ...and above the cos that chance alignment gives this many pairs
    min_pairs_per_dim: float = 1.0  # fewer pairs than this·d do not pin a map down: report none
    allow_unpinned: bool = False  # report pairs too few (< 2d/3) to cross-validate, on in-sample fit?
    folds: int = 5                # cross-validation folds above 200 pairs (leave-one-out below)
    refine_iters: int = 10
    # above this, a random subset of rows: pairs survive only if both rows do (at 128 the 192-row
    # `over` SAEs were found in 1-2 of 3 seeds, whole in 3 of 3). With seed_work bounding the
    # seeds, 768 rows took 23 s: all 336 echo pairs of the `wide` TopK SAE (d = 256), 0 on its
    # `independent` control and on a random 720×256 dictionary.
    max_rows: int = 1024
    seed: int = 0


@dataclass
class EchoResult:
    transform: torch.Tensor   # (d, d) column convention: w_j ≈ M w_i
    pairs: torch.Tensor       # (P, 2) rows (i, j) counted as echoes
    cos: torch.Tensor         # (P,) validated cos(M w_i, w_j) (see `pinned`)
    share: float              # share of the m rows that take part in a counted pair
    n_rows: int
    pinned: bool = False      # pairs outnumber d: M is determined on all of R^d, not just a span

    def __repr__(self) -> str:
        return (f"EchoResult(pairs={len(self.pairs)}, share={self.share:.3f}, n_rows={self.n_rows}, "
                f"pinned={self.pinned})")


# -- the search -----------------------------------------------------------------------------------
class _Evidence:
    """K[(i,j),(k,l)] = llr(G_ik, G_jl) (sae.recipes.matching): evidence that candidates i→j and k→l are
    both echo pairs of one orthogonal map; a candidate carries none about itself. Candidate
    p = i·m + j. Computed on demand (the full matrix would be (m²)² floats)."""

    def __init__(self, Gs: torch.Tensor, cfg: "EchoConfig"):
        self.G, self.cfg, self.m = Gs, cfg, Gs.shape[0]
        self.grid, self.table = log_marginal(Gs[~torch.eye(self.m, dtype=torch.bool)])

    def pairs(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """K[p, q] elementwise (broadcast)."""
        m = self.m
        out = llr(self.G[p // m, q // m], self.G[p % m, q % m], self.grid, self.table, self.cfg.llr_sigma, self.cfg.llr_cap)
        return out.masked_fill(p == q, 0.0)

    def rows(self, p: torch.Tensor) -> torch.Tensor:
        """K[p, :] as (len(p), m, m): entry [n, k, l] is the candidate k→l."""
        i, j = p // self.m, p % self.m
        out = llr(self.G[i][:, :, None], self.G[j][:, None, :], self.grid, self.table, self.cfg.llr_sigma, self.cfg.llr_cap)
        out[torch.arange(len(p)), i, j] = 0.0
        return out


def _edge_seeds(Gs: torch.Tensor, K: _Evidence, cfg: "EchoConfig") -> torch.Tensor:
    """Candidate seeds {i→j, k→l}: two strong Gram entries (|G_ik|, |G_jl| in the top seed_degree
    per row) that agree, best evidence first. Strong entries are rare, so their agreement is the
    most informative single comparison there is. Returns (n, 2) candidate ids i·m + j."""
    m = Gs.shape[0]
    strong = strong_entries(Gs, cfg.seed_degree)
    e = strong[strong[:, 0] < strong[:, 1]]                       # unordered edge i–k
    i, k = e[:, :1], e[:, 1:2]
    j, l = strong[None, :, 0], strong[None, :, 1]                 # ordered edge j–l
    ok = (i != j) & (i != l) & (k != j) & (k != l)
    ok &= torch.minimum(i, k) < torch.minimum(j, l)               # {j→i, l→k} is the same seed for M⁻¹
    p1, p2 = (i * m + j)[ok], (k * m + l)[ok]
    score = K.pairs(p1, p2)
    n = min(cfg.n_seeds, int(cfg.seeds_per_candidate * m * (m - 1)) + 1, int(cfg.seed_work / m**2) + 1, len(score))
    top = score.topk(n).indices
    return torch.stack([p1[top], p2[top]], 1)


def _conflicts(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """(…, r, r): candidates that share a source, a target, or use one row as source and target."""
    s, t = src[..., :, None], tgt[..., :, None]
    s2, t2 = src[..., None, :], tgt[..., None, :]
    return (s == s2) | (t == t2) | (s == t2) | (t == s2)


def _clusters(K: _Evidence, seeds: torch.Tensor, cfg: "EchoConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """For each seed (B, q): the `pool` candidates best supported by the seed, then the largest set
    of them that agree pairwise (K > 0, no shared rows), found by replicator dynamics on the
    agreement graph (Motzkin–Straus: its local maxima are maximal cliques). Returns pool (B, r)
    and membership (B, r)."""
    B, q = seeds.shape
    m = K.m
    s = K.rows(seeds.reshape(-1)).reshape(B, q, m, m).sum(1)
    used = torch.cat([seeds // m, seeds % m], 1)
    b = torch.arange(B)[:, None].expand_as(used)
    s[b, used, :] = -1e9
    s.transpose(1, 2)[b, used, :] = -1e9
    s.diagonal(dim1=1, dim2=2).fill_(-1e9)
    r = min(cfg.pool, m * m)
    u, pool = s.view(B, -1).topk(r, dim=1)
    agree = (K.pairs(pool[:, :, None], pool[:, None, :]) > 0) & ~_conflicts(pool // m, pool % m)
    return pool, largest_agreeing_set(agree, u)


def _grow(K: _Evidence, start: list[int], cfg: "EchoConfig") -> list[int]:
    """Grow a one-directional set of candidates: add the Hungarian-best candidates whose summed
    evidence against the set exceeds `grow_evidence` nats (a third of the set size per round), and
    drop members that disagree with the rest on average."""
    m = K.m
    S = list(dict.fromkeys(start))
    total = K.rows(torch.tensor(S)).sum(0)                       # (m, m) evidence against the set
    for _ in range(40):
        idx = torch.tensor(S)
        s = total.clone()
        used = torch.cat([idx // m, idx % m])
        s[used, :] = -1e9
        s[:, used] = -1e9
        s.fill_diagonal_(-1e9)
        r, c = linear_sum_assignment(s.numpy(), maximize=True)
        val = s[r, c]
        order = [o for o in torch.argsort(val, descending=True).tolist() if val[o] > cfg.grow_evidence]
        if not order:
            break
        new = [int(r[o]) * m + int(c[o]) for o in order[: max(1, len(S) // 3)]]
        S += new
        total += K.rows(torch.tensor(new)).sum(0)
        if len(S) >= 6:
            idx = torch.tensor(S)
            support = K.pairs(idx[:, None], idx[None, :]).sum(1) / (len(S) - 1)
            drop = idx[support <= 0]
            if len(drop):
                S = idx[support > 0].tolist()
                total -= K.rows(drop).sum(0)
    return S


def _search(U: torch.Tensor, cfg: "EchoConfig") -> tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor] | None:
    """Seed → cluster → grow → refine (see the module docstring). Returns the refined (M, r, c)
    with the most evidence-supported pairs and each pair's mean evidence (nats per comparison)
    against the others, or None."""
    m, d = U.shape
    if m < 4:
        return None
    Gs = (U @ U.T) * math.sqrt(d)
    K = _Evidence(Gs, cfg)
    seeds = _edge_seeds(Gs, K, cfg)
    enough = max(3, int(cfg.min_pairs_per_dim * d))
    best, found = None, 0
    per_batch = max(4, min(cfg.seed_batch, 2**24 // m**2))
    for b0 in range(0, len(seeds), per_batch):
        batch = seeds[b0:b0 + per_batch]
        pool, member = _clusters(K, batch, cfg)
        size = member.sum(1)
        for b in torch.argsort(size, descending=True).tolist():
            if size[b] < cfg.min_cluster:
                break
            S = _grow(K, batch[b].tolist() + pool[b][member[b]].tolist(), cfg)
            if len(S) < max(3, min(enough, d // 2)):
                continue
            S = torch.tensor(S)
            M = fit_map(U[S // m], U[S % m], cfg.map_kind)
            M, r, c = _refine(U, M, cfg)
            # judge a fit by the pairs the Gram evidence supports, not by how many rows it matches:
            # in few dimensions a wrong map matches many rows at chance-level cosines
            ids = torch.from_numpy(r * m + c)
            evidence = K.pairs(ids[:, None], ids[None, :]).sum(1) / max(len(ids) - 1, 1)
            score = (int((evidence >= cfg.min_evidence).sum()), len(r))
            if best is None or score > best[0]:
                best = (score, (M, r, c, evidence))
            found += score[0] >= enough
        if found >= cfg.stop_after:
            break
    return None if best is None else best[1]


def _match(U: torch.Tensor, M: torch.Tensor, min_cos: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows i → j (i ≠ j) by Hungarian matching of cos(M u_i, u_j); keep those ≥ min_cos."""
    MU = U @ M.T
    C = (MU / MU.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ U.T
    C.fill_diagonal_(-1)
    r, c = linear_sum_assignment(C.numpy(), maximize=True)
    keep = C[r, c].numpy() >= min_cos
    return r[keep], c[keep]


def _refine(U: torch.Tensor, M: torch.Tensor, cfg: EchoConfig) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    for _ in range(cfg.refine_iters):
        r, c = _match(U, M, cfg.refine_cos)
        if len(r) < 3:
            break
        M = fit_map(U[r], U[c], cfg.map_kind)
    r, c = _match(U, M, cfg.refine_cos)
    return M, r, c


def find_echoes(W: torch.Tensor, cfg: EchoConfig = EchoConfig(),
                live: torch.Tensor | None = None) -> EchoResult:
    """Find the largest set of row pairs of W related by one shared map (see module docstring).
    `live` (m,) bool, optional: only these rows are analysed (e.g. latents that fire: dead and
    never-used rows are random directions that only add chance structure)."""
    g = torch.Generator().manual_seed(cfg.seed)
    W = W.detach().float().cpu()
    m_all, d = W.shape
    rows = torch.arange(m_all) if live is None else live.nonzero().squeeze(1)
    if len(rows) > cfg.max_rows:
        rows = rows[torch.randperm(len(rows), generator=g)[: cfg.max_rows].sort().values]
    U = W[rows] / W[rows].norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = U.shape[0]

    best = _search(U, cfg)

    if best is None or len(best[1]) < 3:
        return EchoResult(torch.eye(d), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0.0, m_all)
    M, r, c, evidence = best
    cv, validated = validate(U[r], U[c], g, cfg.map_kind, cfg.folds)
    thr = chance_cos(U, g, cfg.self_min_cos, cfg.null_false_pairs)
    trivial = (U[r] * U[c]).sum(1) >= thr             # already aligned: a duplicate, not an echo
    # A pair whose source direction no other pair covers fails the held-out test though it is
    # right; the Gram evidence against all other pairs still tests it (without a fitted map).
    M_all = fit_map(U[r], U[c], cfg.map_kind)
    in_sample = torch.nn.functional.cosine_similarity(U[r] @ M_all.T, U[c], dim=1)
    supported = (in_sample >= thr) & (evidence >= cfg.min_evidence)
    keep = ((cv >= thr) | supported) & ~trivial & (validated or cfg.allow_unpinned)
    # one map relates "slot-1" rows to "slot-2" rows: a row is a source or a target, not both
    sources, targets = set(), set()
    for p in torch.argsort(cv, descending=True).tolist():
        if keep[p] and (r[p] in targets or c[p] in sources):
            keep[p] = False
        elif keep[p]:
            sources.add(r[p]); targets.add(c[p])
    if keep.sum() < max(3, cfg.min_pairs_per_dim * d):
        keep[:] = False
    pairs = torch.stack([rows[torch.from_numpy(r)], rows[torch.from_numpy(c)]], 1)[keep]
    share = 2 * len(pairs) / m
    if len(pairs) >= 3:
        # The map is fitted on the validated pairs plus those it fits in-sample (cos ≥ thr) but that
        # fail the held-out test only because no other pair covers their direction: dropping them
        # leaves directions of R^d unpinned (measured on TopK SAEs of the bound world: relative
        # error 0.38–0.41 without them, 0.20–0.22 with them, though a few are wrong).
        fit = np.zeros(len(r), dtype=bool)
        if keep.any():
            fit = (keep | ((in_sample >= thr) & ~trivial)).numpy()
            for p in np.flatnonzero(fit & ~keep.numpy()):      # stay one-directional
                if r[p] in targets or c[p] in sources:
                    fit[p] = False
        M = fit_map(U[r[fit]], U[c[fit]], cfg.map_kind)
    return EchoResult(M, pairs, cv[keep], share, m_all, len(pairs) > d)
