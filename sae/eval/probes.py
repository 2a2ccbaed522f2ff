"""Probes: how much of a label can be read from features, linearly or through a small MLP.

Two recipes, kept apart on purpose because the numbers recorded in RESULTS.md and the shipped
scenes model's metadata were measured with each:
    probe_accuracy      one probe (multinomial logistic, or a one-hidden-layer GELU MLP) on
                        standardised features; the bottleneck report's probes
    fit_scene_probes    one linear probe per (object, attribute) of a scene, fitted jointly from
                        zero with a floor on each feature's scale, so that SAE codes (sparse,
                        with rarely firing latents) are not dominated by their rare latents;
                        with hidden > 0, one GELU MLP whose hidden layer all heads share (the
                        scene family's nonlinear reference: one fit per site, not one per head)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.lm import scenes
from sae.lm.scenes import ATTRIBUTES, FAMILIES


def probe_accuracy(x_train, y_train, x_test, y_test, n_classes: int, hidden: int = 0, steps: int = 600,
                   seed: int = 0) -> float:
    """Test accuracy of a probe on standardised features, full-batch Adam: multinomial logistic
    regression when hidden == 0, else a one-hidden-layer GELU MLP of that width."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    torch.manual_seed(seed)
    d = x_train.shape[1]
    probe = (torch.nn.Linear(d, n_classes) if hidden == 0 else
             torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_classes)))
    opt = torch.optim.Adam(probe.parameters(), lr=0.05 if hidden == 0 else 3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(probe(x_train), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (probe(x_test).argmax(-1) == y_test).float().mean().item()


def scene_heads(n_objects: int) -> list[tuple[int, int]]:
    """(object, attribute index) of every probe head for scenes of up to n_objects."""
    return [(s, a) for s in range(n_objects) for a in range(len(ATTRIBUTES))]


HEADS = scene_heads(scenes.MAX_OBJECTS)  # the default world's


def fit_scene_probes(x: torch.Tensor, attributes: torch.Tensor, steps: int = 600, lr: float = 0.05,
                     hidden: int = 0, seed: int = 0):
    """One multinomial logistic probe per (object, attribute) on standardised features, full-batch
    Adam from zero (probe_accuracy's recipe, zero-initialised and fitted jointly). The heads share nothing but the
    features, and Adam is per-parameter, so fitting them together equals fitting them apart.
    hidden > 0: the heads read one shared GELU layer of that width instead (random init from
    `seed`, lr 3e-3 as probe_accuracy's MLP). attributes: (N, n_objects, 3), -1 = no object.
    Returns predict(x_new) -> (N, n_objects, 3) value indices."""
    heads = scene_heads(attributes.shape[1])
    x = x.float()
    keep = x.std(0) > 1e-6  # constant on train (dead latents): no information, only test-time noise
    x = x[:, keep]
    mu, sd = x.mean(0), torch.ones(0)
    if keep.any():
        # A latent firing on a handful of train rows has a tiny std; flooring it stops its rare
        # test activations from being blown up to huge standardised values.
        sd = x.std(0).clamp_min(0.1 * x.std(0).median().item())
    sizes = [len(FAMILIES[ATTRIBUTES[a]]) for _, a in heads]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    if hidden > 0:
        return _fit_mlp_heads(x, attributes, heads, offsets, keep, mu, sd, steps, hidden, seed)
    W = torch.zeros(x.shape[1], offsets[-1], requires_grad=True)
    b = torch.zeros(offsets[-1], requires_grad=True)
    sparse = (x != 0).float().mean().item() < 0.2
    # Sparse codes stay sparse: (x - mu)/sd @ W = (x/sd) @ W - (mu/sd) @ W.
    xs = (x / sd).to_sparse() if sparse else x / sd
    shift = mu / sd
    _train_heads([W, b], lambda: (torch.sparse.mm(xs, W) if sparse else xs @ W) - shift @ W + b, lr,
                 attributes, heads, offsets, steps)
    W, b = W.detach(), b.detach()

    return _head_predictor(lambda x_new: ((x_new.float()[:, keep] - mu) / sd) @ W + b, heads, offsets,
                           attributes.shape[1])


def _train_heads(params: list, logits_fn, lr: float, attributes, heads, offsets, steps: int) -> None:
    """Full-batch Adam on the summed cross-entropy of every head over the rows that have its object
    (logits_fn() -> (N, offsets[-1]) logits of all heads, head h in columns offsets[h]:offsets[h+1])."""
    present = [(attributes[:, s, a] >= 0) for s, a in heads]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = logits_fn()
            loss = sum(F.cross_entropy(logits[m, offsets[h]:offsets[h + 1]], attributes[m, s, a])
                       for h, ((s, a), m) in enumerate(zip(heads, present)) if m.any())
            opt.zero_grad()
            loss.backward()
            opt.step()


def _head_predictor(logits_fn, heads, offsets, n_objects: int):
    def predict_fn(x_new: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = logits_fn(x_new)
        out = torch.empty(len(x_new), n_objects, len(ATTRIBUTES), dtype=torch.long)
        for h, (s, a) in enumerate(heads):
            out[:, s, a] = logits[:, offsets[h]:offsets[h + 1]].argmax(-1)
        return out

    return predict_fn


def _fit_mlp_heads(x, attributes, heads, offsets, keep, mu, sd, steps: int, hidden: int, seed: int):
    """fit_scene_probes with hidden > 0: the heads' logits come from one shared GELU layer."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, offsets[-1]))
    xs = (x - mu) / sd
    _train_heads(list(net.parameters()), lambda: net(xs), 3e-3, attributes, heads, offsets, steps)
    net.eval()
    return _head_predictor(lambda x_new: net((x_new.float()[:, keep] - mu) / sd), heads, offsets,
                           attributes.shape[1])
