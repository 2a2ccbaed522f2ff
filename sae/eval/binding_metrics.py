"""Binding metrics on plain tensors, so they score any model against a synthetic world.

Inputs are what any SAE can produce:
    a dictionary        (m, d)      rows = decoder directions (a standard SAE's W_dec, or a binding
                                    SAE's materialised [D; M_2 D; …])
    a shared dictionary (n̂, d) and slot transforms (S, d, d), column convention (M_s @ d_a)
    codes               (B, m)      dense, zeros where inactive
and the world's ground truth (`eval.worlds.World`: atoms, slot_atoms (S, n, d), coefs (B, S, n)).

What identifiability allows (binding.md): atoms only up to permutation and positive scale, slots
only up to relabelling, and M_s only on the span of what occurs in slot s. So dictionaries are
compared by Hungarian-matched |cos| (MMCS), the slot relabelling is chosen to fit best, and a
learned M is judged by *predicting held-out vectors* M_s d_a, not by ‖M̂ − M‖.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


# -- matching -------------------------------------------------------------------------------------
def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(na, nb) cosine similarities between rows."""
    a = a.double() / a.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b.double() / b.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).float()


@dataclass
class Match:
    score: float            # mean over *true* rows of the matched similarity (0 for unmatched)
    learned: torch.Tensor   # (n_true,) index of the learned row matched to each true row, -1 if none
    sim: torch.Tensor       # (n_true,) the matched similarity


def match(learned: torch.Tensor, true: torch.Tensor, signed: bool = False) -> Match:
    """One-to-one Hungarian matching of learned rows to true rows maximising |cos| (or cos)."""
    c = cosines(learned, true)
    sim = c if signed else c.abs()
    r, t = linear_sum_assignment(sim.numpy(), maximize=True)
    idx = torch.full((true.shape[0],), -1, dtype=torch.long)
    val = torch.zeros(true.shape[0])
    idx[t] = torch.as_tensor(r, dtype=torch.long)
    val[t] = sim[r, t]
    return Match(float(val.mean()), idx, val)


def mmcs(learned: torch.Tensor, true: torch.Tensor) -> float:
    """Mean max cosine similarity, Hungarian-matched |cos|, averaged over the true rows."""
    return match(learned, true).score


def dictionary_mmcs(D_hat: torch.Tensor, slot_atoms: torch.Tensor) -> tuple[float, int]:
    """MMCS of a binding SAE's shared dictionary, best over slot relabellings: the learned D may
    equal M_t D for any true slot t, since (D, M) ≅ (M_t D, M M_t⁻¹). Returns (score, t)."""
    scores = [mmcs(D_hat, slot_atoms[t]) for t in range(slot_atoms.shape[0])]
    t = int(np.argmax(scores))
    return scores[t], t


def effective_mmcs(W: torch.Tensor, slot_atoms: torch.Tensor) -> float:
    """MMCS of all S·n effective atoms M_s d_a against a full decoder (any SAE): the measure under
    which a standard SAE and a binding SAE with the same latent budget are compared."""
    return mmcs(W, slot_atoms.reshape(-1, slot_atoms.shape[-1]))


def slot_relabelling(D_hat: torch.Tensor, M_hat: torch.Tensor, slot_atoms: torch.Tensor) -> list[int]:
    """σ with learned slot s ≅ true slot σ[s], chosen to maximise Σ_s MMCS(M̂_s D̂, M_σ(s) D)."""
    S = M_hat.shape[0]
    score = np.array([[mmcs(D_hat @ M_hat[s].T, slot_atoms[t]) for t in range(S)] for s in range(S)])
    _, sigma = linear_sum_assignment(score, maximize=True)
    return [int(t) for t in sigma]


def binding_latents(D_hat: torch.Tensor, M_hat: torch.Tensor, slot_atoms: torch.Tensor) -> torch.Tensor:
    """The binding SAE's own latent layout: (true slot t, atom a) → latent index s·n̂ + i, with i the
    D̂ row matched to atom a (in learned slot 1's frame) and s = σ⁻¹(t). (S, n) long, -1 if none."""
    n_hat = D_hat.shape[0]
    sigma = slot_relabelling(D_hat, M_hat, slot_atoms)
    rows = match(D_hat, slot_atoms[sigma[0]], signed=True).learned
    out = torch.full(slot_atoms.shape[:2], -1, dtype=torch.long)
    for s, t in enumerate(sigma):
        out[t] = torch.where(rows >= 0, s * n_hat + rows, -1)
    return out


def match_latents(W: torch.Tensor, slot_atoms: torch.Tensor, min_cos: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each true (slot, atom) one decoder row of any SAE (Hungarian on signed cos, since
    codes are non-negative). Returns latent (S, n) with -1 where the best cos < min_cos, and cos."""
    S, n, d = slot_atoms.shape
    m = match(W, slot_atoms.reshape(S * n, d), signed=True)
    latent = torch.where(m.sim >= min_cos, m.learned, -1)
    return latent.reshape(S, n), m.sim.reshape(S, n)


# -- codes ----------------------------------------------------------------------------------------
def _acts(codes: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """(B, S, n) activation of the latent standing for each (slot, atom); 0 where none."""
    a = codes[:, latent.clamp_min(0)]
    return torch.where(latent >= 0, a, torch.zeros_like(a))


@dataclass
class BindingAccuracy:
    detection: float      # present (slot, atom) pairs whose atom fires in some slot's latent
    slot: float           # of those detected, the share put in the right slot
    exact: float          # samples whose every present pair is detected in its right slot


def binding_accuracy(codes: torch.Tensor, coefs: torch.Tensor, latent: torch.Tensor,
                     pairs: torch.Tensor | None = None) -> BindingAccuracy:
    """A present pair (s, a) is bound correctly when the latent for (s, a) fires and fires more than
    the latent for (s', a) of every slot s' where atom a is absent. `pairs` (S, n) bool restricts
    the detection/slot scores to those pairs (e.g. held-out ones); `exact` always uses all."""
    act = _acts(codes, latent)
    present = coefs > 0
    rival = act.masked_fill(present, float("-inf")).amax(dim=1, keepdim=True)   # (B, 1, n)
    correct = present & (act > 0) & (act > rival)
    detected = present & (act.amax(dim=1, keepdim=True) > 0)
    exact = (correct == present).all(dim=2).all(dim=1).float().mean()
    if pairs is not None:
        correct, detected, present = correct & pairs, detected & pairs, present & pairs
    return BindingAccuracy(float(detected.sum() / present.sum().clamp_min(1)),
                           float(correct.sum() / detected.sum().clamp_min(1)),
                           float(exact))


def swap_discrimination(codes_a: torch.Tensor, codes_b: torch.Tensor, coefs_a: torch.Tensor,
                        coefs_b: torch.Tensor, latent: torch.Tensor) -> float:
    """P(the codes of a scene score its own description above the swapped one), averaged over both
    members of each pair; ties count ½. A bag of concepts scores 0.5."""
    def score(coefs, codes):
        return ((coefs > 0).float() * _acts(codes, latent)).sum(dim=(1, 2))

    def win(d):
        return ((d > 0).float() + 0.5 * (d == 0).float()).mean()

    d1 = score(coefs_a, codes_a) - score(coefs_b, codes_a)
    d2 = score(coefs_b, codes_b) - score(coefs_a, codes_b)
    return float((win(d1) + win(d2)) / 2)


# -- transforms -----------------------------------------------------------------------------------
def transfer(D_hat: torch.Tensor, M_hat: torch.Tensor, slot_atoms: torch.Tensor,
             pairs: torch.Tensor) -> torch.Tensor:
    """cos(M̂_s d̂_a, M_t d_a) for each true pair (t, a) in `pairs` (S, n) bool, under the best slot
    relabelling σ (learned s = σ⁻¹(t)) and d̂_a = the D̂ row matched to atom a in learned slot 1's
    frame. On held-out pairs this is the only fair test of M̂: M is pinned down only where the data
    constrains it. D̂ may have more rows than atoms (e.g. a standard SAE's whole decoder)."""
    sigma = slot_relabelling(D_hat, M_hat, slot_atoms)
    rows = match(D_hat, slot_atoms[sigma[0]], signed=True).learned
    inv = {t: s for s, t in enumerate(sigma)}
    out = []
    for t, a in pairs.nonzero().tolist():
        if rows[a] < 0:                 # fewer learned rows than atoms: nothing to transfer
            out.append(torch.tensor(0.0))
            continue
        pred = M_hat[inv[t]] @ D_hat[rows[a]]
        out.append(cosines(pred[None], slot_atoms[t, a][None])[0, 0])
    return torch.stack(out) if out else torch.zeros(0)


def coverage(W: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Best cos of any dictionary row with each target vector (no matching): whether a model has a
    direction for, e.g., a held-out effective atom M_t d_a at all."""
    return cosines(W, vectors).amax(dim=0)


def map_nontriviality(D_hat: torch.Tensor, M_hat: torch.Tensor) -> float:
    """Truth-free: mean over atoms and slots s ≥ 2 of 1 − cos(M̂_s d̂, d̂). Near 0 when the learned
    maps are (multiples of) the identity — the model claims no matrix binding."""
    if M_hat.shape[0] < 2:
        return 0.0
    D = D_hat.double()
    vals = [1 - torch.nn.functional.cosine_similarity(D @ M_hat[s].double().T, D, dim=1).mean()
            for s in range(1, M_hat.shape[0])]
    return float(torch.stack(vals).mean())


# -- reconstruction -------------------------------------------------------------------------------
def l0(codes: torch.Tensor) -> float:
    return float((codes != 0).float().sum(1).mean())


def dead_fraction(codes: torch.Tensor) -> float:
    """Share of latents that never fire on these codes."""
    return float(((codes != 0).sum(0) == 0).float().mean())
