"""The synthetic binding worlds (eval/worlds.py) and the binding metrics (eval/binding_metrics.py)."""
import math

import pytest
import torch

from sae.core.metrics import fvu
from sae.eval import binding_metrics as bm
from sae.eval.worlds import WorldConfig, make_world

SMALL = dict(d=16, families=(6, 6, 6))


def world(**kw):
    return make_world(WorldConfig(**{**SMALL, **kw}))


# -- the generator ----------------------------------------------------------------------------------
def test_deterministic_and_seeded():
    a, b, c = world(seed=3), world(seed=3), world(seed=4)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.transforms, b.transforms)
    assert torch.equal(a.sample(64, seed=1).x, b.sample(64, seed=1).x)
    assert not torch.equal(a.sample(64, seed=1).x, a.sample(64, seed=2).x)
    assert not torch.allclose(a.atoms, c.atoms)


def test_shapes_and_superposition():
    w = world(n_slots=3)
    assert w.atoms.shape == (18, 16) and w.slot_atoms.shape == (3, 18, 16)
    assert w.transforms.shape == (3, 16, 16)
    assert w.cfg.superposition == pytest.approx(18 / 16)
    assert torch.allclose(w.atoms.norm(dim=1), torch.ones(18), atol=1e-5)
    assert torch.equal(w.transforms[0], torch.eye(16))
    assert torch.equal(w.family, torch.tensor([0] * 6 + [1] * 6 + [2] * 6))


def test_render_matches_coefficients_without_noise():
    w = world(noise=0.0)
    s = w.sample(32)
    expected = torch.einsum("bsn,snd->bd", s.coefs, w.slot_atoms)
    assert torch.allclose(s.x, expected, atol=1e-5)


def test_one_attribute_per_family_per_occupied_slot():
    w = world(occupancy=1.0, family_prob=1.0)
    c = w.sample(256, split="all").coefs > 0
    per_family = torch.stack([c[:, :, w.family == f].sum(-1) for f in range(3)], -1)
    assert (per_family == 1).all()


@pytest.mark.parametrize("kind", ["orthogonal", "rotation", "gaussian"])
def test_kinds_of_M(kind):
    w = world(m_kind=kind, theta=0.2, d=16)
    M = w.transforms[1]
    gram = M.T @ M
    if kind == "gaussian":
        assert not torch.allclose(gram, torch.eye(16), atol=0.1)
    else:
        assert torch.allclose(gram, torch.eye(16), atol=1e-4)
    if kind == "rotation":   # every vector turns by exactly θ
        v = torch.randn(50, 16)
        cos = torch.nn.functional.cosine_similarity(v @ M.T, v, dim=1)
        assert torch.allclose(cos, torch.full((50,), math.cos(0.2)), atol=1e-4)


def test_occupancy_and_family_prob():
    w = world(occupancy=0.5, family_prob=0.5, n_slots=2)
    c = w.sample(8000).coefs > 0
    occupied = c.any(-1).float()
    assert (occupied.sum(1) >= 1).all()                       # never an empty scene
    # P(occupied) = 0.5 raised by the ≥1 rule: 0.5 + 0.25·0.5 = 0.625
    assert occupied.mean().item() == pytest.approx(0.625, abs=0.03)
    per_object = c.float().sum(-1)[occupied.bool()]
    assert (per_object >= 1).all()                            # an object carries ≥1 attribute
    # 3 families at 0.5 each, plus one family for the 1/8 of objects that drew none
    assert per_object.mean().item() == pytest.approx(1.5 + 0.125, abs=0.05)


def test_held_out_pairs_never_in_training_always_in_held_out_split():
    w = world(held_out_frac=0.34, held_out_pairs=((0, 1),))
    assert w.held_out[0].sum() == 0                        # slot 1 never loses an attribute
    assert w.held_out[1].sum() == 3 * 2 + (0 if w.held_out[1, 0] else 1) or w.held_out[1, 0]
    assert w.held_out[1, 0]
    train = w.sample(4000).coefs > 0
    assert not (train & w.held_out).any()
    test = w.sample(500, seed=5, split="held_out").coefs > 0
    assert (test & w.held_out).any(-1).any(-1).all()
    # the rest of a held-out sample is still a well-formed scene: one value per family per slot
    per_family = torch.stack([test[:, :, w.family == f].sum(-1) for f in range(3)], -1)
    assert (per_family <= 1).all()


def test_noise_knob():
    a, b = world(noise=0.0), world(noise=0.5)
    ca = a.sample(2000, seed=1)
    eps = b.render(ca.coefs, torch.Generator().manual_seed(0)) - a.render(ca.coefs, noise=torch.zeros(2000, 16))
    assert eps.norm(dim=1).mean().item() == pytest.approx(0.5, rel=0.1)


def test_swap_pairs_exchange_one_family_between_slots():
    w = world(noise=0.0)
    a, b = w.swap_pairs(200)
    assert torch.allclose(a.coefs.sum(1), b.coefs.sum(1))     # same bag of attributes...
    assert ((a.coefs > 0) != (b.coefs > 0)).any(-1).any(-1).all()   # ...bound differently
    assert not torch.allclose(a.x, b.x, atol=1e-3)
    bag = world(noise=0.0, control="bag")
    a, b = bag.swap_pairs(200)
    assert torch.allclose(a.x, b.x, atol=1e-5)                # a bag cannot tell them apart


# -- the controls -----------------------------------------------------------------------------------
def test_bag_control_has_identity_maps():
    w = world(control="bag")
    assert torch.equal(w.transforms, torch.eye(16).expand(2, 16, 16))
    assert torch.equal(w.slot_atoms[0], w.slot_atoms[1])


def test_independent_control_has_no_shared_map():
    w = world(control="independent", d=8, families=(8, 8))   # 16 atoms in 8 dims: overdetermined
    assert w.transforms is None
    A, B = w.slot_atoms[0], w.slot_atoms[1]
    M = torch.linalg.lstsq(A, B).solution                      # best linear map, rows A M ≈ B
    assert ((A @ M - B).norm() / B.norm()).item() > 0.5
    bound = world(d=8, families=(8, 8))
    A, B = bound.slot_atoms[0], bound.slot_atoms[1]
    M = torch.linalg.lstsq(A, B).solution
    assert ((A @ M - B).norm() / B.norm()).item() < 1e-4


def test_slot_id_control_adds_one_vector_per_occupied_slot():
    w = world(control="slot_id", noise=0.0, slot_id_norm=2.0)
    s = w.sample(64)
    occupied = (s.coefs > 0).any(-1).float()
    assert torch.allclose(w.slot_vectors.norm(dim=1), torch.full((2,), 2.0))
    expected = torch.einsum("bsn,nd->bd", s.coefs, w.atoms) + occupied @ w.slot_vectors
    assert torch.allclose(s.x, expected, atol=1e-5)


def test_magnitude_control_scales_slots():
    w = world(control="magnitude", magnitude_ratio=0.5, n_slots=3)
    for s in range(3):
        assert torch.allclose(w.slot_atoms[s], 0.5**s * w.atoms)


def test_unknown_knobs_raise():
    with pytest.raises(ValueError):
        world(control="nope")
    with pytest.raises(ValueError):
        world(m_kind="nope")


# -- the metrics ------------------------------------------------------------------------------------
def test_mmcs_invariances():
    w = world()
    D = w.atoms
    perm = torch.randperm(18)
    scaled = D[perm] * torch.rand(18, 1).add(0.5) * torch.where(torch.rand(18, 1) < 0.5, -1.0, 1.0)
    assert bm.mmcs(scaled, D) == pytest.approx(1.0, abs=1e-5)
    assert bm.mmcs(torch.randn(18, 16), D) < 0.6
    # the learned D may be any slot's copy: (D, M) ≅ (M_2 D, M M_2⁻¹)
    score, slot = bm.dictionary_mmcs(w.slot_atoms[1][perm], w.slot_atoms)
    assert score == pytest.approx(1.0, abs=1e-5) and slot == 1
    assert bm.effective_mmcs(w.slot_atoms.reshape(-1, 16).flip(0), w.slot_atoms) == pytest.approx(1.0, abs=1e-5)


def test_transfer_judges_held_out_atoms():
    w = world(held_out_frac=0.34)
    M = w.transforms
    assert bm.transfer(w.atoms, M, w.slot_atoms, w.held_out).min() > 0.999
    # relabelled slots (learned slot 1 = true slot 2) transfer just as well
    relabelled = torch.stack([torch.eye(16), M[1].inverse()])
    assert bm.transfer(w.slot_atoms[1], relabelled, w.slot_atoms, w.held_out).min() > 0.999
    assert bm.transfer(w.atoms, torch.eye(16).expand(2, 16, 16), w.slot_atoms, w.held_out).abs().mean() < 0.5
    assert bm.map_nontriviality(w.atoms, torch.eye(16).expand(2, 16, 16)) == pytest.approx(0, abs=1e-6)
    assert bm.map_nontriviality(w.atoms, M) > 0.5


def _oracle_codes(coefs):
    """A perfect standard SAE whose latents are the effective atoms in (slot, atom) order."""
    return coefs.reshape(coefs.shape[0], -1)


def test_binding_accuracy_and_swap_on_oracle_and_bag_codes():
    w = world(noise=0.0)
    latent, cos = bm.match_latents(w.slot_atoms.reshape(-1, 16), w.slot_atoms)
    assert torch.equal(latent.reshape(-1), torch.arange(36)) and cos.min() > 0.999
    s = w.sample(500)
    acc = bm.binding_accuracy(_oracle_codes(s.coefs), s.coefs, latent)
    assert acc.detection == 1.0 and acc.slot == 1.0 and acc.exact == 1.0
    a, b = w.swap_pairs(300)
    assert bm.swap_discrimination(_oracle_codes(a.coefs), _oracle_codes(b.coefs), a.coefs, b.coefs, latent) == 1.0
    # a bag of concepts: one latent per atom, whatever the slot
    bag_codes = lambda c: torch.cat([c.sum(1), torch.zeros_like(c.sum(1))], 1)  # noqa: E731
    bag_latent = torch.arange(18).expand(2, 18)
    assert bm.swap_discrimination(bag_codes(a.coefs), bag_codes(b.coefs), a.coefs, b.coefs, bag_latent) == 0.5
    bag_acc = bm.binding_accuracy(bag_codes(s.coefs), s.coefs, bag_latent)
    assert bag_acc.detection == 1.0 and bag_acc.exact < 0.1


def test_binding_latents_follow_the_binding_layout():
    w = world()
    perm = torch.randperm(18)
    lat = bm.binding_latents(w.atoms[perm], w.transforms, w.slot_atoms)
    inv = torch.argsort(perm)
    assert torch.equal(lat[0], inv) and torch.equal(lat[1], 18 + inv)


def test_reconstruction_metrics():
    x = torch.randn(100, 8)
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    codes = torch.zeros(10, 5)
    codes[:, 0] = 1.0
    codes[::2, 1] = 2.0
    assert bm.l0(codes) == pytest.approx(1.5)
    assert bm.dead_fraction(codes) == pytest.approx(3 / 5)


# -- realism knobs (all off by default: the named worlds draw what they always drew) -----------------
def test_realism_knobs_off_leave_worlds_unchanged():
    a = world(seed=5)
    b = make_world(WorldConfig(**SMALL, seed=5, zipf=0.0, magnitude_spread=0.0, n_unbound=0))
    assert torch.equal(a.sample(64, seed=1).x, b.sample(64, seed=1).x)
    assert a.atom_weight is None and a.atom_scale is None and a.unbound_atoms is None


def test_zipf_skews_atom_frequencies_within_families():
    w = world(zipf=1.2, families=(20,), d=16)
    c = (w.sample(20000, split="all").coefs > 0).float().mean((0, 1))
    top, bottom = c.max().item(), c.min().item()
    assert top / bottom > 20          # rank 1 vs rank 20: 20^1.2 ≈ 36
    assert torch.equal(c.argmax(), w.atom_weight.argmax())
    assert (world(families=(20,), d=16).sample(20000, split="all").coefs > 0).float().mean((0, 1)).std() < 0.01


def test_magnitude_spread_scales_each_atom():
    w = world(magnitude_spread=0.5, coef_noise=0.0)
    c = w.sample(4000, split="all").coefs
    for a in range(3):
        vals = c[..., a][c[..., a] > 0]
        assert torch.allclose(vals, torch.full_like(vals, w.atom_scale[a].item()), atol=1e-5)
    assert w.atom_scale.std() > 0.2


def test_optional_families_have_their_own_probability():
    w = world(family_probs=(1.0, 0.3, 0.6), occupancy=1.0)
    c = w.sample(8000).coefs > 0
    present = torch.stack([c[:, :, w.family == f].any(-1).float().mean() for f in range(3)])
    assert present[0] == 1.0
    assert abs(present[1].item() - 0.3) < 0.05 and abs(present[2].item() - 0.6) < 0.05
    with pytest.raises(ValueError):
        world(family_probs=(0.5,))


def test_unbound_features_carry_the_asked_share_and_no_slot():
    w = world(n_unbound=6, unbound_share=0.15, noise=0.0)
    shares = w.variance_shares()
    assert shares["unbound"] == pytest.approx(0.15, abs=0.03)
    s = w.sample(256, split="all")
    assert s.unbound.shape == (256, 6) and (s.unbound > 0).any()
    expected = torch.einsum("bsn,snd->bd", s.coefs, w.slot_atoms) + s.unbound @ w.unbound_atoms
    assert torch.allclose(s.x, expected, atol=1e-5)
    # swapped scenes keep the same unbound features
    a, b = w.swap_pairs(64)
    assert torch.equal(a.unbound, b.unbound)
    assert w.mean_l0() > world(noise=0.0).mean_l0()


def test_interference_and_identifiability():
    w = world(d=16, families=(12, 12))
    i = w.interference()
    assert i["n_effective"] == 48 and 0 < i["mean_abs_cos"] < i["max_abs_cos"] < 1
    assert i["jl_scale"] == pytest.approx(math.sqrt(2 * math.log(48) / 16))
    assert w.identifiable()                                   # 24 atoms, 21 seen in slot 2 > d = 16
    assert not world(d=16, families=(8, 8)).identifiable()    # 14 seen in slot 2 < 16: M_2 not pinned
    assert not world(control="bag").identifiable() and not world(control="independent").identifiable()
    assert world(control="bag").interference()["max_abs_cos"] < 1   # repeated directions are one atom
