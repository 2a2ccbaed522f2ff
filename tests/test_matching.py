"""Block matching (sae/recipes/matching.py): pairs and map between two blocks of rows related by one
orthogonal map, at the small widths of the bench and at widths the old matcher could not reach; and
the same search through the echo detector's framing (one dictionary, rows in either role)."""
import torch

from sae.eval.echo import find_echoes
from sae.eval.worlds import random_orthogonal
from sae.recipes.matching import (MatchConfig, OneDictionary, TwoBlocks, chance_cos, fit_map, largest_agreeing_set,
                                   match_blocks, match_within)


def unit(v):
    return v / v.norm(dim=1, keepdim=True)


def planted(n, d, seed, noise=0.1, missing=0, extra=0):
    """A = n random atoms; B = their images under a random orthogonal M, shuffled and noised, with
    `missing` images left out and `extra` unrelated rows added. Returns A, B, M, truth (B row -> A
    row, -1 for extras)."""
    g = torch.Generator().manual_seed(seed)
    A = unit(torch.randn(n, d, generator=g))
    M = random_orthogonal(d, g)
    images = (A @ M.T)[missing:]
    rows = torch.cat([images, unit(torch.randn(extra, d, generator=g))])
    rows = unit(rows + noise * torch.randn(rows.shape, generator=g) / d**0.5)
    source = torch.cat([torch.arange(missing, n), torch.full((extra,), -1)])
    perm = torch.randperm(len(rows), generator=g)
    return A, rows[perm], M, source[perm]


def check(res, truth, M, n_true, d):
    right = truth[res.pairs[:, 1]] == res.pairs[:, 0]
    assert len(res.pairs) >= 0.9 * n_true, (len(res.pairs), n_true)
    assert right.all(), f"{int((~right).sum())} wrong pairs"
    assert (res.transform - M).norm() / M.norm() < 0.2
    assert res.pinned == (len(res.pairs) > d)


def test_fit_map_recovers_orthogonal_and_linear_maps():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 12, generator=g)
    M = random_orthogonal(12, g)
    assert torch.allclose(fit_map(A, A @ M.T, "orthogonal"), M, atol=1e-4)
    L = torch.randn(12, 12, generator=g)
    assert torch.allclose(fit_map(A, A @ L.T, "linear"), L, atol=1e-3)


def test_matches_a_small_block():
    # 18 atoms in d = 12 (superposed, so M is pinned down): the size of the recipe's unit tests
    A, B, M, truth = planted(18, 12, seed=3)
    check(match_blocks(A, B), truth, M, 18, 12)


def test_matches_wide_blocks_with_missing_and_extra_rows():
    # 300 atoms in d = 200, 30 images missing and 20 unrelated rows: the old graduated-assignment
    # matcher saw at most 128 rows and could not validate a map at this width at all
    A, B, M, truth = planted(300, 200, seed=4, missing=30, extra=20)
    res = match_blocks(A, B)
    check(res, truth, M, 270, 200)
    assert res.pinned


def test_finds_nothing_between_unrelated_blocks():
    g = torch.Generator().manual_seed(5)
    for n, d in ((18, 12), (48, 32), (300, 200)):
        A, B = unit(torch.randn(n, d, generator=g)), unit(torch.randn(n, d, generator=g))
        assert len(match_blocks(A, B).pairs) == 0, (n, d)


def test_under_complete_pairs_need_allow_unpinned():
    # fewer atoms than 2d/3 cannot be cross-validated: reported only on request (in-sample fit)
    A, B, M, truth = planted(16, 32, seed=6, noise=0.05)
    assert len(match_blocks(A, B).pairs) == 0
    res = match_blocks(A, B, MatchConfig(allow_unpinned=True))
    assert len(res.pairs) >= 14 and (truth[res.pairs[:, 1]] == res.pairs[:, 0]).all()


def test_one_dictionary_adds_the_cross_role_clash():
    # i→j and j→k cannot both hold in one dictionary (a row is a source or a target), but between
    # two blocks a row of A and a row of B with the same index are different rows
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    U = unit(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    assert not TwoBlocks(U, U).clash(src, tgt)[0, 1]
    assert OneDictionary(U).clash(src, tgt)[0, 1] and not OneDictionary(U).clash(src, tgt)[0, 2]


def test_both_framings_find_the_same_pairs():
    # the two blocks stacked into one dictionary: with nothing else in it, the echo detector must
    # find exactly the pairs that block matching finds (possibly as M⁻¹, target → source)
    A, B, M, truth = planted(18, 12, seed=3)
    blocks = match_blocks(A, B)
    echoes = find_echoes(torch.cat([A, B]))
    expected = {(a, len(A) + b) for a, b in blocks.pairs.tolist()}
    found = {tuple(p) for p in echoes.pairs.tolist()}
    assert len(expected) >= 0.9 * 18
    assert found in (expected, {(j, i) for i, j in expected})
    T = echoes.transform if found == expected else echoes.transform.T
    assert torch.allclose(T, blocks.transform, atol=1e-4)   # one Procrustes fit on the same pairs


def test_chance_null_is_not_the_data_seeds_stream():
    # rows drawn from a generator seeded 0, as a synthetic world with seed 0 draws its atoms, and a
    # null drawn for training seed 0: the null's directions must not be those same rows (it was ~1)
    U = unit(torch.randn(100, 64, generator=torch.Generator().manual_seed(0)))
    assert chance_cos(U, torch.Generator().manual_seed(0), 0.0) < 0.6


def test_blocks_with_fewer_pairs_than_d_keep_the_right_pairs():
    # 30 atoms in d = 40: enough to cross-validate (> 2d/3) but most held-out sources lie partly
    # outside the other sources' span, so leave-one-out alone drops right pairs; the Gram evidence
    # keeps them (a map between two of four slots has about this many pairs)
    A, B, M, truth = planted(30, 40, seed=7, extra=10)
    res = match_blocks(A, B)
    right = truth[res.pairs[:, 1]] == res.pairs[:, 0]
    assert right.all() and len(res.pairs) >= 27, (int(right.sum()), len(res.pairs))
    held_out_only = match_blocks(A, B, min_evidence=float("inf"))
    assert len(held_out_only.pairs) < len(res.pairs)


def test_clique_step_finds_a_planted_clique_and_never_an_excluded_candidate():
    # the replicator dynamics (largest_agreeing_set) on a random agreement graph with a planted
    # clique, started from support that favours the clique: it must return the clique, and a
    # candidate excluded by its support (-1e9) must stay out even where it agrees with everyone
    g = torch.Generator().manual_seed(0)
    r, clique = 40, torch.arange(12)
    agree = torch.rand(r, r, generator=g) < 0.3
    agree = agree | agree.T
    agree[clique[:, None], clique[None, :]] = True
    agree[39, :] = agree[:, 39] = True
    agree.fill_diagonal_(False)
    support = torch.rand(r, generator=g)
    support[clique] += 1.0
    support[39] = -1e9
    member = largest_agreeing_set(agree[None], support[None])[0]
    assert member.nonzero().squeeze(1).tolist() == clique.tolist()


def test_seeds_whose_rows_never_fire_together_come_first():
    # 32 atoms in d = 16 and their images, among 12 pairs of near-duplicate rows whose large Gram
    # entries fill a budget of 8 seeds with chance seeds. Atoms come in families of 4 that never fire
    # together (one value per attribute per slot); told so, the search tries their seeds first and
    # finds the map where the plain order does not on most of these draws
    n, d = 32, 16
    found = {}
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        A = unit(torch.randn(n, d, generator=g))
        B = unit(A @ random_orthogonal(d, g).T + 0.1 * torch.randn(n, d, generator=g) / d**0.5)
        base = unit(torch.randn(12, d, generator=g))
        dup = unit(torch.cat([base, base]) + 0.3 * torch.randn(24, d, generator=g) / d**0.5)
        U = torch.cat([A, B, dup])
        family = torch.cat([torch.arange(n) // 4, torch.arange(n) // 4 + 100, torch.arange(24) + 200])
        exclusive = (family[:, None] == family[None, :]) & ~torch.eye(len(U), dtype=torch.bool)
        cfg = MatchConfig(n_seeds=8, seed_batch=8, min_cos=0.85)
        for told in (False, True):
            pairs = match_within(U, cfg, min_pairs=d, enough=d, exclusive=exclusive if told else None).pairs
            right = {(a, a + n) for a in range(n)} | {(a + n, a) for a in range(n)}
            found[seed, told] = len(pairs) >= 0.9 * n and all(tuple(p) in right for p in pairs.tolist())
    assert all(found[seed, True] for seed in range(4))
    assert sum(found[seed, False] for seed in range(4)) <= 2
