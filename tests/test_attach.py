"""sae.lm.attach: dictionaries inside a model (a tiny random transformer-lens model).

Exact dictionaries (x_hat = x) make the mechanics checkable against the clean model; a random one
and hand-written hooks check that the replacement really happens, where it should and nowhere else."""
import pytest
import torch

import sae
from sae.lm import attached, models, position_mask, replacing, run_codes

D = 16
CFG = dict(d_model=D, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=40, n_ctx=12, act_fn="gelu", seed=0)
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return models.build_model(CFG)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG["d_vocab"], (3, CFG["n_ctx"]), generator=torch.Generator().manual_seed(0))


def exact() -> sae.SAE:
    """x_hat == x: latents +e_i and -e_i."""
    m = sae.ReLUSAE(D, 2 * D).eval()
    eye = torch.eye(D)
    with torch.no_grad():
        m.W_enc.copy_(torch.cat([eye, -eye]).T)
        m.W_dec.copy_(torch.cat([eye, -eye]))
        m.b_enc.zero_()
        m.b_dec.zero_()
    return m


def noisy(seed=0) -> sae.SAE:
    torch.manual_seed(seed)
    return sae.TopKSAE(D, 32, k=2).eval()


@torch.no_grad()
def test_exact_dictionary_changes_nothing_and_its_codes_are_the_activations(model, tokens):
    clean = model(tokens)
    with attached(model, {H0: exact()}) as run:
        out = model(tokens)
    assert torch.allclose(out, clean, atol=1e-5)
    acts = models.hook_activations(model, tokens, [H0])[H0]
    codes = run.dense(H0)
    assert codes.shape == (3, CFG["n_ctx"], 2 * D) and run.masks[H0].all()
    assert torch.allclose(codes[..., :D] - codes[..., D:], acts, atol=1e-6)  # +e_i / -e_i parts


@torch.no_grad()
def test_a_noisy_dictionary_is_what_a_hand_written_hook_does(model, tokens):
    m = noisy()

    def hook(act, hook=None):
        flat = act.reshape(-1, D)
        return m.decode(m.encode(flat)).reshape(act.shape)

    expected = model.run_with_hooks(tokens, fwd_hooks=[(H0, hook)])
    with attached(model, {H0: m}) as run:
        out = model(tokens)
    assert (out - model(tokens)).abs().max() > 1e-3  # it did change the output
    assert torch.allclose(out, expected, atol=1e-5)
    assert run.codes[H0].shape == (3 * CFG["n_ctx"], 32) and int((run.codes[H0] > 0).sum(1).max()) <= 2


@torch.no_grad()
def test_error_term_restores_clean_and_makes_edits_causal(model, tokens):
    m, clean = noisy(1), model(tokens)
    with attached(model, {H0: m}, error_term=True):
        assert torch.allclose(model(tokens), clean, atol=1e-5)
    latent = int(run_codes(model, {H0: m}, tokens)[H0].sum(0).argmax())  # a latent that fires somewhere

    def ablate(name, codes):
        codes = codes.clone()
        codes[:, latent] = 0
        return codes

    with attached(model, {H0: m}, error_term=True, edit=ablate) as run:
        edited = model(tokens)
    assert (edited - clean).abs().max() > 1e-4 and run.codes[H0][:, latent].abs().sum() == 0


@torch.no_grad()
def test_positions_limit_the_replacement(model, tokens):
    """Replacing only position 5 leaves every earlier position's output as it was (causal model)."""
    m, clean = noisy(2), model(tokens)
    with attached(model, {H0: m}, positions=[5]) as run:
        out = model(tokens)
    assert torch.allclose(out[:, :5], clean[:, :5], atol=1e-6)
    assert (out[:, 5:] - clean[:, 5:]).abs().max() > 1e-4
    assert run.codes[H0].shape == (3, 32) and run.masks[H0][:, 5].all() and run.masks[H0].sum() == 3
    mask = torch.zeros(3, CFG["n_ctx"], dtype=torch.bool)
    mask[1, -1] = True
    with attached(model, {H0: m}, positions=mask):
        out = model(tokens)
    assert torch.allclose(out[[0, 2]], clean[[0, 2]], atol=1e-6) and torch.allclose(out[1, :-1], clean[1, :-1], atol=1e-6)


@torch.no_grad()
def test_read_only_and_two_hooks(model, tokens):
    """replace=False reads codes and changes nothing; with two dictionaries, the later one sees
    what the earlier replacement made."""
    a, b, clean = noisy(3), noisy(4), model(tokens)
    with attached(model, {H0: a}, replace=False) as run:
        assert torch.allclose(model(tokens), clean)
    assert torch.allclose(run.codes[H0], run_codes(model, {H0: a}, tokens)[H0], atol=1e-6)
    with attached(model, {H0: a, H1: b}) as run:
        model(tokens)
    spliced = models.hook_activations(model, tokens, [H0])[H0].reshape(-1, D)
    spliced = a.decode(a.encode(spliced))  # blocks.1.hook_resid_pre is blocks.0's output
    assert torch.allclose(run.codes[H1], b.encode(spliced), atol=1e-5)
    assert not torch.allclose(run.codes[H1], run_codes(model, {H1: b}, tokens)[H1], atol=1e-3)


def test_hooks_are_removed_even_when_the_pass_fails(model, tokens):
    clean = model(tokens)

    def boom(name, rows):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with replacing(model, {H0: boom}):
            model(tokens)
    assert torch.allclose(model(tokens), clean) and not model.hook_dict[H0].fwd_hooks


def test_bad_hooks_widths_and_positions(model, tokens):
    with pytest.raises(ValueError, match="d_in=17"):
        with attached(model, {H0: sae.TopKSAE(D + 1, 8, k=2)}):
            pass
    with pytest.raises(ValueError, match="unknown hook"):
        run_codes(model, {"blocks.7.hook_resid_post": noisy()}, tokens)
    with pytest.raises(ValueError, match="outside sequences of 12"):
        position_mask([12], 3, 12)
    assert position_mask([-1], 2, 4).tolist() == [[False, False, False, True]] * 2
    with pytest.raises(ValueError, match="shape"):
        position_mask(torch.ones(2, 5, dtype=torch.bool), 3, 12)
