"""Matryoshka SAE: nested prefixes that each reconstruct on their own."""
import pytest
import torch

import sae
from sae.core.architectures.base import Code
from test_trainer import sparse_data


def prefix_fvu(model, x, prefix):
    """FVU of the reconstruction from the first `prefix` latents alone (any SAE)."""
    model.eval()
    with torch.no_grad():
        x_hat = model.encode(x)[:, :prefix] @ model.W_dec[:prefix] + model.b_dec
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_loss_is_the_sum_of_every_prefix_reconstruction(sparsity):
    torch.manual_seed(0)
    model = sae.MatryoshkaSAE(8, 32, group_sizes=[4, 12, 16], sparsity=sparsity, k=3, aux_coeff=0.0)
    x = torch.randn(16, 8)
    out = model(x)
    dense = out.codes
    expected = sum(((dense[:, :p] @ model.W_dec[:p] + model.b_dec) - x).pow(2).sum(-1).mean() for p in (4, 16))
    torch.testing.assert_close(out.losses["prefix_mse"], expected)
    torch.testing.assert_close(out.losses["mse"], (out.x_hat - x).pow(2).sum(-1).mean())
    sparse = Code(*dense.topk(3), model.n_total) if sparsity == "topk" else None
    if sparse is not None:  # the sparse path masks by index exactly like the dense one
        torch.testing.assert_close(model.decode_prefix(sparse, 4), dense[:, :4] @ model.W_dec[:4] + model.b_dec)


def test_each_prefix_reconstructs_on_its_own():
    data = sparse_data(n=4096, d=16, atoms=48)
    groups = [8, 24, 32]
    results = {}
    for name, model in [("matryoshka", sae.MatryoshkaSAE(16, 64, group_sizes=groups, sparsity="topk", k=4)),
                        ("topk", sae.TopKSAE(16, 64, k=4))]:
        torch.manual_seed(0)
        sae.train(model, data, steps=400, batch_size=256, lr=3e-3)
        results[name] = [prefix_fvu(model, data[:1024], p) for p in (8, 32, 64)]
    nested, plain = results["matryoshka"], results["topk"]
    assert nested[0] > nested[1] > nested[2]  # more of the dictionary, better reconstruction
    # Measured (seed 0): prefixes 8/32/64 give FVU 0.59/0.28/0.22; a plain TopK SAE's 0.90/0.55/0.20.
    assert nested[0] < plain[0] - 0.15 and nested[1] < plain[1] - 0.15  # prefixes work alone ...
    assert nested[2] < plain[2] + 0.05  # ... at a small cost to the full reconstruction


def test_round_trip_and_bad_groups(tmp_path):
    model = sae.MatryoshkaSAE(8, 32, group_sizes=[8, 24], k=3).eval()
    model.save(tmp_path / "d")
    loaded = sae.load(tmp_path / "d")
    assert type(loaded) is type(model) and loaded.cfg.group_sizes == [8, 24]
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat)
    assert sae.MatryoshkaSAE(8, 64, k=2).cfg.group_sizes == [4, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="group_sizes must be positive integers summing to n_latents=32"):
        sae.MatryoshkaSAE(8, 32, group_sizes=[8, 8], k=2)
    with pytest.raises(ValueError, match="sparsity must be one of topk, batchtopk"):
        sae.MatryoshkaSAE(8, 32, sparsity="relu")
    with pytest.raises(ValueError, match="sparsity must be one of topk, batchtopk"):
        sae.MatryoshkaSAE(8, 32, sparsity=sae.ReLU())
    assert sae.MatryoshkaSAE(8, 32, sparsity=sae.TopK(k=3)).cfg.sparsity == "topk"


def binding_prefix_fvu(model, x, prefix):
    """FVU from atoms 0..prefix-1 alone, in every slot of a binding SAE."""
    model.eval()
    with torch.no_grad():
        codes = model.slot_codes(model.encode(x)).clone()
        codes[:, :, prefix:] = 0
        x_hat = model.decode(codes.reshape(len(x), -1))
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def test_binding_slots_can_be_matryoshka():
    torch.manual_seed(0)
    model = sae.BindingSAE(8, 16, n_slots=2, k=3, slot_group_sizes=[4, 12], aux_coeff=0.0,
                           transform_init="random_orthogonal")
    x = torch.randn(16, 8)
    out = model(x)
    codes = model.slot_codes(out.codes)
    masked = codes.clone()
    masked[:, :, 4:] = 0
    expected = (model.decode(masked.reshape(16, -1)) - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["prefix_mse"], expected)
    # the sparse path (what training uses) masks like the dense one
    dense = Code(out.codes, None, model.n_total)
    torch.testing.assert_close(model.decode_prefix(out.code, 4), model.decode_prefix(dense, 4))
    with pytest.raises(ValueError, match="slot_group_sizes must be positive integers summing to n_latents=16"):
        sae.BindingSAE(8, 16, n_slots=2, k=3, slot_group_sizes=[4, 4])


def test_each_binding_prefix_reconstructs_on_its_own(tmp_path):
    data = sparse_data(n=4096, d=16, atoms=48)
    results, models = {}, {}
    for name, groups in (("nested", [4, 12, 16]), ("plain", [])):
        torch.manual_seed(0)
        models[name] = model = sae.BindingSAE(16, 32, n_slots=2, k=4, slot_group_sizes=groups)
        sae.train(model, data, steps=400, batch_size=256, lr=3e-3, binding_recipe="plain")
        results[name] = [binding_prefix_fvu(model, data[:1024], p) for p in (4, 16, 32)]
    nested, plain = results["nested"], results["plain"]
    # Measured (seed 0): atoms 4/16/32 give FVU 0.67/0.35/0.24 nested, 0.90/0.58/0.22 plain.
    assert nested[0] > nested[1] > nested[2]
    assert nested[0] < plain[0] - 0.1 and nested[1] < plain[1] - 0.1
    assert nested[2] < plain[2] + 0.05
    models["nested"].save(tmp_path / "d")
    assert sae.load(tmp_path / "d").cfg.slot_group_sizes == [4, 12, 16]
