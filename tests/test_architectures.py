"""Each standard architecture does what its definition says, at tiny sizes."""
import pytest
import torch

import sae
from sae.core.architectures.base import geometric_median
from sae.core.architectures.jumprelu import JumpReLUFunction, StepFunction

D_IN, N = 12, 48
ARCHS = [(sae.TopKSAE, {"k": 5}), (sae.BatchTopKSAE, {"k": 5}), (sae.JumpReLUSAE, {}), (sae.ReLUSAE, {})]


def make(cls, options, seed=0):
    torch.manual_seed(seed)
    model = cls(D_IN, N, **options)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("cls,options", ARCHS)
def test_encode_decode_agree_with_forward(cls, options):
    model = make(cls, options).eval()
    x = torch.randn(9, D_IN)
    out = model(x)
    codes = model.encode(x)
    assert codes.shape == (9, N)
    assert (codes >= 0).all()
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(model.decode(codes), out.x_hat)
    torch.testing.assert_close(out.losses["mse"], (out.x_hat - x).pow(2).sum(-1).mean())
    assert out.loss == sum(out.losses.values())


@pytest.mark.parametrize("cls,options", ARCHS)
def test_gradients_reach_every_parameter_and_bad_shapes_fail(cls, options):
    model = make(cls, options).train()
    model(torch.randn(16, D_IN)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError, match=rf"input must have shape \(batch, {D_IN}\)"):
        model(torch.randn(4, D_IN + 1))
    with pytest.raises(ValueError, match=rf"codes must have shape \(batch, {N}\)"):
        model.decode(torch.randn(4, N - 1))


def test_topk_keeps_the_k_largest_pre_activations():
    model = make(sae.TopKSAE, {"k": 5})
    x = torch.randn(7, D_IN)
    pre = model.pre_activations(x)
    codes = model.encode(x)
    expected = torch.zeros_like(pre).scatter(1, pre.topk(5).indices, pre.topk(5).values.relu())
    torch.testing.assert_close(codes, expected)


def test_batchtopk_selects_b_times_k_over_the_batch_and_learns_a_threshold():
    model = make(sae.BatchTopKSAE, {"k": 3, "threshold_lr": 1.0}).train()
    x = torch.randn(10, D_IN)
    codes = model(x).codes.detach()
    assert (codes > 0).sum() == 30
    per_row = (codes > 0).sum(1)
    assert per_row.min() != per_row.max()  # rows differ: the budget is shared, not per token
    smallest_kept = codes[codes > 0].min()
    assert float(model.threshold) == pytest.approx(smallest_kept.item())  # lr 1.0: EMA = last value
    model.eval()
    pre = model.pre_activations(x)
    torch.testing.assert_close(model.encode(x), pre.relu() * (pre > model.threshold))


def test_jumprelu_pseudo_gradients_follow_the_rectangle_kernel():
    eps = 0.5
    pre = torch.tensor([[0.1, 0.9, 1.2, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    JumpReLUFunction.apply(pre, theta, eps).sum().backward()
    # z = pre * [pre > theta]: d/dpre = [pre > theta]; d/dtheta = -theta/eps where |pre - theta| < eps/2.
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, -2.0, 0.0]))
    pre.grad, theta.grad = None, None
    StepFunction.apply(pre, theta, eps).sum().backward()
    assert pre.grad is None or (pre.grad == 0).all()
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, -2.0, 0.0]))


def test_jumprelu_threshold_stays_fp32_under_bf16_autocast():
    model = make(sae.JumpReLUSAE, {"l0_coeff": 1.0}).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(8, D_IN))
    out.loss.backward()
    assert model.log_threshold.dtype == torch.float32
    assert model.log_threshold.grad is not None and model.log_threshold.grad.abs().sum() > 0
    assert out.code.values.dtype == torch.float32


def test_jumprelu_l0_penalty_counts_active_latents():
    model = make(sae.JumpReLUSAE, {"l0_coeff": 0.5}).eval()
    out = model(torch.randn(6, D_IN))
    l0 = (out.codes > 0).sum(1).float().mean()
    torch.testing.assert_close(out.losses["sparsity"], 0.5 * l0)


def test_relu_penalty_is_l1_weighted_by_decoder_norms():
    model = make(sae.ReLUSAE, {"l1_coeff": 2.0})
    with torch.no_grad():
        model.W_dec.mul_(torch.linspace(0.5, 3, N)[:, None])
    x = torch.randn(5, D_IN)
    out = model(x)
    expected = 2.0 * (out.codes * model.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.losses["sparsity"], expected)


def test_decoder_rows_stay_unit_norm_and_lose_the_parallel_gradient():
    model = make(sae.TopKSAE, {"k": 5}).train()
    model.normalize_decoder_()
    model(torch.randn(32, D_IN)).loss.backward()
    model.remove_parallel_grad_()
    parallel = (model.W_dec.grad * model.W_dec).sum(1)
    assert parallel.abs().max() < 1e-5
    with torch.no_grad():
        model.W_dec.mul_(3.0)
    model.normalize_decoder_()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("cls,options", ARCHS)
def test_folding_the_activation_scale_keeps_codes_and_rescales_reconstructions(cls, options):
    model = make(cls, options).eval()
    x_raw = torch.randn(11, D_IN) * 7
    scale = 0.37
    codes_scaled = model.encode(x_raw * scale)
    x_hat_scaled = model(x_raw * scale).x_hat
    model.fold_activation_scale_(scale)
    torch.testing.assert_close(model.encode(x_raw), codes_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x_raw).x_hat, x_hat_scaled / scale, rtol=1e-5, atol=1e-4)


def test_auxk_trains_only_dead_latents_on_the_residual():
    model = make(sae.TopKSAE, {"k": 2, "aux_k": 4, "aux_coeff": 1.0, "dead_tokens": 5}).train()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[:10] = True
    model.tokens_since_fired[dead] = 100
    model.tokens_since_fired[~dead] = 0
    x = torch.randn(8, D_IN)
    model.zero_grad()
    out = model(x)
    assert "aux" in out.losses and out.losses["aux"] > 0
    out.losses["aux"].backward()
    assert model.W_enc.grad[:, ~dead].abs().sum() == 0
    assert model.W_enc.grad[:, dead].abs().sum() > 0
    assert model.W_dec.grad[~dead].abs().sum() == 0
    no_dead = make(sae.TopKSAE, {"k": 2, "aux_coeff": 1.0}).train()
    assert "aux" not in no_dead(x).losses


def test_dead_tracking_counts_tokens_since_each_latent_fired():
    model = make(sae.TopKSAE, {"k": 1}).train()
    x = torch.randn(4, D_IN)
    model(x)
    fired = model.encode(x).gt(0).any(0)
    assert (model.tokens_since_fired[fired] == 0).all()
    assert (model.tokens_since_fired[~fired] == 4).all()


def test_geometric_median_minimises_summed_distance():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(200, 3), torch.randn(20, 3) * 50 + 100])  # outliers drag the mean
    median = geometric_median(x)
    cost = lambda p: (x - p).norm(dim=1).sum()
    assert cost(median) < cost(x.mean(0))
    for _ in range(20):
        assert cost(median) <= cost(median + 0.01 * torch.randn(3)) + 1e-3


def test_unknown_and_invalid_options_are_refused():
    with pytest.raises(ValueError, match="has no option l1_coeff"):
        sae.TopKSAE(8, 16, l1_coeff=1.0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 16\]"):
        sae.TopKSAE(8, 16, k=17)
    with pytest.raises(ValueError, match="n_latents must be a positive integer"):
        sae.ReLUSAE(8, 0)
    with pytest.raises(ValueError, match="l1_coeff must be >= 0"):
        sae.ReLUSAE(8, 16, l1_coeff=-1)


def test_a_flat_sae_takes_its_own_rule_as_a_component():
    torch.manual_seed(0)
    by_rule = sae.TopKSAE(8, 16, sparsity=sae.TopK(k=3, aux_coeff=0.0))
    torch.manual_seed(0)
    by_name = sae.TopKSAE(8, 16, k=3, aux_coeff=0.0)
    assert by_rule.cfg == by_name.cfg and by_rule.cfg.k == 3 and by_rule.config_dict() == by_name.config_dict()
    assert "sparsity" not in by_rule.config_dict()  # cfg.json of flat SAEs is as it was
    assert torch.equal(by_rule.W_dec, by_name.W_dec)
    with pytest.raises(ValueError, match="sparsity must be one of topk"):
        sae.TopKSAE(8, 16, sparsity=sae.BatchTopK(k=3))
    assert sae.ReLUSAE(8, 16).cfg.normalize_decoder is False  # ReLU's SAE-level defaults, stated by the rule
