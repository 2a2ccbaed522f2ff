"""Find rows related by one orthogonal map, b ≈ M a, when which row pairs with which is unknown.

One evidence search serves two framings:
  two blocks       the binding recipe (recipes/binding.py) after its split phase: block A holds slot
                   1's atoms, block B another slot's rows in unknown order; pairs a → σ(a).
                   `match_blocks`, `MatchConfig`.
  one dictionary   the echo detector (eval/echo.py): pairs i → j among the rows of one standard SAE,
                   where which rows are "slot 1" is unknown too.
For an orthogonal M the Gram matrices agree, ⟨a, a'⟩ = ⟨M a, M a'⟩, and nothing else about a single
row identifies its partner. The search, on candidates a → b:

  evidence  each comparison of two candidates, G[a,a'] against G[b,b'] (units of 1/√d), is a
            log-likelihood ratio in nats: "one inner product seen twice" against "two unrelated
            entries", the entries' own distribution being the null. Agreeing on a large, rare value
            counts most; disagreeing costs down to −cap.
  seed      pairs of candidates {a→b, a'→b'} whose *strong* entries (top seed_degree per row)
            agree, best evidence first (given which rows never fire together, seeds of such rows
            first: two values of one attribute in one slot);
  cluster   per seed, the largest mutually agreeing set among the `pool` candidates it supports
            most (replicator dynamics on the agreement graph: local maxima are maximal cliques);
            where a pass over every seed leaves the judge unsatisfied, the best-evidence seeds
            again, each clique step's pool now the candidates the seed and its last clique support
            most (`_recluster`);
  grow      add Hungarian-best candidates with ≥ grow_evidence nats against the set; drop members
            that disagree with the rest on average;
  judge     keep the best grown set (see `Largest`, `MostSupported`), stop when one is good enough;
  refine    fit M (Procrustes), rematch every row by cos(M a, b), refit.
Pairs are then kept only if a map fitted *without them* predicts them (cross-validation, which
needs ≳ 2d/3 pairs) and they beat the cosine that chance alignment reaches (`verdict`).

What differs between the framings is the candidate set and its conflict rule (`TwoBlocks`,
`OneDictionary`) and how a grown set is judged. Costs stay near (rows of A)·(rows of B) per step,
so this runs on whole dictionaries; measurements are in RESULTS.md §6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

GROW_ROUNDS = 100      # a bound only: growth adds a third of the set per round, so it ends far sooner
RECLUSTER_ROUNDS = 3   # clique steps per seed after the first (see _recluster)
RECLUSTER_SEEDS = 400  # seeds reclustered after an unsatisfied plain pass (a 4-slot world in d ~140 tries ~350 in all)
BATCH_FLOATS = 2**23   # seeds per batch ≤ this/(na·nb): the clique step holds 2·batch·na·nb floats
# nats added to a seed whose two sources and two targets each never fire together (`exclusive`):
# among ~750 clean rows one comparison's evidence saturates and true seeds drown in chance ones
# (w10: 1 of 383 in a 263-seed budget), while both pairs exclusive held for 12.8% of true seeds and
# 0.57% of chance ones (RESULTS.md §1), a likelihood ratio of ~22 (3.1 nats)
EXCLUSIVE_BONUS = 4.0


@dataclass(frozen=True)
class MatchConfig:
    """The search's settings. The echo detector maps its own EchoConfig onto these."""
    map_kind: str = "orthogonal"  # fitted map: "orthogonal" (Procrustes) or "linear" (least squares)
    sigma: float = 0.35           # spread of G[a,a'] − G[b,b'] for true pairs, units of 1/√d (measured)
    cap: float = 3.0              # evidence floor (nats) for one disagreeing comparison
    seed_degree: float = 5.0      # "strong" Gram entries: the top seed_degree per row
    n_seeds: int = 1000           # seeds tried at most, best agreement first: true seeds come first,
                                  # and without a map every seed is tried, so this bounds that cost
    seed_batch: int = 32
    pool: int = 100               # candidates per seed handed to the clique step
    min_cluster: int = 7          # clique size a seed needs to be grown
    grow_evidence: float = 8.0    # nats a candidate needs against the growing set to join it
    stop_share: float = 0.5       # two blocks: stop once a seed grew to this share of the smaller block
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
        return (f"{type(self).__name__}(pairs={len(self.pairs)}, share={self.share:.3f}, n_rows={self.n_rows}, "
                f"pinned={self.pinned})")


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
        return _cos(X @ fit_map(X, Y).T, Y), False
    folds = P if P <= 200 else folds
    fold = torch.randperm(P, generator=g) % folds
    out = torch.zeros(P)
    for f in range(folds):
        test = fold == f
        M = fit_map(X[~test], Y[~test], map_kind)
        out[test] = _cos(X[test] @ M.T, Y[test])
    return out, True


def chance_cos(U: torch.Tensor, g: torch.Generator, min_cos: float, null_false_pairs: float = 0.5) -> float:
    """max(min_cos, null): in few dimensions or with many rows chance alone gives high cosines.
    null = the cos that a random direction's best row of U exceeds with probability
    null_false_pairs/m, so that testing all m rows lets about null_false_pairs false pairs through."""
    m = U.shape[0]
    level = min(0.5, null_false_pairs / m)
    # the directions come from a 62-bit seed drawn from g, not from g itself: a generator seeded with
    # a small integer (a training seed) draws what data generated from that seed holds, and on such
    # data the "random" directions were the world's own atoms and the null ~1 (RESULTS.md §1)
    g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)))
    r = torch.randn(max(4000, int(20 / level)), U.shape[1], generator=g)
    best = ((r / r.norm(dim=1, keepdim=True)) @ U.T).amax(1)
    return max(min_cos, float(torch.quantile(best, 1 - level)))


def _cos(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(X, Y, dim=1)


def _unit(X: torch.Tensor) -> torch.Tensor:
    X = X.detach().float().cpu()
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _off_diagonal(G: torch.Tensor) -> torch.Tensor:
    return G[~torch.eye(len(G), dtype=torch.bool)]


# -- the candidate sets ---------------------------------------------------------------------------
class TwoBlocks:
    """Candidates a → b from a row of A to a row of B (id a·nb + b). Each row takes one partner, so
    two candidates clash when they share a row of A or a row of B."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.Ua, self.Ub = _unit(A), _unit(B)
        (self.na, self.d), self.nb = self.Ua.shape, self.Ub.shape[0]
        self.Ga = (self.Ua @ self.Ua.T) * math.sqrt(self.d)
        self.Gb = (self.Ub @ self.Ub.T) * math.sqrt(self.d)

    def entries(self) -> torch.Tensor:
        """Gram entries whose distribution is the evidence's null."""
        return torch.cat([_off_diagonal(self.Ga), _off_diagonal(self.Gb)])

    def seed_ok(self, a, a2, b, b2) -> torch.Tensor:
        """Which seeds {a→b, a2→b2} (broadcast) to try: with two blocks, all."""
        return torch.ones(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)

    def block(self, s: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> None:
        """Set s (n, na, nb), scores of all candidates, to −1e9 where a candidate clashes with the
        members src → tgt (n, q)."""
        n = torch.arange(len(s))[:, None].expand_as(src)
        s[n, src, :] = -1e9
        s[n, :, tgt] = -1e9

    def clash(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """(…, r, r) from (…, r): pairs of candidates that cannot both hold."""
        return (src[..., :, None] == src[..., None, :]) | (tgt[..., :, None] == tgt[..., None, :])

    def forbid(self, C: torch.Tensor) -> None:
        """Lower the (na, nb) cosines of candidates that are not allowed at all: none here."""


class OneDictionary(TwoBlocks):
    """Candidates i → j between rows of one dictionary U (id i·m + j, i ≠ j). The map takes
    "slot-1" rows to "slot-2" rows, so a row is a source or a target, not both: candidates also
    clash when one's source is the other's target (d_aᵀM d_b ≠ d_aᵀMᵀd_b, so mixed directions do
    not agree), and {j→i, l→k} is the seed {i→j, k→l} for M⁻¹, tried once."""

    def __init__(self, U: torch.Tensor):
        super().__init__(U, U)

    def entries(self) -> torch.Tensor:
        return _off_diagonal(self.Ga)          # once: Gb is the same matrix

    def seed_ok(self, i, k, j, l) -> torch.Tensor:
        ok = (i != j) & (i != l) & (k != j) & (k != l)
        return ok & (torch.minimum(i, k) < torch.minimum(j, l))

    def block(self, s, src, tgt) -> None:
        used = torch.cat([src, tgt], 1)        # a member's rows are taken in either role; i → i never
        n = torch.arange(len(s))[:, None].expand_as(used)
        s[n, used, :] = -1e9
        s.transpose(1, 2)[n, used, :] = -1e9
        s.diagonal(dim1=1, dim2=2).fill_(-1e9)

    def clash(self, src, tgt) -> torch.Tensor:
        cross = (src[..., :, None] == tgt[..., None, :]) | (tgt[..., :, None] == src[..., None, :])
        return super().clash(src, tgt) | cross

    def forbid(self, C) -> None:
        C.fill_diagonal_(-1)


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


class _Evidence:
    """K[p, q] for candidates p = a·nb + b, q = a'·nb + b': the evidence that both belong to one
    map. Computed on demand: the full matrix has (na·nb)² entries. Candidates that share a row
    carry no information about each other (0); whether they may coexist is the clash rule's call."""

    def __init__(self, cands: TwoBlocks, cfg: MatchConfig):
        self.cands, self.cfg, self.na, self.nb = cands, cfg, cands.na, cands.nb
        self.grid, self.log_p = log_marginal(cands.entries())

    def _llr(self, x, y):
        return llr(x, y, self.grid, self.log_p, self.cfg.sigma, self.cfg.cap)

    def pairs(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """K[p, q] elementwise (broadcast)."""
        nb, c = self.nb, self.cands
        out = self._llr(c.Ga[p // nb, q // nb], c.Gb[p % nb, q % nb])
        return out.masked_fill((p // nb == q // nb) | (p % nb == q % nb), 0.0)

    def rows(self, p: torch.Tensor) -> torch.Tensor:
        """K[p, :] as (len(p), na, nb): entry [i, a', b'] is the candidate a'→b'."""
        a, b = p // self.nb, p % self.nb
        out = self._llr(self.cands.Ga[a][:, :, None], self.cands.Gb[b][:, None, :])
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


def _seeds(K: _Evidence, n_seeds: int, exclusive: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 2) candidate pairs {a→b, a'→b'} on strong entries of both Gram matrices, best first; with
    `exclusive` (one dictionary: rows × rows, bool), EXCLUSIVE_BONUS more for a seed where a, a'
    and b, b' are both exclusive pairs."""
    c, nb = K.cands, K.nb
    ea, eb = strong_entries(c.Ga, K.cfg.seed_degree), strong_entries(c.Gb, K.cfg.seed_degree)
    ea = ea[ea[:, 0] < ea[:, 1]]                 # unordered a–a' against ordered b–b': each seed once
    a, a2, b, b2 = ea[:, :1], ea[:, 1:], eb[None, :, 0], eb[None, :, 1]
    ok = c.seed_ok(a, a2, b, b2)
    p1, p2 = (a * nb + b)[ok], (a2 * nb + b2)[ok]
    score = K.pairs(p1, p2)
    if exclusive is not None:
        both = exclusive[ea[:, 0], ea[:, 1]][:, None] & exclusive[eb[:, 0], eb[:, 1]][None, :]
        score += EXCLUSIVE_BONUS * both[ok]
    top = score.topk(min(n_seeds, len(p1))).indices
    return torch.stack([p1[top], p2[top]], 1)


def _clusters(K: _Evidence, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per seed: the `pool` candidates it supports most, and which of them form the largest set that
    agrees pairwise (K > 0, no clash). Returns pool (S, r) and membership (S, r)."""
    (S, q), nb = seeds.shape, K.nb
    support = K.rows(seeds.reshape(-1)).reshape(S, q, K.na, nb).sum(1)
    return _pool_clique(K, support, seeds, min(K.cfg.pool, K.na * nb))


def _pool_clique(K: _Evidence, support: torch.Tensor, taken: torch.Tensor, r: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, na, nb) support -> the r best-supported candidates that do not clash with `taken` (S, q),
    and which of them form the largest set that agrees pairwise: pool (S, r), membership (S, r)."""
    nb = K.nb
    K.cands.block(support, taken // nb, taken % nb)
    u, pool = support.view(len(support), -1).topk(r, dim=1)
    agree = (K.pairs(pool[:, :, None], pool[:, None, :]) > 0) & ~K.cands.clash(pool // nb, pool % nb)
    return pool, largest_agreeing_set(agree, u)


def _recluster(K: _Evidence, seeds: torch.Tensor, pool: torch.Tensor, member: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clique step again, RECLUSTER_ROUNDS times, its pool now the candidates that the seed *and
    its last clique* support most. Two candidates give a true candidate little support unless a
    Gram entry between them is strong, so with many rows (four slots: m² candidates, ~m/4 true) the
    first pool holds only a few true candidates among chance ones; the few that a true seed's clique
    does hold lift the others into the next pool (w10, RESULTS.md §1: true seeds whose first clique
    held 2-3 true candidates reached pure cliques of 67 and 85; chance seeds stayed at <= 8)."""
    nb = K.nb
    for _ in range(RECLUSTER_ROUNDS):
        # each seed's set: its two candidates and its clique (padded with its first candidate)
        start = torch.cat([seeds, torch.where(member, pool, seeds[:, :1])], 1)
        ids, inv = start.unique(return_inverse=True)
        hits = torch.zeros(len(seeds), len(ids)).scatter_(1, inv, 1.0)
        support = torch.zeros(len(seeds), K.na * nb)
        step = max(1, BATCH_FLOATS // (K.na * nb))   # K.rows of `step` candidates at a time
        for c in range(0, len(ids), step):
            support += hits[:, c:c + step] @ K.rows(ids[c:c + step]).view(-1, K.na * nb)
        pool, member = _pool_clique(K, support.view(len(seeds), K.na, nb), start, pool.shape[1])
    return pool, member


def largest_agreeing_set(agree: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """(S, r, r) pairwise agreement of r candidates, (S, r) their support (−1e9: excluded) ->
    (S, r) membership of a large set that agrees pairwise, by replicator dynamics on the agreement
    graph (Motzkin–Straus: its local maxima are maximal cliques), started from softmax(support)."""
    ok = support > -1e8
    # symmetric (excluded candidates start, and stay, at 0), so A x = xᵀA: as a row-vector product
    # the step is ~5x faster on CPU (batched matrix-vector products are slow there)
    A = (agree & ok[:, :, None] & ok[:, None, :]).float() + 0.5 * torch.eye(agree.shape[-1])
    x = torch.softmax(support / 2.0, dim=1)
    for _ in range(100):
        x = x * (x[:, None, :] @ A).squeeze(1)
        x = x / x.sum(1, keepdim=True).clamp_min(1e-30)
    return (x > 1.0 / (4 * agree.shape[-1])) & ok


def _grow(K: _Evidence, start: list[int]) -> torch.Tensor:
    """Add the Hungarian-best candidates with ≥ grow_evidence nats against the set (a third of the
    set's size per round) and drop members that disagree with the rest on average."""
    nb = K.nb
    S = torch.tensor(list(dict.fromkeys(start)))
    total = K.rows(S).sum(0)                    # (na, nb) evidence of every candidate against S
    for _ in range(GROW_ROUNDS):
        s = total.clone()
        K.cands.block(s[None], (S // nb)[None], (S % nb)[None])
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


def refine(cands: TwoBlocks, M: torch.Tensor, cfg: MatchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternate: match rows by cos(M a, b) (Hungarian, ≥ refine_cos), refit M on the matches.
    Returns M and the last matching with ≥ 3 pairs (empty if none)."""
    r = c = torch.zeros(0, dtype=torch.long)
    for it in range(cfg.refine_iters + 1):
        MA = cands.Ua @ M.T
        C = (MA / MA.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ cands.Ub.T
        cands.forbid(C)
        rr, cc = linear_sum_assignment(C.numpy(), maximize=True)
        ok = C[rr, cc].numpy() >= cfg.refine_cos
        if ok.sum() < 3:
            break
        r, c = torch.from_numpy(rr[ok]), torch.from_numpy(cc[ok])
        if it < cfg.refine_iters:
            M = fit_map(cands.Ua[r], cands.Ub[c], cfg.map_kind)
    return M, r, c


class Largest:
    """Two blocks: the largest grown set wins, refined once afterwards; stop once one reaches
    `enough`. With the partition known a grown set's size is a faithful score."""

    def __init__(self, enough: float):
        self.enough, self.best = enough, torch.zeros(0, dtype=torch.long)

    def offer(self, K: _Evidence, grown: torch.Tensor) -> None:
        if len(grown) > len(self.best):
            self.best = grown

    def done(self) -> bool:
        return len(self.best) >= self.enough


class MostSupported:
    """One dictionary: refine every grown set of ≥ min_size into a map, and judge it by how many
    refined pairs the Gram evidence supports (≥ min_evidence nats per comparison against the
    others), not by how many rows it matches: in few dimensions a wrong map matches many rows at
    chance-level cosines. Stop after `stop_after` sets reached `enough` supported pairs.
    `best` = (M, r, c, evidence per pair) or None."""

    def __init__(self, min_size: int, enough: int, min_evidence: float, stop_after: int):
        self.min_size, self.enough, self.min_evidence, self.stop_after = min_size, enough, min_evidence, stop_after
        self.best, self.score, self.found = None, None, 0

    def offer(self, K: _Evidence, grown: torch.Tensor) -> None:
        if len(grown) < self.min_size:
            return
        c, nb = K.cands, K.nb
        M, r, t = refine(c, fit_map(c.Ua[grown // nb], c.Ub[grown % nb], K.cfg.map_kind), K.cfg)
        evidence = pair_evidence(K, r * nb + t)
        score = (int((evidence >= self.min_evidence).sum()), len(r))
        if self.best is None or score > self.score:
            self.best, self.score = (M, r, t, evidence), score
        self.found += score[0] >= self.enough

    def done(self) -> bool:
        return self.found >= self.stop_after


def pair_evidence(K: _Evidence, ids: torch.Tensor) -> torch.Tensor:
    """Each candidate's mean evidence (nats per comparison) against the other candidates in ids."""
    return K.pairs(ids[:, None], ids[None, :]).sum(1) / max(len(ids) - 1, 1)


def search(cands: TwoBlocks, cfg: MatchConfig, judge, n_seeds: int | None = None,
           exclusive: torch.Tensor | None = None) -> _Evidence | None:
    """Seed → cluster → grow, offering each grown set to `judge` (Largest or MostSupported), which
    keeps the best; seeds go in batches until the judge is done or n_seeds (cfg.n_seeds) are tried,
    then the first RECLUSTER_SEEDS of them again through `_recluster` if the judge is still not done.
    `exclusive` ranks seeds of rows that never fire together first (`_seeds`).
    Returns the Gram evidence it searched with (None where there are too few rows to search), so a
    caller judges the pairs by the same evidence without building it again."""
    na, nb = cands.na, cands.nb
    if min(na, nb) < 4:
        return None
    K = _Evidence(cands, cfg)
    seeds = _seeds(K, cfg.n_seeds if n_seeds is None else n_seeds, exclusive)
    per_batch = max(4, min(cfg.seed_batch, BATCH_FLOATS // (na * nb)))
    # recluster only after a plain pass: it costs several plain seeds' time each, and reclustering
    # every seed made searches that find nothing 4-5x slower (RESULTS.md §1). It starts from the
    # plain pass's cliques of its seeds, kept as that pass makes them
    first = []
    for recluster in (False, True):
        todo = seeds[:RECLUSTER_SEEDS] if recluster else seeds
        for i, start in enumerate(range(0, len(todo), per_batch)):
            batch = todo[start:start + per_batch]
            if recluster:
                pool, member = _recluster(K, batch, *first[i])
            else:
                pool, member = _clusters(K, batch)
                if start < RECLUSTER_SEEDS:
                    first.append((pool[:RECLUSTER_SEEDS - start], member[:RECLUSTER_SEEDS - start]))
            size = member.sum(1)
            for s in torch.argsort(size, descending=True).tolist():
                if size[s] < cfg.min_cluster:
                    break
                judge.offer(K, _grow(K, batch[s].tolist() + pool[s][member[s]].tolist()))
            if judge.done():
                return K
    return K


# -- which pairs to keep --------------------------------------------------------------------------
@dataclass
class Verdict:
    cos: torch.Tensor          # (P,) held-out cos(M a, b) (in-sample where too few to hold out)
    keep: torch.Tensor         # (P,) bool
    threshold: float           # the cos a pair must reach: max(min_cos, chance)
    in_sample: torch.Tensor | None = None  # (P,) cos under one map fitted on all pairs


def verdict(cands: TwoBlocks, r: torch.Tensor, c: torch.Tensor, g: torch.Generator, cfg: MatchConfig,
            evidence: torch.Tensor | None = None, min_evidence: float = 0.0) -> Verdict:
    """Keep pairs a → b that a map fitted without them predicts above the chance null. With
    `evidence` (per pair, `pair_evidence`), a pair the held-out map misses is kept too if it fits
    in-sample and the Gram evidence against the other pairs supports it: a right pair whose source
    direction no other pair covers fails the held-out test."""
    cos, validated = validate(cands.Ua[r], cands.Ub[c], g, cfg.map_kind, cfg.folds)
    thr = chance_cos(cands.Ub, g, cfg.min_cos, cfg.null_false_pairs)
    keep, in_sample = cos >= thr, None
    if evidence is not None:
        in_sample = _cos(cands.Ua[r] @ fit_map(cands.Ua[r], cands.Ub[c], cfg.map_kind).T, cands.Ub[c])
        keep |= (in_sample >= thr) & (evidence >= min_evidence)
    return Verdict(cos, keep & (validated or cfg.allow_unpinned), thr, in_sample)


def first_come(cands: TwoBlocks, r: torch.Tensor, c: torch.Tensor, keep: torch.Tensor,
               order: torch.Tensor) -> torch.Tensor:
    """keep, less the pairs that clash with a kept pair earlier in `order`."""
    clash, taken, keep = cands.clash(r, c), torch.zeros(len(r), dtype=torch.bool), keep.clone()
    for p in order.tolist():
        if keep[p] and (clash[p] & taken).any():
            keep[p] = False
        elif keep[p]:
            taken[p] = True
    return keep


def match_within(W: torch.Tensor, cfg: MatchConfig, min_pairs: float, enough: int | None = None,
                 min_evidence: float = 0.5, stop_after: int = 2, g: torch.Generator | None = None,
                 exclusive: torch.Tensor | None = None) -> Match:
    """Pairs i → j among the rows of one dictionary W (i ≠ j, a row a source or a target, not both)
    with W[j] ≈ M W[i] for one map M, when which rows are "slot 1" is unknown too: the echo
    detector's search (sae/eval/echo.py) and the binding recipe's first look at a standard
    dictionary. Grown sets are judged by their evidence-supported pairs (`MostSupported`, stop once
    `stop_after` reached `enough`, default ceil(min_pairs)); a pair the held-out map misses is kept if it
    fits in-sample with ≥ `min_evidence` nats per comparison; pairs already aligned (duplicates, which
    M = I explains) are not pairs; fewer than `min_pairs` kept pairs report none. Pairs index W.
    `g` draws the cross-validation folds and the chance null (default: seeded by cfg.seed);
    `exclusive` (rows × rows, bool: pairs that never fire together) orders the seeds (`_seeds`)."""
    g = torch.Generator().manual_seed(cfg.seed) if g is None else g
    dictionary = OneDictionary(W)
    U, (m, d) = dictionary.Ua, dictionary.Ua.shape
    enough = max(3, int(min_pairs) if enough is None else enough)
    judge = MostSupported(max(3, min(enough, d // 2)), enough, min_evidence, stop_after)
    search(dictionary, cfg, judge, exclusive=exclusive)
    none = Match(torch.eye(d), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0.0, m)
    if judge.best is None or len(judge.best[1]) < 3:
        return none
    M, r, c, evidence = judge.best
    v = verdict(dictionary, r, c, g, cfg, evidence, min_evidence)
    trivial = (U[r] * U[c]).sum(1) >= v.threshold        # already aligned: a duplicate, not an echo
    keep = first_come(dictionary, r, c, v.keep & ~trivial, torch.argsort(v.cos, descending=True))
    if keep.sum() < max(3, min_pairs):
        keep[:] = False
    pairs = torch.stack([r, c], 1)[keep]
    if len(pairs) >= 3:
        # The map is fitted on the kept pairs plus those it fits in-sample that fail the held-out
        # test only because no other pair covers their direction: without them directions of R^d
        # stay unpinned (RESULTS.md §6). They must not clash with a kept pair (one direction).
        extra = (v.in_sample >= v.threshold) & ~trivial & ~keep
        extra &= ~(dictionary.clash(r, c)[:, keep].any(1))
        fit = keep | extra
        M = fit_map(U[r[fit]], U[c[fit]], cfg.map_kind)
    return Match(M, pairs, v.cos[keep], 2 * len(pairs) / m, m, len(pairs) > d)


def match_blocks(A: torch.Tensor, B: torch.Tensor, cfg: MatchConfig = MatchConfig(),
                 min_evidence: float = 0.5) -> Match:
    """Pairs a → σ(a) between the rows of A and of B, and one map with B[σ(a)] ≈ M A[a] (see the
    module docstring). A pair the held-out map misses is kept if it fits in-sample with ≥
    `min_evidence` nats per comparison against the other pairs. Pairs index A (column 0) and B
    (column 1)."""
    g = torch.Generator().manual_seed(cfg.seed)
    blocks = TwoBlocks(A, B)
    (na, d), nb = blocks.Ua.shape, blocks.nb
    none = Match(torch.eye(d), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0.0, na + nb)
    judge = Largest(cfg.stop_share * min(na, nb))
    K = search(blocks, cfg, judge)
    best = judge.best
    if len(best) < 3:
        return none
    M, r, c = refine(blocks, fit_map(blocks.Ua[best // nb], blocks.Ub[best % nb], cfg.map_kind), cfg)
    if len(r) < 3:
        return none
    # Hungarian pairs between two blocks never clash, so `first_come` has nothing to drop here. As in
    # `match_within`, a pair the held-out map misses stays if the Gram evidence supports it: with
    # fewer pairs than d (a map between two of several slots) most held-out sources lie partly
    # outside the other sources' span, and a right pair fails the held-out test (RESULTS.md §1)
    v = verdict(blocks, r, c, g, cfg, pair_evidence(K, r * nb + c), min_evidence)
    pairs = torch.stack([r, c], 1)[v.keep]
    if len(pairs) >= 3:
        M = fit_map(blocks.Ua[pairs[:, 0]], blocks.Ub[pairs[:, 1]], cfg.map_kind)
    return Match(M, pairs, v.cos[v.keep], 2 * len(pairs) / (na + nb), na + nb, len(pairs) > d)
