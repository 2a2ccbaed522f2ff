"""The architectures run through the Triton kernels (here in the interpreter) with the same losses
and gradients as through the torch references: the kernels serve the models, not just themselves."""
import pytest
import torch

import sae


def step(model, x, backend, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", backend)
    assert sae.core.kernels.backend(x) == backend
    model.zero_grad()
    out = model(x)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.x_hat.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("build", [
    lambda: sae.TopKSAE(24, 96, k=5, dead_tokens=1),
    lambda: sae.BatchTopKSAE(24, 96, k=5),
    lambda: sae.BindingSAE(24, 48, n_slots=2, k=5, transform_init="random_orthogonal"),
    lambda: sae.BindingSAE(24, 48, n_slots=3, sparsity="topk_per_slot", k=2, transform_init="random_orthogonal"),
    lambda: sae.BindingSAE(24, 48, n_slots=2, sparsity="batchtopk", k=4, transform_init="random_orthogonal"),
    lambda: sae.MatryoshkaSAE(24, 96, group_sizes=[16, 80], sparsity="topk", k=5),
], ids=["topk+auxk", "batchtopk", "binding", "binding-per-slot", "binding-batchtopk", "matryoshka"])
def test_model_step_is_the_same_through_triton_and_torch(build, monkeypatch):
    torch.manual_seed(0)
    model = build().train()
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        model.b_dec.normal_(0, 0.2)
    x = torch.randn(40, 24)
    if model.cfg.dead_tokens == 1:  # make AuxK run too
        model.tokens_since_fired[::3] = 10
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = step(model, x, "torch", monkeypatch)
    model.load_state_dict(state)
    got = step(model, x, "triton", monkeypatch)
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert rel(got[0], ref[0]) < 1e-5
    assert rel(got[1], ref[1]) < 1e-5
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert rel(got[2][name], ref[2][name]) < 1e-4, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_models_run_under_inference_mode(backend, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", backend)
    for model in (sae.TopKSAE(16, 64, k=3), sae.BindingSAE(16, 32, k=3)):
        x = torch.randn(5, 16)
        expected = model(x).x_hat.detach()
        with torch.inference_mode():
            torch.testing.assert_close(model(x).x_hat, expected)
