"""Per-latent statistics from one streaming pass over a dictionary's codes, in memory that does not
grow with the data: what the feature dashboards (sae/eval/dashboard.py) show.

    stats = LatentStats(n_latents=512, top_k=16, samples=16, context=8, bins=32, seed=0)
    for block in blocks:           # Block: codes (rows, n) and each row's token id, sequence, position
        stats.update(block)
    stats.top, stats.samples       # Kept: per latent, entries sorted by score, each with its context
    stats.hist                     # Histograms: activation histogram per latent
    stats.count, stats.sum, stats.max, stats.rows

Per latent it keeps
  - the `top_k` highest activations (a bounded top-k, merged block by block),
  - `samples` rows drawn uniformly at random from the rows where it fires: every firing row gets
    a random key and the latent keeps the largest keys, a bounded top-k again, so the kept rows
    are a uniform sample without replacement (a reservoir), and their activations spread over
    the whole firing distribution, not only its top,
  - for each kept row its context: the `context` rows either side in the same sequence (token id,
    position, and this latent's activation on each), captured while the block is in memory,
  - how often it fires, the sum and maximum of its activations, and a histogram of them.

The histogram needs no first pass for its range: each latent's bins span [0, hi), hi the smallest
power of two above every value seen, doubled whenever a value reaches it by merging bin pairs
(exact, since `bins` is a power of two too). It ends with max < hi <= 2 max and counts every
firing row in the bin it would have had with the final hi from the start.

Memory, whatever the number of rows: for n latents, K = top_k + samples kept rows and W = 2
context + 1 tokens per context, the state is n * (K * (12 W + 24) + 8 bins + 24) bytes (16,384
latents, K = 32, W = 17, 32 bins: 124 MB). An update on a block of C rows adds the block's codes and
firing entries (about 2 C n float32) and, per latent it touches, 2 K scores; contexts are built only
for the rows that enter.
Blocks must hold whole sequences (a sequence split across blocks loses the context across the cut).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Block:
    codes: Tensor       # (rows, n) float32: the tracked latents' codes
    token_ids: Tensor   # (rows,) int
    seq_index: Tensor   # (rows,) int64: rows of one sequence are contiguous, in position order
    position: Tensor    # (rows,) int
    first_row: int      # the global row number of rows[0] (a cache row; a running count when streamed)


class Kept:
    """For each of n latents, the k entries with the highest scores so far, each with its row and
    its context of `width` rows. Slots are in no order (pages sort them); score -inf marks an
    empty slot."""

    def __init__(self, n: int, k: int, width: int):
        self.k, self.width = k, width
        self.score = torch.full((n, k), -math.inf)
        self.act = torch.zeros(n, k)
        self.row = torch.full((n, k), -1, dtype=torch.int64)
        self.seq = torch.full((n, k), -1, dtype=torch.int64)
        self.tok = torch.full((n, k, width), -1, dtype=torch.int32)
        self.pos = torch.full((n, k, width), -1, dtype=torch.int32)   # -1: outside the sequence
        self.ctx = torch.zeros(n, k, width)                            # the latent's activation there

    def floor(self) -> Tensor:
        """(n,) the score a candidate must beat to be kept."""
        return self.score.amin(1)

    def merge(self, lat: Tensor, score: Tensor, rows: Tensor, fields):
        """Candidates (m, c) with scores (-inf: none) at block rows `rows`, for the latents `lat`:
        each latent keeps its k best of old and new. Decided on scores alone; only the accepted
        candidates' fields are computed, by fields(latents (A,), rows (A,)), and written into the
        slots they take. A stable sort with the old entries first keeps what came first on ties
        (the earliest rows win, so the same data gives the same pages whatever the blocks)."""
        union = torch.cat([self.score[lat], score], 1)
        best = union.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        keep = torch.zeros_like(union, dtype=torch.bool).scatter_(1, best, True)
        freed = (~keep[:, : self.k]).nonzero()       # (A, 2) old slots that lose ...
        taken = keep[:, self.k:].nonzero()           # (A, 2) ... to these candidates: row-major, so
        if not len(taken):                           # each latent's pairs line up
            return
        latents, slots = lat[freed[:, 0]], freed[:, 1]
        self.score[latents, slots] = score[taken[:, 0], taken[:, 1]]
        for name, value in fields(latents, rows[taken[:, 0], taken[:, 1]]).items():
            getattr(self, name)[latents, slots] = value


class Histograms:
    """Per-latent activation histograms over [0, hi) in `bins` bins. hi is a power of two above
    every value seen, so v * bins / hi is exact arithmetic: a value's bin never depends on when it
    arrived, and doubling hi merges bin pairs exactly."""

    def __init__(self, n: int, bins: int):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2 (merging halves them exactly), got {bins}")
        self.bins = bins
        self.counts = torch.zeros(n, bins, dtype=torch.int64)
        self.hi = torch.zeros(n)   # 0 until the latent first fires

    def add(self, lat: Tensor, values: Tensor, block_max: Tensor):
        """Count firing entries (latent ids, their positive values); block_max: (n,) per latent."""
        self._grow(block_max)
        b = (values * self.bins / self.hi[lat]).long()
        self.counts.view(-1).index_add_(0, lat * self.bins + b, torch.ones_like(b))

    def _grow(self, top: Tensor):
        over = ((top > 0) & (top >= self.hi)).nonzero().squeeze(1)
        if not len(over):
            return
        _, exponent = torch.frexp(top[over])        # top = m 2^e with m in [0.5, 1): 2^e > top
        new_hi = torch.ldexp(torch.ones(len(over)), exponent)
        fresh = self.hi[over] == 0
        self.hi[over[fresh]] = new_hi[fresh]
        over, new_hi = over[~fresh], new_hi[~fresh]
        doublings = torch.log2(new_hi / self.hi[over]).round().long()   # exact: both are powers of two
        for d in doublings.unique().tolist():
            self._merge(over[doublings == d], d)

    def _merge(self, lat: Tensor, d: int):
        """Widen the latents `lat` by 2^d: bins merge in groups of 2^d (all into bin 0 if wider)."""
        group = min(2 ** d, self.bins)
        merged = self.counts[lat].view(len(lat), self.bins // group, group).sum(-1)
        self.counts[lat] = torch.cat([merged, merged.new_zeros(len(lat), self.bins - merged.shape[1])], 1)
        self.hi[lat] *= 2.0 ** d

    def percentile(self, lat: int, value: float) -> float:
        """Share of the latent's firing rows below `value`, interpolating linearly within its bin."""
        counts, total = self.counts[lat], int(self.counts[lat].sum())
        if total == 0:
            return math.nan
        where = value * self.bins / float(self.hi[lat])
        b = min(int(where), self.bins - 1)
        return (int(counts[:b].sum()) + (where - b) * int(counts[b])) / total


class LatentStats:
    """Everything the dashboards need per latent, updated one block of rows at a time."""

    def __init__(self, n_latents: int, top_k: int = 16, samples: int = 16, context: int = 8, bins: int = 32,
                 seed: int = 0):
        for name, v, least in (("top_k", top_k, 1), ("samples", samples, 0), ("context", context, 0)):
            if not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
        n, width = n_latents, 2 * context + 1
        self.n, self.context = n, context
        self.offsets = torch.arange(-context, context + 1)
        self.top = Kept(n, top_k, width)
        self.samples = Kept(n, samples, width) if samples else None
        self.hist = Histograms(n, bins)
        self.count = torch.zeros(n, dtype=torch.int64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.max = torch.zeros(n)
        self.rows = 0
        self.gen = torch.Generator().manual_seed(seed)  # the reservoir's keys: the same data gives the same pages

    def state_bytes(self) -> int:
        """Bytes held between blocks (the memory bound of the module docstring)."""
        kept = [self.top] + ([self.samples] if self.samples else [])
        tensors = [t for k in kept for t in vars(k).values() if torch.is_tensor(t)]
        tensors += [self.hist.counts, self.hist.hi, self.count, self.sum, self.max]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def update(self, block: Block):
        """Fold one block in. Codes are sparse, so everything works on the firing entries (row,
        latent, value), never on rows x latents; and a latent's entries below what it already
        keeps are dropped before any sorting (after the first blocks, nearly all of them)."""
        codes = block.codes.float()
        if codes.dim() != 2 or codes.shape[1] != self.n:
            raise ValueError(f"block codes must be (rows, {self.n}), got {tuple(codes.shape)}")
        rows, lat = (codes > 0).nonzero(as_tuple=True)
        values = codes[rows, lat]
        block_max = torch.zeros(self.n).scatter_reduce_(0, lat, values, reduce="amax")
        self.count += torch.bincount(lat, minlength=self.n)
        self.sum.index_add_(0, lat, values.double())
        self.max = torch.maximum(self.max, block_max)
        self.hist.add(lat, values, block_max)
        self._offer(self.top, rows, lat, values, codes, block)
        if self.samples is not None:
            keys = torch.rand(len(values), generator=self.gen)
            self._offer(self.samples, rows, lat, keys, codes, block)
        self.rows += len(codes)

    def _offer(self, kept: Kept, rows: Tensor, lat: Tensor, score: Tensor, codes: Tensor, block: Block):
        """Offer firing entries (row, latent, score) to `kept`: per latent its best entries that
        beat what it keeps (at most k), merged in with their contexts."""
        beats = score > kept.floor()[lat]
        rows, lat, score = rows[beats], lat[beats], score[beats]
        if not len(score):
            return
        order = score.argsort(descending=True, stable=True)      # ties: earlier rows first
        order = order[lat[order].argsort(stable=True)]           # by latent, best first within each
        rows, lat, score = rows[order], lat[order], score[order]
        latents, counts = torch.unique_consecutive(lat, return_counts=True)
        rank = torch.arange(len(lat)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        width = min(kept.k, int(counts.max()))
        first = rank < width
        slot = torch.repeat_interleave(torch.arange(len(latents)), counts)[first]
        cand = torch.full((len(latents), width), -math.inf)
        idx = torch.zeros(len(latents), width, dtype=torch.long)  # empty candidates (-inf) are never taken
        cand[slot, rank[first]] = score[first]
        idx[slot, rank[first]] = rows[first]
        kept.merge(latents, cand, idx, lambda l, r: self._fields(l, r, codes, block))

    def _fields(self, lat: Tensor, rows: Tensor, codes: Tensor, block: Block) -> dict:
        """What Kept holds for entries (latent, block row): the activation, the row, and its context,
        the rows either side within its own sequence."""
        window = rows[:, None] + self.offsets                           # (A, W) rows around each
        same = (window >= 0) & (window < len(codes))
        window = window.clamp(0, len(codes) - 1)
        same &= block.seq_index[window] == block.seq_index[rows][:, None]
        return {"act": codes[rows, lat], "row": block.first_row + rows, "seq": block.seq_index[rows].long(),
                "tok": torch.where(same, block.token_ids[window].int(), -1),
                "pos": torch.where(same, block.position[window].int(), -1),
                "ctx": torch.where(same, codes[window, lat[:, None]], 0.0)}
