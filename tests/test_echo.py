"""The echo-feature detector (eval/echo.py) on constructed dictionaries with and without echoes."""
from dataclasses import replace

import pytest
import torch

import sae
from sae.eval.binding_bench import WORLDS
from sae.eval.echo import EchoConfig, find_echoes
from sae.eval.worlds import WorldConfig, make_world, random_orthogonal

D_IN, N = 12, 18          # 18 atoms in 12 dimensions: superposed, so M is pinned down


def unit(v):
    return v / v.norm(dim=1, keepdim=True)


def planted(seed=0, noise=0.05, distractors=6, n=N, d=D_IN):
    """Shuffled rows of [D; M D] + row noise + random distractor rows. Returns W, M, true pairs."""
    g = torch.Generator().manual_seed(seed)
    D = unit(torch.randn(n, d, generator=g))
    M = random_orthogonal(d, g)
    rows = torch.cat([D, D @ M.T, unit(torch.randn(distractors, d, generator=g))])
    rows = unit(rows + noise * torch.randn(rows.shape, generator=g) / d**0.5)
    perm = torch.randperm(len(rows), generator=g)
    pos = torch.argsort(perm)                         # where original row r ended up
    pairs = {(int(pos[a]), int(pos[n + a])) for a in range(n)}
    return rows[perm], M, pairs


def hits(res, truth):
    """true pairs found, either direction (M or M⁻¹ is a slot relabelling), and pairs found."""
    found = {tuple(p) for p in res.pairs.tolist()}
    reversed_ = {(j, i) for i, j in found}
    return max(len(found & truth), len(reversed_ & truth)), len(found)


def test_finds_a_planted_shared_map():
    W, M, truth = planted()
    res = find_echoes(W)
    right, found = hits(res, truth)
    assert right >= 0.9 * N and found - right <= 1
    err = min((res.transform - M).norm(), (res.transform - M.T).norm()) / M.norm()
    assert err < 0.2
    assert res.share > 0.8 * 2 * N / len(W)


def test_analyses_dictionaries_up_to_max_rows_whole():
    """150 rows (like the 192-row `over` bench SAEs, above the old 128-row cap): subsampling would
    keep a pair only if both its rows survive (~(128/150)² of them), so all must be analysed."""
    W, M, truth = planted(n=70, d=16, distractors=10)
    assert len(W) <= EchoConfig().max_rows
    right, found = hits(find_echoes(W), truth)
    assert right >= 0.9 * 70 and found - right <= 1


def test_large_dictionaries_are_searched_with_a_bounded_seed_budget():
    # 440 rows in d = 64: above 192 rows the seeds are capped (seed_work / m²), and the first
    # seeds must still find the map
    W, M, truth = planted(n=200, d=64, distractors=40, seed=1)
    cfg = EchoConfig()
    assert cfg.seed_work / len(W) ** 2 < cfg.n_seeds
    right, found = hits(find_echoes(W, cfg), truth)
    assert right >= 0.9 * 200 and found - right <= 1


def test_reports_nothing_without_a_shared_map():
    g = torch.Generator().manual_seed(1)
    random_dict = unit(torch.randn(2 * N + 6, D_IN, generator=g))
    assert find_echoes(random_dict).share < 0.1
    # two independent dictionaries side by side: pairs exist, one map does not
    independent = unit(torch.randn(2 * N, D_IN, generator=g))
    assert find_echoes(independent).share < 0.1


def test_duplicates_are_not_echoes():
    g = torch.Generator().manual_seed(2)
    D = unit(torch.randn(N, D_IN, generator=g))
    dup = unit(torch.cat([D, D + 0.02 * torch.randn(D.shape, generator=g)]))
    assert len(find_echoes(dup).pairs) == 0          # M = I explains them: not binding


def _trained_standard_sae(name: str, seed: int = 0):
    """A TopK SAE trained on a synthetic world exactly as binding_bench.run_one trains "standard"."""
    overrides, k = WORLDS[name]
    world = make_world(replace(WorldConfig(seed=seed), **overrides))
    x = world.sample(65536, seed=seed).x
    torch.manual_seed(seed)
    model = sae.TopKSAE(world.cfg.d, world.n_slots * world.n_atoms, k=k, dead_tokens=200 * 512)
    sae.train(model, x, steps=3000, batch_size=512, lr=2e-3, seed=seed, eval_tokens=2048)
    with torch.no_grad():
        live = (model.encode(world.sample(4096, seed=10_000 + seed).x) != 0).any(0)
    return model.W_dec.detach(), live, world


@pytest.mark.slow
def test_finds_echoes_in_a_trained_topk_sae_and_none_in_the_bag_control():
    W, live, world = _trained_standard_sae("ref")
    res = find_echoes(W, live=live)
    S, n, d = world.slot_atoms.shape
    atoms = unit(world.slot_atoms.reshape(S * n, d))
    best = (unit(W) @ atoms.T).abs().max(1).indices      # the (slot, atom) each row learned
    slot, atom = best // n, best % n
    i, j = res.pairs[:, 0], res.pairs[:, 1]
    correct = ((slot[i] != slot[j]) & (atom[i] == atom[j])).float()
    M = world.transforms[1]
    err = min((res.transform - M).norm(), (res.transform - M.T).norm()) / M.norm()
    assert len(res.pairs) >= 30 and correct.mean() >= 0.95
    assert err < 0.3

    W, live, _ = _trained_standard_sae("bag")               # M_s = I: echoes would be duplicates
    assert len(find_echoes(W, live=live).pairs) == 0
