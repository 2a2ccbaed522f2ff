"""The sample benchmark (sae/eval/binding_sample.py) on a fixed-seed sample of the world generator at
tiny sizes, trained with `sae.train`'s defaults exactly as the benchmark trains them (the first bound
world and the control of `draw_worlds(0, 1, d_range=(16, 24))`, not picked): the binding SAE costs
nothing against the TopK SAE of the same budget, the control stays negative, and where no map is
found the metrics say so and the result is the standard SAE. Recovery on the bound world is the
issue-13 target the defaults do not meet yet (RESULTS.md §1): it is asserted as an expected failure,
so that it shows up (XPASS) the day it holds."""
import pytest

from sae.eval.binding_sample import run_one, world_info, world_summary
from sae.eval.world_sample import draw_worlds

DRAWS = draw_worlds(0, 1, controls=("independent",), d_range=(16, 24))[0]
TRAIN = dict(steps=400, n_train=8192, batch_size=256, lr=4e-3)


@pytest.fixture(scope="module")
def runs():
    return {d.name: (world_info(d), run_one(d, 0, **TRAIN)) for d in DRAWS}


def test_the_sample_is_what_the_generator_draws(runs):
    assert list(runs) == ["w00", "c-independent"]
    info, _ = runs["w00"]
    assert info["identifiable"] and info["multiple"] >= 1.25 and info["n_latents"] > info["n_atoms"]
    assert not runs["c-independent"][0]["identifiable"]


@pytest.mark.parametrize("name", ["w00", "c-independent"])
def test_binding_costs_nothing_against_topk_of_the_same_budget(runs, name):
    info, run = runs[name]
    s = world_summary(info, [run])
    assert s["fvu_ok"] and s["recall_ok"], (s["standard_fvu"], s["binding_fvu"], s["standard_recall"],
                                            s["binding_recall"])


def test_the_control_stays_negative_and_says_so(runs):
    _, run = runs["c-independent"]
    b = run["binding"]
    assert b["rebind_fallback"] == 1 and b["architecture"] == "topk"   # the standard SAE, returned as such
    assert "dict_mmcs" not in b


@pytest.mark.xfail(reason="issue 13: the defaults do not yet recover binding on most sampled worlds "
                          "(RESULTS.md §1)", strict=False)
def test_defaults_recover_the_bound_world(runs):
    info, run = runs["w00"]
    assert world_summary(info, [run])["recovered"]
