"""Echo-feature detector: does a standard SAE's dictionary hold pairs of latents related by one
shared linear map, w_j ≈ M w_i (binding.md §3)?

A standard SAE trained on matrix-bound data learns d_a and M d_a as separate latents ("echo
features"). Finding them is a registration problem with unknown correspondence *and* unknown
partition (which rows are "slot 1"), and a local search over M fails (binding.md: an imperfect
dictionary in superposition has many maps that align many rows a little). What survives is the
Gram structure: for orthogonal M, ⟨M d_a, M d_b⟩ = ⟨d_a, d_b⟩, so the true pairs are a large set
of candidate correspondences (i→j) that agree with each other, G_ik ≈ G_jl. We find that set with
graduated assignment (Gold & Rangarajan 1996: soft assignment, Sinkhorn, annealed inverse
temperature) on the pairwise-consistency affinity, orient the pairs (i→j vs j→i), fit M, refine it
by matching + refitting, and keep only pairs that a map fitted *without them* predicts
(cross-validation). The null: a pair must beat the cosine that chance alignment of a random
direction with the dictionary reaches, must not be a duplicate (M = I explains it), each row is a
source or a target but not both, and fewer than d pairs do not pin a map down, so report none.

    res = find_echoes(W_dec)            # W_dec: (m, d) decoder rows of any SAE
    res.transform, res.pairs, res.share

`match_blocks(A, B)` solves the easier problem where the partition is known (two blocks of rows);
the binding-SAE training recipe uses it to tie a split decoder back together.

Limits (measured, see the binding findings): the Gram structure is only invariant for orthogonal
M, so Gaussian (non-orthogonal) maps are not found; the self-matching needs a clean dictionary
(atoms at cos ≳ 0.98 to the truth) and fails on noisier ones, where `match_blocks` with a known
partition still works. Cost: the affinity has (m²)² entries, so m ≲ 128 rows (a few seconds to a
minute on a CPU); larger dictionaries are analysed on a random subset of `max_rows` rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class EchoConfig:
    map_kind: str = "orthogonal"  # fitted map: "orthogonal" (Procrustes) or "linear" (least squares)
    sigma: float = 0.3            # Gram-consistency tolerance, in units of 1/√d (the cos spread)
    # find_echoes tries each tolerance `restarts` times and keeps the fit that matches most pairs:
    # on trained dictionaries one run lands on the right assignment or on a wrong one (all or
    # nothing), and which tolerance works varies from dictionary to dictionary (measured: a single
    # run found the echoes of 2 of 3 TopK SAEs on the bound reference world; the ladder, all 3).
    search_sigmas: tuple[float, ...] = (0.3, 0.5)
    beta_max: float = 200.0       # final inverse temperature of the annealing
    beta_rate: float = 1.5
    inner: int = 3                # assignment updates per temperature
    restarts: int = 2             # graduated-assignment starts; the best refined fit is kept
    refine_cos: float = 0.7       # pairs used to refit M while refining
    min_cos: float = 0.8          # echo: cos(M w_i, w_j) ≥ min_cos under a map not fitted on (i, j)
    null_false_pairs: float = 0.5 # ...and above the cos that chance alignment gives this many pairs
    min_pairs_per_dim: float = 1.0  # fewer pairs than this·d do not pin a map down: report none
    allow_unpinned: bool = False  # report pairs too few (< 2d/3) to cross-validate, on in-sample fit?
    folds: int = 5                # cross-validation folds above 200 pairs (leave-one-out below)
    refine_iters: int = 10
    max_rows: int = 128           # affinity memory is (m²)² floats (1 GiB at 128); above, subsample
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
def _affinity(G: torch.Tensor, sigma: float) -> torch.Tensor:
    """K[(i,j),(k,l)] = exp(−(G_ik − G_jl)² / 2σ²): candidates i→j and k→l agree on the Gram."""
    m = G.shape[0]
    K = torch.empty(m, m, m, m, dtype=torch.float32)
    for i in range(m):
        K[i] = torch.exp(-(G[i][None, :, None] - G[:, None, :]).pow(2) / (2 * sigma**2))
    return K.reshape(m * m, m * m)


def _sinkhorn(logits: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Row/column-normalise exp(logits) (ma, mb) with a slack row and column, so that rows and
    columns may stay unmatched."""
    ma, mb = logits.shape
    L = torch.zeros(ma + 1, mb + 1, dtype=logits.dtype)
    L[:ma, :mb] = logits
    L[ma, mb] = -1e9
    for _ in range(iters):
        L[:ma] -= torch.logsumexp(L[:ma], dim=1, keepdim=True)
        L[:, :mb] -= torch.logsumexp(L[:, :mb], dim=0, keepdim=True)
    return L[:ma, :mb].exp()


def _graduated_assignment(K: torch.Tensor, m: int, cfg: EchoConfig, g: torch.Generator) -> torch.Tensor:
    eye = torch.eye(m, dtype=torch.bool)          # i→i is the trivial identity match: forbidden
    X = (1 + 0.1 * torch.rand(m, m, generator=g)) / m
    X[eye] = 0
    beta = 1.0
    while beta < cfg.beta_max:
        for _ in range(cfg.inner):
            Q = (K @ X.reshape(-1)).reshape(m, m)
            Q = (Q - Q.mean()) / Q.std().clamp_min(1e-12)
            X = _sinkhorn((beta * Q).masked_fill(eye, -1e9))
        beta *= cfg.beta_rate
    return X


def _orient(G: torch.Tensor, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Graduated assignment returns i→j and j→i alike; M and M⁻¹ are different maps. Two pairs
    point the same way when G[u_p,u_q] ≈ G[v_p,v_q]; solve the ±1 synchronisation spectrally."""
    u = torch.tensor([p[0] for p in pairs])
    v = torch.tensor([p[1] for p in pairs])
    J = (G[u][:, v] - G[v][:, u]).abs() - (G[u][:, u] - G[v][:, v]).abs()
    J.fill_diagonal_(0)
    sign = torch.sign(torch.linalg.eigh(J.double())[1][:, -1])
    return [(a, b) if s >= 0 else (b, a) for (a, b), s in zip(pairs, sign.tolist())]


def fit_map(A: torch.Tensor, B: torch.Tensor, kind: str = "orthogonal") -> torch.Tensor:
    """M (column convention) minimising Σ ‖M a_p − b_p‖² over rows a_p of A, b_p of B."""
    A, B = A.double(), B.double()
    if kind == "orthogonal":
        u, _, vt = torch.linalg.svd(B.T @ A)
        return (u @ vt).float()
    if kind == "linear":
        return torch.linalg.lstsq(A, B).solution.T.float()
    raise ValueError(f"unknown map kind {kind!r}")


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


def _validate(U: torch.Tensor, r: np.ndarray, c: np.ndarray, cfg: EchoConfig,
              g: torch.Generator) -> tuple[torch.Tensor, bool]:
    """cos(M u_i, u_j) for each pair, judged by a map fitted on the *other* pairs (leave-one-out, or
    k-fold for many pairs). A held-out pair is predictable only if its source lies mostly in the
    span of the other sources, so this needs P ≳ 2d/3 pairs; and M is pinned down only when P > d.
    With fewer pairs only an orthogonal map's in-sample fit is any test (it must preserve the Gram
    matrix); a linear map fits any ≤ d pairs and proves nothing. Returns (cos, validated)."""
    P, d = len(r), U.shape[1]
    if P < 2 * d / 3 + 1:
        if cfg.map_kind != "orthogonal":
            return torch.zeros(P), False
        M = fit_map(U[r], U[c], cfg.map_kind)
        return torch.nn.functional.cosine_similarity(U[r] @ M.T, U[c], dim=1), False
    folds = P if P <= 200 else cfg.folds
    fold = torch.randperm(P, generator=g) % folds
    out = torch.zeros(P)
    for f in range(folds):
        test, train = (fold == f).numpy(), (fold != f).numpy()
        M = fit_map(U[r[train]], U[c[train]], cfg.map_kind)
        pred = U[r[test]] @ M.T
        out[torch.from_numpy(test)] = torch.nn.functional.cosine_similarity(pred, U[c[test]], dim=1)
    return out, True


def match_blocks(A: torch.Tensor, B: torch.Tensor, cfg: EchoConfig = EchoConfig()) -> EchoResult:
    """Echoes between two *given* blocks of rows (e.g. a binding SAE's slot-1 atoms and a free
    slot-2 block): find pairs a → σ(a) with Gram(A)_ab ≈ Gram(B)_σ(a)σ(b) and one map B ≈ M A.
    With the partition known this is ordinary graph matching, much easier than `find_echoes`.
    Pairs index A (column 0) and B (column 1)."""
    g = torch.Generator().manual_seed(cfg.seed)
    A, B = A.detach().float().cpu(), B.detach().float().cpu()
    Ua = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Ub = B / B.norm(dim=1, keepdim=True).clamp_min(1e-12)
    na, nb, d = Ua.shape[0], Ub.shape[0], Ua.shape[1]
    Ga, Gb = Ua @ Ua.T, Ub @ Ub.T
    s2 = 2 * (cfg.sigma / math.sqrt(d)) ** 2
    K = torch.exp(-(Ga[:, None, :, None] - Gb[None, :, None, :]).pow(2) / s2).reshape(na * nb, na * nb)
    best = None
    for _ in range(cfg.restarts):
        X = (1 + 0.1 * torch.rand(na, nb, generator=g)) / max(na, nb)
        beta = 1.0
        while beta < cfg.beta_max:
            for _ in range(cfg.inner):
                Q = (K @ X.reshape(-1)).reshape(na, nb)
                X = _sinkhorn(beta * (Q - Q.mean()) / Q.std().clamp_min(1e-12))
            beta *= cfg.beta_rate
        r, c = linear_sum_assignment(X.numpy(), maximize=True)
        keep = X[r, c].numpy() > 0.5
        if keep.sum() < 3:
            continue
        M = fit_map(Ua[r[keep]], Ub[c[keep]], cfg.map_kind)
        for _ in range(cfg.refine_iters):      # refine on the bipartite cos(M a, b)
            MA = Ua @ M.T
            C = (MA / MA.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ Ub.T
            r, c = linear_sum_assignment(C.numpy(), maximize=True)
            ok = C[r, c].numpy() >= cfg.refine_cos
            if ok.sum() < 3:
                break
            M = fit_map(Ua[r[ok]], Ub[c[ok]], cfg.map_kind)
            r, c = r[ok], c[ok]
        if best is None or len(r) > len(best[1]):
            best = (M, r, c)
    if best is None:
        return EchoResult(torch.eye(d), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0.0, na + nb)
    M, r, c = best
    Ucat = torch.cat([Ua, Ub])
    cv, validated = _validate(Ucat, r, c + na, cfg, g)
    keep = (cv >= _threshold(Ub, cfg, g)) & (validated or cfg.allow_unpinned)
    pairs = torch.stack([torch.from_numpy(r), torch.from_numpy(c)], 1)[keep]
    if len(pairs) >= 3:
        M = fit_map(Ua[pairs[:, 0]], Ub[pairs[:, 1]], cfg.map_kind)
    return EchoResult(M, pairs, cv[keep], 2 * len(pairs) / (na + nb), na + nb, len(pairs) > d)


def _threshold(U: torch.Tensor, cfg: EchoConfig, g: torch.Generator) -> float:
    """max(min_cos, null): in few dimensions or with many rows chance alone gives high cosines.
    null = the cos that a random direction's best row exceeds with probability null_false_pairs/m,
    so that testing all m rows lets about null_false_pairs false pairs through."""
    m = U.shape[0]
    level = min(0.5, cfg.null_false_pairs / m)
    r = torch.randn(max(4000, int(20 / level)), U.shape[1], generator=g)
    best = ((r / r.norm(dim=1, keepdim=True)) @ U.T).amax(1)
    return max(cfg.min_cos, float(torch.quantile(best, 1 - level)))


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
    G = U @ U.T

    best = None
    for sigma in cfg.search_sigmas:
        K = _affinity(G, sigma / math.sqrt(d))
        for _ in range(cfg.restarts):
            X = _graduated_assignment(K, m, cfg, g)
            cost = X.numpy().copy()
            np.fill_diagonal(cost, -1e9)
            r, c = linear_sum_assignment(cost, maximize=True)
            confident = [(int(a), int(b)) for a, b in zip(r, c) if X[a, b] > 0.5]
            if len(confident) < 3:
                continue
            oriented = _orient(G, confident)
            M = fit_map(U[[p[0] for p in oriented]], U[[p[1] for p in oriented]], cfg.map_kind)
            M, r, c = _refine(U, M, cfg)
            if best is None or len(r) > len(best[1]):
                best = (M, r, c)
        del K  # (m²)² floats: free before the next tolerance builds its own

    if best is None or len(best[1]) < 3:
        return EchoResult(torch.eye(d), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0.0, m_all)
    M, r, c = best
    cv, validated = _validate(U, r, c, cfg, g)
    thr = _threshold(U, cfg, g)
    trivial = (U[r] * U[c]).sum(1) >= thr             # already aligned: a duplicate, not an echo
    keep = (cv >= thr) & ~trivial & (validated or cfg.allow_unpinned)
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
        M = fit_map(U[r[keep.numpy()]], U[c[keep.numpy()]], cfg.map_kind)
    return EchoResult(M, pairs, cv[keep], share, m_all, len(pairs) > d)
