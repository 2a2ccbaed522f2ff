"""Echo-feature detector: does a standard SAE's dictionary hold pairs of latents related by one
shared linear map, w_j ≈ M w_i (binding.md §3)?

A standard SAE trained on matrix-bound data learns d_a and M d_a as separate latents ("echo
features"). Finding them is a registration problem with unknown correspondence *and* unknown
partition (which rows are "slot 1"), and a local search over M fails (binding.md: an imperfect
dictionary in superposition has many maps that align many rows a little). What survives is the
Gram structure: for orthogonal M, ⟨M d_a, M d_b⟩ = ⟨d_a, d_b⟩, so the true pairs are a large set
of candidate correspondences (i→j) that agree with each other, G_ik ≈ G_jl.

The search is the binding recipe's (sae/recipes/matching.py: evidence, seeds, cliques, growth,
refinement, cross-validation, chance null) on one dictionary whose rows may play either role
(`OneDictionary`: i ≠ j, a row is a source or a target but not both). What is the detector's own:
  - each grown set is refined into a map and judged by its evidence-supported pairs
    (`MostSupported`), since with the partition unknown a wrong map matches many rows by chance;
  - a pair the held-out map misses is still kept if it fits in-sample and the Gram evidence
    supports it (a right pair whose direction no other pair covers fails the held-out test);
  - a pair already aligned (cos(w_i, w_j) above the threshold) is a duplicate that M = I explains,
    not an echo;
  - fewer than d pairs do not pin a map down: then it reports none.

    res = find_echoes(W_dec)            # W_dec: (m, d) decoder rows of any SAE
    res.transform, res.pairs, res.share

Limits: only one orthogonal map (not 3 slots, not Gaussian M, whose Gram matrix is not preserved);
it reports nothing below d pairs, so a map that moves only part of a dictionary goes unseen;
dictionaries above `max_rows` rows are analysed on a random subset, which loses pairs
quadratically. Measurements: RESULTS.md §1 and §6.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.recipes.matching import Match, MatchConfig, match_within


@dataclass(frozen=True)
class EchoConfig:
    map_kind: str = "orthogonal"  # fitted map: "orthogonal" (Procrustes) or "linear" (least squares)
    llr_sigma: float = 0.35       # spread of G_ik − G_jl for true echo pairs, units of 1/√d (measured)
    llr_cap: float = 3.0          # evidence floor (nats) for one disagreeing comparison
    seed_degree: float = 5.0      # "strong" Gram entries: the top seed_degree per row
    # Seeds tried at most: n_seeds, and seeds_per_candidate·m(m−1) (small dictionaries have few
    # informative seeds), and seed_work/m² (each seed costs ~m² evidence terms; on large
    # dictionaries the first seeds suffice, and a dictionary without echoes tries them all).
    n_seeds: int = 4000
    seeds_per_candidate: float = 0.45
    seed_work: float = 4000 * 192**2
    seed_batch: int = 256         # at most; fewer when 2·batch·m² would pass 2^24 floats
    pool: int = 100               # candidates per seed handed to the clique step
    min_cluster: int = 7          # clique size a seed needs to be grown
    grow_evidence: float = 8.0    # nats a candidate needs against the growing set to join it
    stop_after: int = 2           # stop once this many seeds grew into ≥ min_pairs_per_dim·d pairs
    min_evidence: float = 0.5     # a pair the held-out map misses still counts if it fits in-sample
                                  # and agrees with the other pairs by ≥ this many nats per comparison
    refine_cos: float = 0.7       # pairs used to refit M while refining
    self_min_cos: float = 0.85    # kept pairs: cos(M w_i, w_j) ≥ this under a map not fitted on
                                  # (i, j); above matching's 0.8 because merged latents of a trained
                                  # SAE validate just below it (RESULTS.md §6)
    null_false_pairs: float = 0.5 # ...and above the cos that chance alignment gives this many pairs
    min_pairs_per_dim: float = 1.0  # fewer pairs than this·d do not pin a map down: report none
    allow_unpinned: bool = False  # report pairs too few (< 2d/3) to cross-validate, on in-sample fit?
    folds: int = 5                # cross-validation folds above 200 pairs (leave-one-out below)
    refine_iters: int = 10
    max_rows: int = 1024          # above this, a random subset of rows: a pair survives only if both
                                  # its rows do, so keep it large
    seed: int = 0

    def search_config(self, m: int) -> MatchConfig:
        """The engine's settings for a dictionary of m rows."""
        n_seeds = min(self.n_seeds, int(self.seeds_per_candidate * m * (m - 1)) + 1, int(self.seed_work / m**2) + 1)
        return MatchConfig(map_kind=self.map_kind, sigma=self.llr_sigma, cap=self.llr_cap, seed_degree=self.seed_degree,
                           n_seeds=n_seeds, seed_batch=self.seed_batch, pool=self.pool, min_cluster=self.min_cluster,
                           grow_evidence=self.grow_evidence, refine_cos=self.refine_cos, refine_iters=self.refine_iters,
                           min_cos=self.self_min_cos, null_false_pairs=self.null_false_pairs,
                           allow_unpinned=self.allow_unpinned, folds=self.folds, seed=self.seed)


class EchoResult(Match):
    """A Match within one dictionary: pairs (i, j) are rows of W with w_j ≈ M w_i, and share is the
    share of the analysed rows that take part in a pair."""


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
    engine = cfg.search_config(len(rows))
    res = match_within(W[rows], engine, min_pairs=cfg.min_pairs_per_dim * d,
                       enough=max(3, int(cfg.min_pairs_per_dim * d)), min_evidence=cfg.min_evidence,
                       stop_after=cfg.stop_after, g=g)
    return EchoResult(res.transform, rows[res.pairs], res.cos, res.share, m_all, res.pinned)
