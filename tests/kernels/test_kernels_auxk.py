"""AuxK through the sparse path: the aux selection from the encoder's own pre-activations
(topk_encode_aux), decoded sparsely, against float64 truths and against the dense-over-dead-columns
computation it replaced; the CPU backward primitives at both of their densities."""
import pytest
import torch
from kernel_truth import TOL, dense_codes, f64, leaf, pre_activations, rel

import sae
from sae.core.kernels import auxk_reconstruct, reference, sparse_decode, topk_encode_aux
from sae.core.kernels.pairs import CACHE

# The new path sums in another order than the dense one (segment sums and sampled dots instead of
# GEMMs): fp32 results agree to rounding, ||new - old|| / ||old|| below this.
SAME_UP_TO_ROUNDING = 1e-5


def _problem(B, d, n, n_dead, seed, dev):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(dev)
    W_enc = leaf(torch.randn(n, d, generator=g).t() / d**0.5, torch.float32, dev)
    b_enc = leaf(0.1 * torch.randn(n, generator=g), torch.float32, dev)
    b_dec = leaf(0.1 * torch.randn(d, generator=g), torch.float32, dev)
    W_dec = leaf(torch.randn(n, d, generator=g), torch.float32, dev)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n, generator=g)[:n_dead]] = True
    return g, x, W_enc, b_enc, b_dec, W_dec, dead


def _dense_over_dead(x, W_enc, b_enc, k_aux, dead_ids, dead_rows, b_dec):
    """The AuxK reconstruction as the library computed it before (dense GEMMs over the dead columns)."""
    pre = reference.preactivations(x, W_enc[:, dead_ids], b_enc[dead_ids], b_dec)
    top = pre.topk(min(k_aux, dead_ids.numel()), dim=1, sorted=False)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    return codes @ dead_rows


@pytest.mark.parametrize("n_dead,k_aux", [(30, 6), (30, 24), (4, 10)], ids=["sparse", "dense", "k_aux>n_dead"])
def test_topk_encode_aux_against_float64(backend, dev, n_dead, k_aux):
    B, d, n, k = 24, 16, 96, 4
    g, x, W_enc, b_enc, b_dec, W_dec, dead = _problem(B, d, n, n_dead, 0, dev)
    ids = dead.nonzero().squeeze(1).to(dev)
    values, indices, aux_values, aux_indices = topk_encode_aux(x, W_enc, b_enc, k, ids, k_aux, b_dec)
    assert aux_values.shape == aux_indices.shape == (B, min(k_aux, n_dead))
    x_hat = sparse_decode(values, indices, W_dec) + b_dec
    aux = sparse_decode(aux_values, aux_indices, W_dec[ids])
    G = torch.randn(B, d, generator=g)
    ((x_hat - x).pow(2).sum() + (aux * G.to(dev)).sum()).backward()

    leaves = f64(W_enc, b_enc, b_dec, W_dec)
    We, be, bd, Wd = leaves
    x64 = x.cpu().double()
    pre = pre_activations(x64, We, be, bd)
    main_idx, aux_glob = indices.cpu(), ids.cpu()[aux_indices.cpu()]
    masked = pre.detach().masked_fill(~dead, float("-inf"))
    # each selection is a true top-k of the float64 pre-activations (compared as sorted values)
    assert rel(pre.detach().gather(1, main_idx).sort(1).values, pre.detach().topk(k, 1).values.sort(1).values) < 1e-6
    assert rel(pre.detach().gather(1, aux_glob).sort(1).values,
               masked.topk(min(k_aux, n_dead), 1).values.sort(1).values) < 1e-6
    truth_x_hat = dense_codes(pre.gather(1, main_idx).relu(), main_idx, n) @ Wd + bd
    truth_aux = dense_codes(pre.gather(1, aux_glob).relu(), aux_glob, n) @ Wd
    assert rel(x_hat, truth_x_hat) < TOL[torch.float32] and rel(aux, truth_aux) < TOL[torch.float32]
    ((truth_x_hat - x64).pow(2).sum() + (truth_aux * G.double()).sum()).backward()
    for got, want in zip((W_enc, b_enc, b_dec, W_dec), leaves):
        assert rel(got.grad, want.grad) < TOL[torch.float32]


@pytest.mark.parametrize("n_dead,k_aux", [(40, 8), (40, 30), (6, 10)], ids=["sparse", "dense", "k_aux>n_dead"])
def test_the_sparse_path_reproduces_the_dense_one(backend, dev, n_dead, k_aux):
    """Same reconstruction and gradients as the dense-over-dead-columns AuxK, up to fp32 rounding,
    both from the encoder's pre-activations (topk_encode_aux) and recomputed (auxk_reconstruct)."""
    B, d, n, k = 32, 16, 128, 4
    g, x, W_enc, b_enc, b_dec, W_dec, dead = _problem(B, d, n, n_dead, 1, dev)
    ids = dead.nonzero().squeeze(1).to(dev)
    G = torch.randn(B, d, generator=g).to(dev)
    params = (W_enc, b_enc, b_dec, W_dec)

    def run(make):
        for p in params:
            p.grad = None
        CACHE.clear()
        aux = make()
        (aux * G).sum().backward()
        return aux.detach().clone(), [p.grad.clone() for p in params]

    old = run(lambda: _dense_over_dead(x, W_enc, b_enc, k_aux, ids, W_dec[ids], b_dec))
    fused = run(lambda: sparse_decode(*topk_encode_aux(x, W_enc, b_enc, k, ids, k_aux, b_dec)[2:], W_dec[ids]))
    recomputed = run(lambda: auxk_reconstruct(x, W_enc, b_enc, k_aux, ids, W_dec[ids], b_dec))
    for new in (fused, recomputed):
        assert rel(new[0], old[0]) < SAME_UP_TO_ROUNDING
        for a, b in zip(new[1], old[1]):
            assert rel(a, b) < SAME_UP_TO_ROUNDING
    for _, (dW_enc, db_enc, _, dW_dec) in (fused, recomputed):  # AuxK trains the dead latents only
        assert (dW_enc.cpu()[:, ~dead] == 0).all() and (db_enc.cpu()[~dead] == 0).all()
        assert (dW_dec.cpu()[~dead] == 0).all() and dW_dec.cpu()[dead].abs().sum() > 0


def test_topk_sae_trains_auxk_through_the_encoder_selection():
    """TopKSAE's aux loss from the encoder's selection equals the recomputed one (the path other
    rules take), and its gradients reach only dead latents' decoder rows."""
    torch.manual_seed(0)
    model = sae.TopKSAE(16, 96, k=4, aux_k=12, aux_coeff=1.0, dead_tokens=5).train()
    with torch.no_grad():
        model.tokens_since_fired[::3] = 5
        model.b_enc.normal_(0, 0.3)
    x = torch.randn(40, 16)
    out = model(x)
    assert set(out.code.extras) == {"aux_dead", "aux_values", "aux_indices"}
    dead = out.code.extras["aux_dead"]
    again = model.sparsity.aux_loss(model, x, out.x_hat, dead)  # no code: recomputed over dead columns
    assert rel(out.losses["aux"], again) < SAME_UP_TO_ROUNDING
    out.losses["aux"].backward()
    live = torch.ones(96, dtype=torch.bool)
    live[dead] = False
    assert (model.W_dec.grad[live] == 0).all() and model.W_dec.grad[dead].abs().sum() > 0
    with torch.no_grad():
        assert "aux_dead" not in model.eval()(x).code.extras


@pytest.mark.parametrize("k", [3, 40], ids=["sampled-dots", "gemm"])
def test_cpu_backward_primitives(k):
    """segment_rows and gather_dot against dense float64, at both densities of gather_dot, with
    repeated latents and zero coefficients; bitwise identical when run twice."""
    B, n, d = 30, 48, 12
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, n, (B, k), generator=g)
    idx[:, 1] = idx[:, 0]  # repeats within rows
    coef = torch.randn(B, k, generator=g)
    coef[coef < -1] = 0
    Gm, R = torch.randn(B, d, generator=g), torch.randn(n, d, generator=g)
    truth_rows = dense_codes(coef.double(), idx, n).t() @ Gm.double()
    truth_dots = (Gm.double() @ R.double().t()).gather(1, idx)
    for _ in range(2):
        CACHE.clear()
        rows, dots = reference.segment_rows(idx, coef, Gm, n), reference.gather_dot(Gm, R, idx)
        assert rel(rows, truth_rows) < TOL[torch.float32] and rel(dots, truth_dots) < TOL[torch.float32]
    CACHE.clear()
    assert torch.equal(rows, reference.segment_rows(idx, coef, Gm, n))


def test_auxk_backward_is_deterministic(backend, dev):
    B, d, n, k = 32, 16, 64, 4
    results = []
    for _ in range(2):
        CACHE.clear()
        g, x, W_enc, b_enc, b_dec, W_dec, dead = _problem(B, d, n, 20, 5, dev)
        ids = dead.nonzero().squeeze(1).to(dev)
        v, i, av, ai = topk_encode_aux(x, W_enc, b_enc, k, ids, 8, b_dec)
        x_hat = sparse_decode(v, i, W_dec) + b_dec
        ((x_hat - x).pow(2).sum() + (sparse_decode(av, ai, W_dec[ids]) - (x - x_hat).detach()).pow(2).sum()).backward()
        results.append([t.grad.clone() for t in (W_enc, b_enc, b_dec, W_dec)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_aux_inputs_are_one_clear_error():
    x, W, b = torch.randn(4, 8), torch.randn(8, 16), torch.zeros(16)
    with pytest.raises(ValueError, match="dead latent ids"):
        topk_encode_aux(x, W, b, 2, torch.tensor([3, 16]), 4)
    with pytest.raises(ValueError, match="k_aux"):
        topk_encode_aux(x, W, b, 2, torch.tensor([3]), 0)
    with pytest.raises(ValueError, match="dead"):
        topk_encode_aux(x, W, b, 2, torch.tensor([3], dtype=torch.int32), 1)
