"""sae/eval/search_diagnostic.py: where the search's first true seed sits, on exact atoms."""
import torch

from sae.eval.search_diagnostic import search_config, true_seed_rank
from sae.eval.worlds import WorldConfig, make_world


def test_exact_atoms_put_a_true_seed_within_the_budget_and_relabelled_ones_do_not():
    world = make_world(WorldConfig(d=24, families=(12, 12, 12), seed=0))
    V = world.slot_atoms.reshape(-1, 24)
    V = V / V.norm(dim=1, keepdim=True)
    slot = torch.arange(2).repeat_interleave(36)
    atom = torch.arange(36).repeat(2)
    budget = search_config(len(V), 0).n_seeds
    rank = true_seed_rank(V, slot, atom, budget)
    assert rank is not None and rank < budget
    # the same vectors with slot 2's atom labels shuffled: no seed is "true" by chance near the top
    shuffled = torch.cat([atom[:36], atom[36:][torch.randperm(36, generator=torch.Generator().manual_seed(0))]])
    other = true_seed_rank(V, slot, shuffled, budget)
    assert other is None or other > 10 * rank + 100
