"""The world sampler (eval/world_sample.py): deterministic, every knob inside its stated range, the
cost cap respected, one world per control, and bins for the per-knob summary."""
import pytest

from sae.eval.world_sample import CONTROLS, MAX_COST, bins, draw_worlds
from sae.eval.worlds import make_world


@pytest.fixture(scope="module")
def sample():
    return draw_worlds(7, 10)


def test_deterministic(sample):
    again, redrawn = draw_worlds(7, 10)
    assert [d.cfg for d in again] == [d.cfg for d in sample[0]] and redrawn == sample[1]
    assert [d.cfg for d in draw_worlds(8, 10)[0]] != [d.cfg for d in sample[0]]


def test_knobs_in_range(sample):
    draws, _ = sample
    bound = [d for d in draws if d.cfg.control == "none"]
    assert len(bound) == 10 and [d.cfg.control for d in draws[10:]] == list(CONTROLS)
    for d in draws:
        c = d.cfg
        assert 32 <= c.d <= 256 and 1.05 <= c.superposition <= 3.1 and c.n_slots in (2, 3, 4)
        assert 2 <= len(c.families) <= 4 and min(c.families) >= 3 and sum(c.families) == c.n_atoms
        assert 0 <= c.zipf <= 1.2 and 0 <= c.magnitude_spread <= 0.6 and 0.5 <= c.occupancy <= 0.95
        assert 0 <= c.unbound_share <= 0.2 and (c.n_unbound == 0) == (c.unbound_share == 0)
        assert all(0.3 <= p <= 1 for p in c.family_probs)
        assert 1.25 <= d.multiple <= 4 and d.n_latents > c.n_atoms      # never the true count
        assert c.n_slots * d.n_latents * c.d <= MAX_COST
        assert d.k >= 1 and set(bins(d)) >= {"d", "superposition", "slots", "M", "unbound_share", "multiple"}
    assert {d.cfg.m_kind for d in bound} == {"orthogonal", "gaussian"}


def test_controls_are_not_identifiable_and_bound_worlds_report_interference(sample):
    draws, _ = sample
    for d in draws[10:]:
        assert not make_world(d.cfg).identifiable()
    w = make_world(draws[0].cfg)
    i = w.interference()
    assert i["n_effective"] == draws[0].cfg.n_slots * draws[0].cfg.n_atoms and i["jl_scale"] > i["mean_abs_cos"]
