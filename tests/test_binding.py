"""The matrix-binding SAE: structure, decoding, parametrisations, save/load, at tiny sizes."""
import pytest
import torch

import sae
from sae.core.architectures.binding import RULES

D_IN, N, S = 10, 16, 3
RULE_OPTIONS = {"topk": {"k": 4}, "topk_per_slot": {"k": 2}, "batchtopk": {"k": 4}, "relu": {}, "jumprelu": {}}


def make(sparsity="topk", slot_transform="orthogonal", transform_init="random_orthogonal", seed=0, **options):
    torch.manual_seed(seed)
    model = sae.BindingSAE(D_IN, N, n_slots=S, sparsity=sparsity, slot_transform=slot_transform,
                           transform_init=transform_init, **{**RULE_OPTIONS[sparsity], **options})
    with torch.no_grad():
        model.b_dec.normal_()
    return model


def test_public_attributes_follow_the_design_contract():
    model = make()
    assert isinstance(model, sae.SAE) and isinstance(model, sae.BindingSAE)
    assert model.n_total == S * N
    assert model.dictionary.shape == (N, D_IN)
    assert model.slot_transforms.shape == (S, D_IN, D_IN)
    torch.testing.assert_close(model.slot_transforms[0], torch.eye(D_IN))
    assert model.W_dec.shape == (S * N, D_IN)
    for s in range(S):  # W_dec = [D; M_2 D; M_3 D]
        torch.testing.assert_close(model.W_dec[s * N:(s + 1) * N], model.dictionary @ model.slot_transforms[s].T)
    codes = torch.randn(5, S * N)
    assert model.slot_codes(codes).shape == (5, S, N)
    torch.testing.assert_close(model.slot_codes(codes)[:, 1], codes[:, N:2 * N])


@pytest.mark.parametrize("slot_transform", ["orthogonal", "full", "identity"])
@pytest.mark.parametrize("sparsity", sorted(RULES))
def test_decoding_equals_the_materialised_flat_decoder(sparsity, slot_transform):
    init = "identity" if slot_transform == "identity" else "random_orthogonal"
    model = make(sparsity, slot_transform, init)
    if slot_transform == "full":
        with torch.no_grad():
            model.transform_param.add_(0.3 * torch.randn_like(model.transform_param))  # not orthogonal
    x = torch.randn(9, D_IN)
    out = model(x)
    torch.testing.assert_close(out.x_hat, out.codes @ model.W_dec + model.b_dec, rtol=1e-5, atol=1e-5)
    codes = torch.randn(4, S * N).relu()
    torch.testing.assert_close(model.decode(codes), codes @ model.W_dec + model.b_dec, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert model.dictionary.grad is not None and model.dictionary.grad.abs().sum() > 0


def test_the_flat_decoder_is_not_materialised_on_the_hot_path(monkeypatch):
    model = make()
    monkeypatch.setattr(type(model), "flat_decoder", lambda self: pytest.fail("materialised M_s D"))
    model(torch.randn(4, D_IN)).loss.backward()


@pytest.mark.parametrize("sparsity", sorted(RULES))
def test_save_load_round_trip(tmp_path, sparsity):
    model = make(sparsity).eval()
    model.save(tmp_path / "d")
    loaded = sae.load(tmp_path / "d")
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat)
    torch.testing.assert_close(loaded.slot_transforms, model.slot_transforms)


def test_flat_export_reads_as_a_saelens_topk_with_identical_codes(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed")
    model = make("topk").eval()
    model.save(tmp_path / "d")
    flat = sae_lens.SAE.load_from_disk(str(tmp_path / "d"))
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(flat.encode(x), model.encode(x))
        torch.testing.assert_close(flat(x), model(x).x_hat, rtol=1e-5, atol=1e-5)


def test_mismatched_binding_files_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make().save(tmp_path / "d")
    extra = load_file(str(tmp_path / "d" / "binding_weights.safetensors"))
    extra["dictionary"] = extra["dictionary"] * 2
    save_file(extra, str(tmp_path / "d" / "binding_weights.safetensors"))
    with pytest.raises(sae.core.io.LoadError, match="does not match the dictionary"):
        sae.load(tmp_path / "d")
    (tmp_path / "d" / "binding_weights.safetensors").unlink()
    with pytest.raises(sae.core.io.LoadError, match="binding_weights.safetensors: file not found"):
        sae.load(tmp_path / "d")


def test_orthogonal_transforms_stay_orthogonal_through_training():
    model = make("topk", "orthogonal", "identity").train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(64, D_IN)
    for _ in range(30):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    m = model.slot_transforms
    assert (m[1] - torch.eye(D_IN)).abs().max() > 0.05  # it moved ...
    eye = torch.eye(D_IN).expand(S, -1, -1)
    torch.testing.assert_close(m @ m.transpose(1, 2), eye, atol=1e-5, rtol=0)  # ... and stayed orthogonal


def test_identity_control_has_no_free_transform():
    model = make("topk", "identity", "identity")
    assert not any("transform" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model.slot_transforms, torch.eye(D_IN).expand(S, -1, -1))


def test_per_slot_topk_keeps_k_in_every_slot():
    model = make("topk_per_slot", k=2)
    codes = model.slot_codes(model.encode(torch.randn(7, D_IN)))
    assert ((codes > 0).sum(-1) <= 2).all()
    pre = model.slot_codes(model.pre_activations(torch.randn(3, D_IN)))
    assert pre.shape == (3, S, N)


def test_folding_the_scale_keeps_codes_and_transforms():
    model = make().eval()
    x = torch.randn(8, D_IN) * 5
    codes, x_hat = model.encode(x * 0.3), model(x * 0.3).x_hat
    transforms = model.slot_transforms.clone()
    model.fold_activation_scale_(0.3)
    torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x).x_hat, x_hat / 0.3, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.slot_transforms, transforms)


def test_bad_binding_options_are_refused():
    with pytest.raises(ValueError, match="n_slots must be an integer >= 2"):
        sae.BindingSAE(8, 16, n_slots=1, k=2)
    with pytest.raises(ValueError, match="sparsity must be one of"):
        sae.BindingSAE(8, 16, sparsity="gated")
    with pytest.raises(ValueError, match="slot_transform must be one of"):
        sae.BindingSAE(8, 16, slot_transform="rotation", k=2)
    with pytest.raises(ValueError, match="has no option l1_coeff"):
        sae.BindingSAE(8, 16, sparsity="topk", l1_coeff=1.0)


def test_rule_defaults_survive_composition():
    relu = sae.BindingSAE(8, 16, sparsity="relu")
    assert relu.cfg.normalize_decoder is False and relu.cfg.decoder_init_norm == 0.1  # ReLU's, not the base's
    assert relu.n_total == 32
    topk = sae.BindingSAE(8, 16, k=3)
    assert topk.cfg.k == 3 and topk.cfg.normalize_decoder is True


def test_sparsity_is_a_component_given_as_a_rule_or_by_name():
    torch.manual_seed(0)
    by_rule = sae.BindingSAE(D_IN, N, n_slots=S, sparsity=sae.BatchTopK(k=4, threshold_lr=0.5))
    torch.manual_seed(0)
    by_name = sae.BindingSAE(D_IN, N, n_slots=S, sparsity="batchtopk", k=4, threshold_lr=0.5)
    assert type(by_rule) is type(by_name) is sae.BindingSAE  # no class per (structure x rule)
    assert by_rule.sparsity == by_name.sparsity == sae.BatchTopK(k=4, threshold_lr=0.5)
    assert by_rule.cfg == by_name.cfg and by_rule.config_dict() == by_name.config_dict()
    assert by_rule.cfg.sparsity == "batchtopk" and by_rule.cfg.k == 4 and not hasattr(by_rule.cfg, "l1_coeff")
    for a, b in zip(by_rule.state_dict().values(), by_name.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(by_rule(x).x_hat, by_name(x).x_hat)
    rule = sae.TopK(k=2)
    model = sae.BindingSAE(D_IN, N, sparsity=rule)
    model.cfg.k = 3  # the config writes through to the model's own copy of the rule
    assert model.sparsity.k == 3 and rule.k == 2
    assert sae.BindingSAE(D_IN, N, sparsity="jumprelu").threshold.shape == (2 * N,)  # the rule's derived value


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="k: set inside sparsity=TopK"):
        sae.BindingSAE(8, 16, sparsity=sae.TopK(k=2), k=3)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 32\]"):
        sae.BindingSAE(8, 16, sparsity=sae.TopK(k=33))
    with pytest.raises(ValueError, match="has no option l1_coeff"):
        sae.BindingSAE(8, 16, sparsity=sae.TopK(k=2), l1_coeff=1.0)


def test_a_rule_states_the_sae_defaults_it_changes():
    assert sae.ReLU.sae_defaults == {"normalize_decoder": False, "decoder_init_norm": 0.1}
    assert sae.BindingSAE(8, 16, sparsity=sae.ReLU(), normalize_decoder=True).cfg.normalize_decoder is True
    assert sae.BindingSAE(8, 16, sparsity=sae.ReLU()).cfg.decoder_init_norm == 0.1
