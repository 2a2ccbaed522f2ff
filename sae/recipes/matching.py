"""Register two blocks of dictionary rows that one orthogonal map relates: B[σ(a)] ≈ M A[a].

The binding recipe (sae/rebind.py) needs this after its split phase: block A holds slot 1's atoms,
block B the other slot's rows in unknown order. Which row of B is the echo of which atom is a
graph-matching problem: for orthogonal M the Gram matrices agree, ⟨a, a'⟩ = ⟨σ(a), σ(a')⟩, and
nothing else about a single row identifies its partner. The search, on candidates a→b:

  evidence  each comparison of two candidates, Ga[a,a'] against Gb[b,b'] (units of 1/√d), is a
            log-likelihood ratio in nats: "one inner product seen twice" against "two unrelated
            entries", the entries' own distribution being the null. Agreeing on a large, rare value
            counts most; disagreeing costs down to −cap.
  seed      pairs of candidates {a→b, a'→b'} whose *strong* entries (top seed_degree per row)
            agree, best evidence first;
  cluster   per seed, the largest mutually agreeing set among the `pool` candidates it supports
            most (replicator dynamics on the agreement graph: local maxima are maximal cliques);
  grow      add Hungarian-best candidates with ≥ grow_evidence nats against the set; drop members
            that disagree with the rest on average;
  refine    fit M (Procrustes), rematch every row by cos(M a, b), refit.
Pairs are then kept only if a map fitted *without them* predicts them (cross-validation, which
needs ≳ 2d/3 pairs) and they beat the cosine that chance alignment reaches.

Costs stay near (rows of A)·(rows of B) per step, so this runs on whole dictionaries. Measured on
one CPU thread (one-off scripts): on split-phase SAEs of bound worlds it found 40 of 40 true pairs
at d = 32 (48 atoms), 315 of 315 at d = 256 (384 atoms, 4 s) and 406 of 419 at d = 384 (576 atoms, 7
s), none wrong, and 0 pairs on the `independent` control (no shared map) at d = 256 (14 s: every
seed is tried); 924 of 924 planted pairs between 1,024-row blocks in d = 768 in 50 s. (Graduated
assignment, used before, held an (na·nb)² affinity: 1 GiB at 128 rows, so the recipe matched only
the most-used 128 rows and could never validate a map at d ≳ 190.) `fit_map`, `validate`,
`chance_cos`, `llr`, `strong_entries` and `largest_agreeing_set` are shared with the echo detector
(eval/echo.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class MatchConfig:
    map_kind: str = "orthogonal"  # fitted map: "orthogonal" (Procrustes) or "linear" (least squares)
    sigma: float = 0.35           # spread of Ga[a,a'] − Gb[b,b'] for true pairs, units of 1/√d
                                  # (0.23 on split blocks at d = 256; 0.32–0.36 in the bench's TopK SAEs)
    cap: float = 3.0              # evidence floor (nats) for one disagreeing comparison
    seed_degree: float = 5.0      # "strong" Gram entries: the top seed_degree per row
    n_seeds: int = 1000           # seeds tried at most, best agreement first (a true one grew from
                                  # the first 16 in every trained and planted case measured; trying
                                  # them all took 14 s on 300 x 300 unrelated rows in d = 200)
    seed_batch: int = 32
    pool: int = 100               # candidates per seed handed to the clique step
    min_cluster: int = 7          # clique size a seed needs to be grown
    grow_evidence: float = 8.0    # nats a candidate needs against the growing set to join it
    stop_share: float = 0.5       # stop once a seed grew to this share of the smaller block
    refine_cos: float = 0.7       # pairs used to refit M while refining
    refine_iters: int = 10
    min_cos: float = 0.8          # kept pairs: held-out cos(M a, b) ≥ this...
    null_false_pairs: float = 0.5 # ...and above the cos chance alignment gives this many pairs
    allow_unpinned: bool = False  # keep pairs too few (< 2d/3) to cross-validate, on in-sample fit?
    folds: int = 5                # cross-validation folds above 200 pairs (leave-one-out below)
    seed: int = 0


@dataclass
class Match:
    transform: torch.Tensor   # (d, d) column convention: b ≈ M a
    pairs: torch.Tensor       # (P, 2) row of A, row of B
    cos: torch.Tensor         # (P,) validated cos(M a, b)
    share: float              # share of all rows that take part in a kept pair
    n_rows: int
    pinned: bool = False      # pairs outnumber d: M is determined on all of R^d, not just a span

    def __repr__(self) -> str:
        return f"Match(pairs={len(self.pairs)}, share={self.share:.3f}, n_rows={self.n_rows}, pinned={self.pinned})"


def fit_map(A: torch.Tensor, B: torch.Tensor, kind: str = "orthogonal") -> torch.Tensor:
    """M (column convention) minimising Σ ‖M a_p − b_p‖² over rows a_p of A, b_p of B."""
    A, B = A.double(), B.double()
    if kind == "orthogonal":
        u, _, vt = torch.linalg.svd(B.T @ A)
        return (u @ vt).float()
    if kind == "linear":
        return torch.linalg.lstsq(A, B).solution.T.float()
    raise ValueError(f"unknown map kind {kind!r}")


def validate(X: torch.Tensor, Y: torch.Tensor, g: torch.Generator, map_kind: str = "orthogonal",
             folds: int = 5) -> tuple[torch.Tensor, bool]:
    """cos(M x_p, y_p) for each pair of unit rows, M fitted on the *other* pairs (leave-one-out, or
    `folds`-fold above 200 pairs). A held-out pair is predictable only if its source lies mostly in
    the span of the other sources, so this needs P ≳ 2d/3 pairs; M is pinned down only when P > d.
    With fewer pairs only an orthogonal map's in-sample fit is any test (it must preserve the Gram
    matrix); a linear map fits any ≤ d pairs and proves nothing. Returns (cos, validated)."""
    P, d = X.shape
    if P < 2 * d / 3 + 1:
        if map_kind != "orthogonal":
            return torch.zeros(P), False
        return torch.nn.functional.cosine_similarity(X @ fit_map(X, Y).T, Y, dim=1), False
    folds = P if P <= 200 else folds
    fold = torch.randperm(P, generator=g) % folds
    out = torch.zeros(P)
    for f in range(folds):
        test = fold == f
        M = fit_map(X[~test], Y[~test], map_kind)
        out[test] = torch.nn.functional.cosine_similarity(X[test] @ M.T, Y[test], dim=1)
    return out, True


def chance_cos(U: torch.Tensor, g: torch.Generator, min_cos: float, null_false_pairs: float = 0.5) -> float:
    """max(min_cos, null): in few dimensions or with many rows chance alone gives high cosines.
    null = the cos that a random direction's best row of U exceeds with probability
    null_false_pairs/m, so that testing all m rows lets about null_false_pairs false pairs through."""
    m = U.shape[0]
    level = min(0.5, null_false_pairs / m)
    r = torch.randn(max(4000, int(20 / level)), U.shape[1], generator=g)
    best = ((r / r.norm(dim=1, keepdim=True)) @ U.T).amax(1)
    return max(min_cos, float(torch.quantile(best, 1 - level)))


# -- evidence -------------------------------------------------------------------------------------
def log_marginal(vals: torch.Tensor, bw: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """log density of Gram entries (units of 1/√d) on a grid: a Gaussian KDE, so that heavy tails
    (near-duplicate rows) are not mistaken for rare, informative values."""
    grid = torch.linspace(-8.0, 8.0, 641)
    if len(vals) > 20000:
        vals = vals[torch.randperm(len(vals), generator=torch.Generator().manual_seed(0))[:20000]]
    dens = torch.exp(-0.5 * ((grid[:, None] - vals[None, :]) / bw) ** 2).sum(1)
    dens = dens / (dens.sum() * float(grid[1] - grid[0]))
    return grid, torch.log(dens.clamp_min(1e-4))


def llr(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor, log_p: torch.Tensor, sigma: float, cap: float) -> torch.Tensor:
    """Evidence (nats) that Gram entries x, y are one inner product seen twice rather than two
    unrelated entries: log N(x − y; 0, σ²) − log p((x + y)/2), clamped below at −cap. The grid's
    step (0.025) is far below the KDE bandwidth, so the nearest grid point is exact enough.
    In place where it can be: this is the search's inner loop."""
    g0, inv_step = float(grid[0]), 1.0 / float(grid[1] - grid[0])
    pos = (x + y).mul_(0.5 * inv_step).sub_(g0 * inv_step).round_().clamp_(0, len(grid) - 1).to(torch.int32)
    out = (x - y).mul_(1.0 / sigma).square_().mul_(-0.5).sub_(math.log(sigma * math.sqrt(2 * math.pi)))
    return out.sub_(log_p[pos]).clamp_min_(-cap)


def _off_diagonal(G: torch.Tensor) -> torch.Tensor:
    return G[~torch.eye(len(G), dtype=torch.bool)]


class _Evidence:
    """K[p, q] for candidates p = a·nb + b, q = a'·nb + b': the evidence that both belong to one
    map. Computed on demand: the full matrix has (na·nb)² entries."""

    def __init__(self, Ga: torch.Tensor, Gb: torch.Tensor, cfg: MatchConfig):
        self.Ga, self.Gb, self.na, self.nb, self.cfg = Ga, Gb, Ga.shape[0], Gb.shape[0], cfg
        self.grid, self.log_p = log_marginal(torch.cat([_off_diagonal(Ga), _off_diagonal(Gb)]))

    def _llr(self, x, y):
        return llr(x, y, self.grid, self.log_p, self.cfg.sigma, self.cfg.cap)

    def pairs(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """K[p, q] elementwise (broadcast); 0 where p and q share a row (no information)."""
        nb = self.nb
        out = self._llr(self.Ga[p // nb, q // nb], self.Gb[p % nb, q % nb])
        return out.masked_fill((p // nb == q // nb) | (p % nb == q % nb), 0.0)

    def rows(self, p: torch.Tensor) -> torch.Tensor:
        """K[p, :] as (len(p), na, nb): entry [i, a', b'] is the candidate a'→b'."""
        a, b = p // self.nb, p % self.nb
        out = self._llr(self.Ga[a][:, :, None], self.Gb[b][:, None, :])
        out[torch.arange(len(p)), a, :] = 0.0
        out[torch.arange(len(p)), :, b] = 0.0
        return out


# -- the search -----------------------------------------------------------------------------------
def strong_entries(G: torch.Tensor, degree: float) -> torch.Tensor:
    """(E, 2) index pairs of the off-diagonal entries with the largest |G|, about `degree` per row."""
    m = G.shape[0]
    A = G.abs().clone()
    A.fill_diagonal_(-1)
    tau = float(torch.quantile(_off_diagonal(A), max(0.0, 1 - degree / max(m - 1, 1))))
    return (A >= tau).nonzero()


def _seeds(K: _Evidence) -> torch.Tensor:
    """(n, 2) candidate pairs {a→b, a'→b'} on strong entries of both Gram matrices, best first."""
    ea, eb = strong_entries(K.Ga, K.cfg.seed_degree), strong_entries(K.Gb, K.cfg.seed_degree)
    ea = ea[ea[:, 0] < ea[:, 1]]                 # unordered a–a' against ordered b–b': each seed once
    p1 = (ea[:, :1] * K.nb + eb[None, :, 0]).reshape(-1)
    p2 = (ea[:, 1:] * K.nb + eb[None, :, 1]).reshape(-1)
    top = K.pairs(p1, p2).topk(min(K.cfg.n_seeds, len(p1))).indices
    return torch.stack([p1[top], p2[top]], 1)


def _clusters(K: _Evidence, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per seed: the `pool` candidates it supports most, and which of them form the largest set that
    agrees pairwise (K > 0, no shared row). Returns pool (S, r) and membership (S, r)."""
    S, nb = len(seeds), K.nb
    support = K.rows(seeds.reshape(-1)).reshape(S, 2, K.na, nb).sum(1)
    s = torch.arange(S)[:, None].expand(S, 2)
    support[s, seeds // nb, :] = -1e9
    support[s, :, seeds % nb] = -1e9
    r = min(K.cfg.pool, K.na * nb)
    u, pool = support.view(S, -1).topk(r, dim=1)
    a, b = pool // nb, pool % nb
    shared = (a[:, :, None] == a[:, None, :]) | (b[:, :, None] == b[:, None, :])
    agree = (K.pairs(pool[:, :, None], pool[:, None, :]) > 0) & ~shared
    return pool, largest_agreeing_set(agree, u)


def largest_agreeing_set(agree: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """(S, r, r) pairwise agreement of r candidates, (S, r) their support (−1e9: excluded) ->
    (S, r) membership of a large set that agrees pairwise, by replicator dynamics on the agreement
    graph (Motzkin–Straus: its local maxima are maximal cliques), started from softmax(support)."""
    ok = support > -1e8
    A = (agree & ok[:, :, None]).float() + 0.5 * torch.eye(agree.shape[-1])
    x = torch.softmax(support / 2.0, dim=1)
    for _ in range(100):
        x = x * (A @ x[:, :, None]).squeeze(2)
        x = x / x.sum(1, keepdim=True).clamp_min(1e-30)
    return (x > 1.0 / (4 * agree.shape[-1])) & ok


def _grow(K: _Evidence, start: list[int]) -> torch.Tensor:
    """Add the Hungarian-best candidates with ≥ grow_evidence nats against the set (a third of the
    set's size per round) and drop members that disagree with the rest on average."""
    nb = K.nb
    S = torch.tensor(list(dict.fromkeys(start)))
    total = K.rows(S).sum(0)                    # (na, nb) evidence of every candidate against S
    for _ in range(100):
        s = total.clone()
        s[S // nb, :] = -1e9
        s[:, S % nb] = -1e9
        r, c = linear_sum_assignment(s.numpy(), maximize=True)
        val = s[r, c]
        order = torch.argsort(val, descending=True)
        order = order[val[order] > K.cfg.grow_evidence][: max(1, len(S) // 3)]
        if not len(order):
            break
        new = torch.from_numpy(r[order.numpy()] * nb + c[order.numpy()])
        S = torch.cat([S, new])
        total += K.rows(new).sum(0)
        if len(S) >= 6:
            keep = K.pairs(S[:, None], S[None, :]).sum(1) > 0
            if not keep.all():
                total -= K.rows(S[~keep]).sum(0)
                S = S[keep]
    return S


def _refine(Ua: torch.Tensor, Ub: torch.Tensor, M: torch.Tensor, cfg: MatchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternate: match rows by cos(M a, b) (Hungarian, ≥ refine_cos), refit M on the matches."""
    r = c = torch.zeros(0, dtype=torch.long)
    for it in range(cfg.refine_iters + 1):
        MA = Ua @ M.T
        C = (MA / MA.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ Ub.T
        rr, cc = linear_sum_assignment(C.numpy(), maximize=True)
        ok = C[rr, cc].numpy() >= cfg.refine_cos
        if ok.sum() < 3:
            break
        r, c = torch.from_numpy(rr[ok]), torch.from_numpy(cc[ok])
        if it < cfg.refine_iters:
            M = fit_map(Ua[r], Ub[c], cfg.map_kind)
    return M, r, c


def match_blocks(A: torch.Tensor, B: torch.Tensor, cfg: MatchConfig = MatchConfig()) -> Match:
    """Pairs a → σ(a) between the rows of A and of B, and one map with B[σ(a)] ≈ M A[a] (see the
    module docstring). Pairs index A (column 0) and B (column 1)."""
    g = torch.Generator().manual_seed(cfg.seed)
    Ua = A.detach().float().cpu()
    Ub = B.detach().float().cpu()
    Ua = Ua / Ua.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Ub = Ub / Ub.norm(dim=1, keepdim=True).clamp_min(1e-12)
    (na, d), nb = Ua.shape, Ub.shape[0]
    none = Match(torch.eye(d), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0.0, na + nb)
    if min(na, nb) < 4:
        return none
    K = _Evidence((Ua @ Ua.T) * math.sqrt(d), (Ub @ Ub.T) * math.sqrt(d), cfg)
    seeds = _seeds(K)
    best = torch.zeros(0, dtype=torch.long)
    per_batch = max(4, min(cfg.seed_batch, 2**23 // (na * nb)))  # the support tensor: 2·batch·na·nb floats
    for start in range(0, len(seeds), per_batch):
        batch = seeds[start:start + per_batch]
        pool, member = _clusters(K, batch)
        size = member.sum(1)
        for s in torch.argsort(size, descending=True).tolist():
            if size[s] < cfg.min_cluster:
                break
            grown = _grow(K, batch[s].tolist() + pool[s][member[s]].tolist())
            if len(grown) > len(best):
                best = grown
        if len(best) >= cfg.stop_share * min(na, nb):
            break
    if len(best) < 3:
        return none
    M, r, c = _refine(Ua, Ub, fit_map(Ua[best // nb], Ub[best % nb], cfg.map_kind), cfg)
    if len(r) < 3:
        return none
    cos, validated = validate(Ua[r], Ub[c], g, cfg.map_kind, cfg.folds)
    keep = (cos >= chance_cos(Ub, g, cfg.min_cos, cfg.null_false_pairs)) & (validated or cfg.allow_unpinned)
    pairs = torch.stack([r, c], 1)[keep]
    if len(pairs) >= 3:
        M = fit_map(Ua[pairs[:, 0]], Ub[pairs[:, 1]], cfg.map_kind)
    return Match(M, pairs, cos[keep], 2 * len(pairs) / (na + nb), na + nb, len(pairs) > d)
