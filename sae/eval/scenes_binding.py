"""The scenes model's binding, read through an SAE: probes from codes, the swap test, causal edits.

    python -m sae.eval.scenes_binding RUN_DIR [RUN_DIR ...] --out results/scenes_binding.json
    res = evaluate_sae(sae_model, scenes_model, n_train=4000, n_eval=1000, seed=0)     # library

The shipped scenes model (sae/scenes_model.py) reads a scene only through x = the residual
blocks.1.hook_resid_post at SEP_POS (checked there: patching, ablation, probes). An SAE trained on
that hook gives codes z = encode(x) and x_hat = decode(z). Everything below is measured on x at
SEP_POS of freshly sampled scenes (seeds derived from `seed`); "spliced" means the model is rerun
with the SEP residual overwritten. Test-split scenes unless said otherwise; edits never create a
held-out colour-shape conjunction.

probes      linear (multinomial logistic) probes, one per (object s, attribute), fitted on
            "train" scenes from the codes z, and from the residual x as the reference row.
              test            mean accuracy of the 9 probes on "test" scenes (per probe in the JSON)
              heldout_object  per attribute, accuracy on the one held-out-conjunction object of
                              each "heldout" scene (read by that object's slot's probe)
              heldout_all     mean accuracy over every object of the heldout scenes
            Codes scoring below the residual row lost something the residual linearly has; the
            "reconstruction" row (probes from x_hat, linear in z) tells whether the loss is in what
            the SAE reconstructs at all or only in how the probe reads z.
swap        pairs (A, B), B = A with the colours of objects s and t swapped. The same three prompts
            go to both ("the {shape_s} is", "the {colour_s} one is a", "the {ordinal_t} one is"),
            and every answer differs between A and B.
              codes_differ    share of pairs with cos(z_A, z_B) < 0.99 (residual row: cos of x
                              centred by its train mean); mean_cos beside it
              acc             answer accuracy over both scenes, SEP residual spliced as: clean
                              (none), sae (x_hat), sae_err (x_hat + (x - x_hat): must equal clean)
              both_right      share of (prompt, pair) answered right in A AND in B: a code that is
                              the same bag of concepts for A and B answers both alike, so scores 0
              code_swap       decode(z_B) + (x_A - x_hat_A) spliced into A: accuracy against B's
                              answers (is the swap carried by the codes, not the error term?)
edits       causal edits through the SAE with the error term held fixed: x' = decode(z') + (x - x_hat).
            lat(s, c) = argmax over latents of mean(z | object s is colour c) - mean(z | it is not),
            on train scenes: the same data-driven lookup ("data") for every SAE. A BindingSAE also
            gets its own claim ("binding"): latent (sigma(s), atom(c)), sigma(s) = the SAE slot that
            holds most of lat(s, .), atom(c) = the atom whose activation summed over slots best
            tracks "some object is c" (slot index is not assumed to be object index).
              recolour        object s: colour c -> c' absent from the scene. z[lat(s,c)] -> 0 and
                              z[lat(s,c')] = the removed value ("moved") or the mean of z[lat(s,c')]
                              on train scenes where object s is c' ("mean_on")
              swap            objects s and t trade colours: lat(s,c_s), lat(t,c_t) -> 0 and
                              lat(s,c_t), lat(t,c_s) set: "moved" = each object keeps its value
                              (as recolour), "carried" = each colour's value goes with it (for the
                              binding lookup: the same atom moved into the other object's slot),
                              or "mean_on"
              flip            share of colour queries about the edited objects ("the first one is",
                              "the {shape} is") answering the new colour
              by_colour       share of queries naming an edited object by its new colour ("the {c'}
                              one is a"; recolour also "... made of") answered with its shape/material
              specificity     share of unrelated queries (other objects' attributes; the edited
                              objects' shape and material by slot or shape) whose answer equals the
                              unedited model's
            Expected answers are the truly edited scene's. Controls: residual = the x of the truly
            edited scene (rerun through the model) patched in (the ceiling, ~1); sae_codes =
            decode(z of the truly edited scene) + the original error term (the SAE's own encoding
            of the edit); none = no edit (flip 0, specificity 1).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.core.architectures.binding import BindingSAE
from sae.core.config import argument, option, parse_config
from sae.core.files import write_result
from sae.core.io import load
from sae.core.metrics import fvu
from sae.eval.probes import fit_scene_probes, scene_heads
from sae.lm import scenes
from sae.lm.scenes import ATTRIBUTES, COLOURS, HELDOUT_CONJUNCTIONS, N_QUERIES, Scene, SceneObject
from sae.lm.scenes_model import (BOTTLENECK_HOOK, hook_of, load_scenes_model, patch_sep, query_logits, slice_batch,
                                 world_of)
from sae.lm.splice import resolve_sae_dir

D_MODEL = 64  # the shipped scenes model's width (sae/assets/scenes_model.json)
COS_DIFFER = 0.99  # codes "differ" below this cosine: well above float noise, below any real change
CHUNK = 1000  # scenes per forward pass


# -----------------------------------------------------------------------------
# the model at SEP_POS

@torch.no_grad()
def sep_residuals(model, tokens: torch.Tensor) -> torch.Tensor:
    """(N, d_model) residual at the separator after the bottleneck block (the model's own: hook_of)."""
    out, hook, pos = [], hook_of(model), world_of(model).sep_pos
    for i in range(0, len(tokens), CHUNK):
        _, cache = model.run_with_cache(tokens[i:i + CHUNK].to(model.cfg.device), names_filter=lambda n: n == hook)
        out.append(cache[hook][:, pos].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def predict(model, batch: scenes.SceneBatch, sep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, N_QUERIES) argmax answers; with `sep` (N, d_model) that vector replaces the SEP residual."""
    out, hook, pos = [], hook_of(model), world_of(model).sep_pos
    for i in range(0, len(batch), CHUNK):
        part = slice_batch(batch, slice(i, i + CHUNK))
        hooks = [(hook, patch_sep(sep[i:i + CHUNK], pos))] if sep is not None else []
        out.append(query_logits(model, part, hooks).argmax(-1).cpu())
    return torch.cat(out)


class Codec:
    """The SAE in residual units. SAEs saved by sae.train have their activation scale folded into
    the weights (scale 1, as eval/splice.py's CLI uses them); a mid-training one needs its scale."""

    def __init__(self, sae, scale: float = 1.0):
        self.sae, self.scale = sae, scale
        self.device = next(sae.parameters()).device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.sae.encode(x[i:i + 4096].to(self.device) * self.scale).float().cpu()
                          for i in range(0, len(x), 4096)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([(self.sae.decode(z[i:i + 4096].to(self.device)) / self.scale).float().cpu()
                          for i in range(0, len(z), 4096)])


# -----------------------------------------------------------------------------
# probes

def probe_scores(predict_fn, test: tuple, held: tuple) -> dict:
    """Accuracies of fitted probes (see module doc) on test and heldout (features, batch) pairs."""
    (x_test, b_test), (x_held, b_held) = test, held
    res = {"test": {}, "heldout_object": {}, "heldout_all": {}}
    pred, truth = predict_fn(x_test), b_test.attributes
    for s, a in scene_heads(truth.shape[1]):
        m = truth[:, s, a] >= 0
        res["test"][f"{ATTRIBUTES[a]}@{s}"] = (pred[m, s, a] == truth[m, s, a]).float().mean().item()
    res["test_mean"] = sum(res["test"].values()) / len(res["test"])
    pred, truth = predict_fn(x_held), b_held.attributes
    held_slot = b_held.slots[:, 0]  # every heldout query asks about the held-out conjunction object
    rows = torch.arange(len(b_held))
    present = truth >= 0
    for a, attr in enumerate(ATTRIBUTES):
        res["heldout_object"][attr] = (pred[rows, held_slot, a] == truth[rows, held_slot, a]).float().mean().item()
        m = present[:, :, a]
        res["heldout_all"][attr] = (pred[:, :, a][m] == truth[:, :, a][m]).float().mean().item()
    res["heldout_all_mean"] = (pred[present] == truth[present]).float().mean().item()
    return res


# -----------------------------------------------------------------------------
# query sets: many chosen queries per scene, three to a sequence

@dataclass
class QuerySet:
    batch: scenes.SceneBatch  # rows: a base scene's tokens with three of its chosen queries
    base: torch.Tensor  # (R,) the base scene of each row
    group: torch.Tensor  # (R, N_QUERIES) group id per query, -1 = padding


def build_queries(bases: list[Scene], specs: list[list[tuple[scenes.Query, int]]],
                  world: scenes.World = scenes.DEFAULT_WORLD) -> QuerySet:
    """Query blocks never see each other and the scene reaches them only through SEP_POS, so a
    scene's queries can be spread over as many sequences as needed. A query's answer (in the
    batch) is the answer expected after the edit it is built for."""
    rows, base, group = [], [], []
    for i, (sc, qs) in enumerate(zip(bases, specs)):
        for j in range(0, len(qs), N_QUERIES):
            chunk = qs[j:j + N_QUERIES]
            chunk = chunk + [(chunk[-1][0], -1)] * (N_QUERIES - len(chunk))
            rows.append(Scene(sc.objects, sc.relations, tuple(q for q, _ in chunk)))
            base.append(i)
            group.append([g for _, g in chunk])
    return QuerySet(scenes.encode_scenes(rows, world), torch.tensor(base), torch.tensor(group))


FLIP, BY_COLOUR, UNRELATED = 0, 1, 2
GROUPS = {"flip": FLIP, "by_colour": BY_COLOUR, "unrelated": UNRELATED}


def _q(objects, kind, slot, group):
    return scenes.make_query(objects, kind, slot), group


def recolour_specs(old: tuple, new: tuple, s: int) -> list:
    """Queries for recolouring object s (old -> new objects): its colour, it named by the new
    colour (expected answers from `new`), and everything else (expected: unchanged)."""
    qs = [_q(new, "colour_by_slot", s, FLIP), _q(new, "colour", s, FLIP),
          _q(new, "shape", s, BY_COLOUR), _q(new, "material_by_colour", s, BY_COLOUR)]
    for t in range(len(old)):
        kinds = ("shape_by_slot", "material_by_slot", "material_by_shape") if t == s else \
            ("colour_by_slot", "colour", "shape_by_slot", "material_by_slot")
        qs += [_q(old, k, t, UNRELATED) for k in kinds]
    return qs


def swap_specs(old: tuple, new: tuple, s: int, t: int) -> list:
    qs = []
    for u in (s, t):
        qs += [_q(new, "colour_by_slot", u, FLIP), _q(new, "colour", u, FLIP), _q(new, "shape", u, BY_COLOUR)]
    for u in range(len(old)):
        qs += [_q(old, k, u, UNRELATED) for k in ("shape_by_slot", "material_by_slot", "material_by_shape")]
        if u not in (s, t):
            qs += [_q(old, k, u, UNRELATED) for k in ("colour_by_slot", "colour")]
    return qs


def _allowed(obj: SceneObject) -> bool:
    return (obj.colour, obj.shape) not in HELDOUT_CONJUNCTIONS


def with_colour(objects: tuple, slot: int, colour: str) -> tuple:
    o = objects[slot]
    return objects[:slot] + (SceneObject(colour, o.material, o.shape),) + objects[slot + 1:]


def sample_edits(n: int, seed: int, world: scenes.World = scenes.DEFAULT_WORLD):
    """n test scenes, each with a recolour (s, c') and, where one exists, a colour swap (s, t) that
    creates no held-out conjunction (so the edited scene is one the model answers well)."""
    rng = random.Random(f"scenes_binding/edits/{seed}")
    bases = world.sample_scenes(n, seed, "test")
    recol, swaps = [], []
    for i, sc in enumerate(bases):
        objs = sc.objects
        s = rng.randrange(len(objs))
        used = {o.colour for o in objs}
        options = [c for c in COLOURS if c not in used and _allowed(SceneObject(c, "", objs[s].shape))]
        c_new = rng.choice(options)
        recol.append((s, c_new, with_colour(objs, s, c_new)))
        pairs = [(a, b) for a in range(len(objs)) for b in range(a + 1, len(objs))
                 if _allowed(SceneObject(objs[b].colour, "", objs[a].shape))
                 and _allowed(SceneObject(objs[a].colour, "", objs[b].shape))]
        if pairs:
            a, b = rng.choice(pairs)
            swaps.append((i, a, b, with_colour(with_colour(objs, a, objs[b].colour), b, objs[a].colour)))
    return bases, recol, swaps


# -----------------------------------------------------------------------------
# colour latents, from data

def colour_index(attributes: torch.Tensor) -> torch.Tensor:
    return attributes[:, :, ATTRIBUTES.index("colour")]  # (N, max_objects), -1 = no object


def colour_latents(z: torch.Tensor, attributes: torch.Tensor) -> dict:
    """lat[s, c] = the latent whose mean activation rises most when object s has colour c (vs not),
    its score (that rise), and mean_on[s, c] = mean of z[:, lat] on rows where object s is c."""
    col = colour_index(attributes)
    S, C = col.shape[1], len(COLOURS)
    lat = torch.zeros(S, C, dtype=torch.long)
    score = torch.zeros(S, C)
    for s in range(S):
        for c in range(C):
            m = col[:, s] == c
            if not m.any() or m.all():
                continue
            diff = z[m].mean(0) - z[~m].mean(0)
            lat[s, c] = diff.argmax()
            score[s, c] = diff.max()
    return {"lat": lat, "score": score, "mean_on": mean_on_values(z, col, lat)}


def mean_on_values(z: torch.Tensor, col: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lat.shape)
    for s in range(lat.shape[0]):
        for c in range(lat.shape[1]):
            m = col[:, s] == c
            out[s, c] = z[m, lat[s, c]].mean() if m.any() else 0.0
    return out


def binding_latents(z: torch.Tensor, attributes: torch.Tensor, data_lat: torch.Tensor, n_slots: int,
                    n_latents: int) -> dict:
    """The BindingSAE's own claim as latents: (sigma(s), atom(c)) -> flat index sigma * n + atom."""
    col = colour_index(attributes)
    pooled = z.reshape(len(z), n_slots, n_latents).sum(1)  # an atom's activation in any slot
    atom = torch.zeros(len(COLOURS), dtype=torch.long)
    for c in range(len(COLOURS)):
        m = (col == c).any(1)
        atom[c] = (pooled[m].mean(0) - pooled[~m].mean(0)).argmax()
    votes = torch.zeros(col.shape[1], n_slots, dtype=torch.long)
    for s in range(col.shape[1]):
        votes[s] = torch.bincount(data_lat[s] // n_latents, minlength=n_slots)
    sigma = votes.argmax(1)
    lat = sigma[:, None] * n_latents + atom[None, :]
    return {"lat": lat, "sigma": sigma, "atom": atom, "votes": votes, "mean_on": mean_on_values(z, col, lat)}


def apply_moves(z: torch.Tensor, remove: torch.Tensor, add: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """z with, per row i, latents remove[i, :] set to 0, then add[i, j] set to value[i, j]."""
    z = z.clone()
    rows = torch.arange(len(z))[:, None]
    z[rows.expand_as(remove), remove] = 0.0
    z[rows.expand_as(add), add] = value
    return z


# -----------------------------------------------------------------------------
# the evaluation

def _acc(pred, truth, mask=None):
    ok = pred == truth
    return ok[mask].float().mean().item() if mask is not None else ok.float().mean().item()


def _edit_scores(pred: torch.Tensor, qs: QuerySet, clean_pred: torch.Tensor, kinds: tuple = scenes.KIND_NAMES) -> dict:
    """Scores over the queries of `kinds` (the kinds the model was trained on: the world's mix)."""
    trained = torch.isin(qs.batch.kinds, torch.tensor([scenes.KIND_NAMES.index(k) for k in kinds]))
    g = torch.where(trained, qs.group, torch.full_like(qs.group, -1))
    out = {}
    for name, gid in GROUPS.items():
        m = g == gid
        if not m.any():
            continue
        if gid == UNRELATED:  # unchanged relative to the unedited model
            out["specificity"] = _acc(pred, clean_pred, m)
            out["unrelated_acc"] = _acc(pred, qs.batch.answers, m)
        else:
            out[name] = _acc(pred, qs.batch.answers, m)
    flip = g == FLIP
    for kind in ("colour_by_slot", "colour"):  # the two ways of asking for a colour
        k = scenes.KIND_NAMES.index(kind)
        out[f"flip_{kind}"] = _acc(pred, qs.batch.answers, flip & (qs.batch.kinds == k))
    return out


def swap_test(scenes_model, codec: Codec, bases: list[Scene], swaps: list, mu: torch.Tensor) -> dict:
    """Section 2 of the module doc; `mu` centres the residual for its cosine."""
    A_sc, B_sc = [], []
    for i, s, t, new in swaps:
        old, rel = bases[i].objects, bases[i].relations
        # identical prompts in A and B, every answer different: "the {shape_s} is", "the {colour_s}
        # one is a" (object t in B), "the {ordinal_t} one is"
        A_sc.append(Scene(old, rel, (scenes.make_query(old, "colour", s), scenes.make_query(old, "shape", s),
                                     scenes.make_query(old, "colour_by_slot", t))))
        B_sc.append(Scene(new, rel, (scenes.make_query(new, "colour", s), scenes.make_query(new, "shape", t),
                                     scenes.make_query(new, "colour_by_slot", t))))
    world = world_of(scenes_model)
    A, B = scenes.encode_scenes(A_sc, world), scenes.encode_scenes(B_sc, world)
    prompts_a, prompts_b = A.tokens.scatter(1, A.answer_pos, 0), B.tokens.scatter(1, B.answer_pos, 0)
    assert torch.equal(prompts_a[:, world.sep_pos + 1:], prompts_b[:, world.sep_pos + 1:])
    assert bool((A.answers != B.answers).all()), "a swap-test answer is the same in A and B"
    xa, xb = sep_residuals(scenes_model, A.tokens), sep_residuals(scenes_model, B.tokens)
    za, zb = codec.encode(xa), codec.encode(xb)
    xha, xhb = codec.decode(za), codec.decode(zb)
    cos_z = F.cosine_similarity(za, zb, dim=1)
    cos_x = F.cosine_similarity(xa - mu, xb - mu, dim=1)  # uncentred, the shared mean would dominate
    out = {"n_pairs": len(A), "cos_threshold": COS_DIFFER,
           "codes_differ": (cos_z < COS_DIFFER).float().mean().item(), "codes_mean_cos": cos_z.mean().item(),
           "codes_same_support": ((za > 0) == (zb > 0)).all(1).float().mean().item(),
           "residual_differ": (cos_x < COS_DIFFER).float().mean().item(), "residual_mean_cos": cos_x.mean().item()}
    for cond, (sa, sb) in {"clean": (None, None), "sae": (xha, xhb),
                           "sae_err": (xha + (xa - xha), xhb + (xb - xhb))}.items():
        pa, pb = predict(scenes_model, A, sa), predict(scenes_model, B, sb)
        ra, rb = pa == A.answers, pb == B.answers
        out[cond] = {"acc": torch.cat([ra, rb]).float().mean().item(), "both_right": (ra & rb).float().mean().item(),
                     "same_answer": (pa == pb).float().mean().item()}
    for cond, sep in (("code_swap", codec.decode(zb) + (xa - xha)), ("residual_swap", xb)):
        pred = predict(scenes_model, A, sep)
        out[cond] = {"acc_vs_B": _acc(pred, B.answers), "still_A": _acc(pred, A.answers)}
    return out


def latent_lookups(sae_model, z: torch.Tensor, attributes: torch.Tensor) -> tuple[dict, dict]:
    """The latent lookups (module doc) and a JSON summary of each."""
    lookups = {"data": colour_latents(z, attributes)}
    if isinstance(sae_model, BindingSAE):
        lookups["binding"] = binding_latents(z, attributes, lookups["data"]["lat"], sae_model.cfg.n_slots,
                                             sae_model.cfg.n_latents)
    info = {}
    for name, lk in lookups.items():
        lat = lk["lat"]
        # a bag code names "red" by one latent whatever the object: colours whose best latent is
        # the same for objects 0 and 1
        info[name] = {"latents": lat.tolist(), "shared_across_objects": (lat[0] == lat[1]).float().mean().item(),
                      "distinct_latents": int(lat.unique().numel())}
        if name == "data":
            info[name]["mean_score"] = lk["score"].mean().item()
        else:
            info[name].update(sigma=lk["sigma"].tolist(), atom=lk["atom"].tolist(), slot_votes=lk["votes"].tolist())
    return lookups, info


COLOUR_ID = {c: k for k, c in enumerate(COLOURS)}


def recolour_edits(scenes_model, codec: Codec, bases: list[Scene], recol: list, lookups: dict,
                   x_base: torch.Tensor) -> dict:
    z_base = codec.encode(x_base)
    err = x_base - codec.decode(z_base)  # held fixed through every edit
    s = torch.tensor([s for s, _, _ in recol])
    c_old = torch.tensor([COLOUR_ID[sc.objects[s].colour] for sc, (s, _, _) in zip(bases, recol)])
    c_new = torch.tensor([COLOUR_ID[c] for _, c, _ in recol])
    world = world_of(scenes_model)
    x_true = sep_residuals(scenes_model, scenes.encode_scenes(
        [Scene(new, sc.relations, sc.queries) for sc, (_, _, new) in zip(bases, recol)], world).tokens)
    qs = build_queries(bases, [recolour_specs(sc.objects, new, s) for sc, (s, _, new) in zip(bases, recol)], world)
    conds = {"none": x_base, "residual": x_true, "sae_codes": codec.decode(codec.encode(x_true)) + err}
    extra = {}
    for name, lk in lookups.items():
        old_l, new_l = lk["lat"][s, c_old], lk["lat"][s, c_new]
        moved = z_base[torch.arange(len(bases)), old_l]
        extra[name] = {"removed_latent_active": (moved > 0).float().mean().item(),
                       "same_latent": (old_l == new_l).float().mean().item()}
        for mode, val in (("moved", moved), ("mean_on", lk["mean_on"][s, c_new])):
            conds[f"{name}/{mode}"] = codec.decode(apply_moves(z_base, old_l[:, None], new_l[:, None], val[:, None])) + err
    return _run_edits(scenes_model, qs, conds, {"n_scenes": len(bases), "n_rows": len(qs.base), "lookup": extra})


def swap_edits(scenes_model, codec: Codec, bases: list[Scene], swaps: list, lookups: dict,
               x_base: torch.Tensor) -> dict:
    idx = torch.tensor([i for i, *_ in swaps])
    sw_bases = [bases[i] for i in idx.tolist()]
    x_base = x_base[idx]
    z_base = codec.encode(x_base)
    err = x_base - codec.decode(z_base)
    s, t = torch.tensor([s for _, s, _, _ in swaps]), torch.tensor([t for _, _, t, _ in swaps])
    cs = torch.tensor([COLOUR_ID[bases[i].objects[s].colour] for i, s, _, _ in swaps])
    ct = torch.tensor([COLOUR_ID[bases[i].objects[t].colour] for i, _, t, _ in swaps])
    world = world_of(scenes_model)
    x_true = sep_residuals(scenes_model, scenes.encode_scenes(
        [Scene(new, bases[i].relations, bases[i].queries) for i, _, _, new in swaps], world).tokens)
    qs = build_queries(sw_bases, [swap_specs(bases[i].objects, new, s, t) for i, s, t, new in swaps], world)
    conds = {"none": x_base, "residual": x_true, "sae_codes": codec.decode(codec.encode(x_true)) + err}
    extra = {}
    for name, lk in lookups.items():
        lat = lk["lat"]
        remove = torch.stack([lat[s, cs], lat[t, ct]], 1)
        add = torch.stack([lat[s, ct], lat[t, cs]], 1)
        removed = z_base.gather(1, remove)  # values of lat(s, c_s) and lat(t, c_t)
        values = {"moved": removed, "carried": removed.flip(1),
                  "mean_on": torch.stack([lk["mean_on"][s, ct], lk["mean_on"][t, cs]], 1)}
        extra[name] = {"removed_latents_active": (removed > 0).float().mean().item(),
                       # the same latents before and after: "carried" is then no edit at all
                       "same_latent_set": (remove.sort(1).values == add.sort(1).values).all(1).float().mean().item()}
        for mode, val in values.items():
            conds[f"{name}/{mode}"] = codec.decode(apply_moves(z_base, remove, add, val)) + err
    return _run_edits(scenes_model, qs, conds, {"n_scenes": len(swaps), "n_rows": len(qs.base), "lookup": extra})


def _run_edits(scenes_model, qs: QuerySet, conds: dict, out: dict) -> dict:
    """Scores per condition; `conds` maps a name to one SEP vector per base scene."""
    clean, kinds = predict(scenes_model, qs.batch), world_of(scenes_model).kinds
    for name, sep in conds.items():
        out[name] = _edit_scores(predict(scenes_model, qs.batch, sep[qs.base]), qs, clean, kinds)
    return out


@torch.no_grad()
def evaluate_sae(sae_model, scenes_model, n_train: int = 4000, n_eval: int = 1000, seed: int = 0,
                 scale: float = 1.0, probe_steps: int = 600, progress: bool = False,
                 residual_probes: bool = True) -> dict:
    """Probes, swap test and causal edits (module doc) for one SAE on the scenes bottleneck of
    `scenes_model` (its world and bottleneck hook: world_of, hook_of).
    `scale`: what the SAE multiplies its input by (1 for SAEs saved by sae.train: folded in).
    residual_probes=False skips the residual reference row (the same for every SAE of one model)."""
    world, d_model = world_of(scenes_model), scenes_model.cfg.d_model
    if sae_model.d_in != d_model:
        raise ValueError(f"the SAE has d_in={sae_model.d_in}; the scenes bottleneck has {d_model}")
    was_training = sae_model.training
    sae_model.eval()
    codec = Codec(sae_model, scale)
    bar = tqdm(total=5, desc="scenes binding", disable=not progress, dynamic_ncols=True)
    try:
        # seeds apart from the SAE's training cache (train split, seed 0) and from each other
        train = world.sample_batch(n_train, 1000 + seed, "train")
        test = world.sample_batch(n_eval, 2000 + seed, "test")
        held = world.sample_batch(n_eval, 3000 + seed, "heldout")
        x = {k: sep_residuals(scenes_model, b.tokens) for k, b in (("train", train), ("test", test), ("heldout", held))}
        z = {k: codec.encode(v) for k, v in x.items()}
        xhat = {k: codec.decode(v) for k, v in z.items()}

        # reconstruction and plain splice on test scenes (context for everything after)
        xt, xh = x["test"], xhat["test"]
        recon = {"fvu": fvu(xt, xh),
                 "l0": (z["test"] > 0).sum(1).float().mean().item(),
                 "latents_used": int((z["train"] > 0).any(0).sum()), "n_latents_total": z["train"].shape[1],
                 "acc_clean": _acc(predict(scenes_model, test), test.answers),
                 "acc_sae": _acc(predict(scenes_model, test, xh), test.answers),
                 "acc_sae_err": _acc(predict(scenes_model, test, xh + (xt - xh)), test.answers)}
        bar.update()

        probes = {}
        rows = (("residual", x),) * residual_probes + (("codes", z), ("reconstruction", xhat))
        for name, feats in rows:
            with torch.enable_grad():
                fn = fit_scene_probes(feats["train"], train.attributes, steps=probe_steps)
            probes[name] = probe_scores(fn, (feats["test"], test), (feats["heldout"], held))
        bar.update()

        bases, recol, swaps = sample_edits(n_eval, 4000 + seed, world)
        swap = swap_test(scenes_model, codec, bases, swaps, x["train"].mean(0))
        bar.update()

        lookups, lookup_info = latent_lookups(sae_model, z["train"], train.attributes)
        x_base = sep_residuals(scenes_model, scenes.encode_scenes(bases, world).tokens)
        edits = {"recolour": recolour_edits(scenes_model, codec, bases, recol, lookups, x_base)}
        bar.update()
        edits["swap"] = swap_edits(scenes_model, codec, bases, swaps, lookups, x_base)
        bar.update()
    finally:
        bar.close()
        sae_model.train(was_training)
    return {"sae": describe_sae(sae_model), "n_train": n_train, "n_eval": n_eval, "seed": seed, "scale": scale,
            "reconstruction": recon, "probes": probes, "swap": swap, "latent_lookup": lookup_info, "edits": edits}


def describe_sae(m) -> dict:
    cfg = m.cfg
    out = {"architecture": m.architecture, "class": type(m).__name__, "d_in": m.d_in, "n_total": m.n_total}
    for k in ("n_latents", "n_slots", "k", "sparsity", "slot_transform"):
        if hasattr(cfg, k):
            out[k] = getattr(cfg, k)
    return out


# -----------------------------------------------------------------------------
# command line

def load_run(path: str):
    """(sae, info) for a run directory (sae/cfg.json) or a dictionary directory (cfg.json), checked
    to be an SAE on the scenes bottleneck; ValueError with one line otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{path}: no such directory")
    sae_dir = resolve_sae_dir(p)
    meta = json.loads((sae_dir / "cfg.json").read_text()).get("metadata", {})
    model, hook = meta.get("model_name"), meta.get("hook_name")
    if model not in (None, "scenes") or hook not in (None, BOTTLENECK_HOOK):
        raise ValueError(f"{path}: trained on {model!r} {hook!r}, not the scenes model's {BOTTLENECK_HOOK}")
    m = load(sae_dir)
    if m.d_in != D_MODEL:
        raise ValueError(f"{path}: the SAE has d_in={m.d_in}; the scenes bottleneck has d_model={D_MODEL}")
    info = {"path": str(p), "sae_dir": str(sae_dir)}
    run = sae_dir.parent if sae_dir.name == "sae" else None
    if run is not None and (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
        info["train_metrics"] = {k: metrics[k] for k in ("fvu", "l0", "dead_share", "steps", "activation_scale",
                                                         "rebind_pairs", "rebind_fallback", "tie_cost", "slot_usage")
                                 if k in metrics}
    if run is not None and (run / "config.json").is_file():
        cache = json.loads((run / "config.json").read_text()).get("data", {}).get("cache")
        manifest = Path(cache) / "manifest.json" if cache else None
        if manifest is not None and manifest.is_file():
            man = json.loads(manifest.read_text())
            info["trained_on"] = {"cache": cache, "positions": man.get("positions"), "source": man.get("source")}
    return m, info


def _f(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(results: dict) -> str:
    """Two Markdown tables: reconstruction, probes and swap test; then the causal edits."""
    first = next(iter(results.values()))
    r, sw = first["probes"]["residual"], first["swap"]
    lines = ["| SAE | FVU | splice acc | probe test: z / x_hat | heldout obj colour / shape: z | codes differ "
             "| swap acc: sae | both right: sae | code swap → B |", "|---" * 9 + "|",
             f"| residual (reference) | 0 | {_f(first['reconstruction']['acc_clean'])} | {_f(r['test_mean'])} | "
             f"{_f(r['heldout_object']['colour'])} / {_f(r['heldout_object']['shape'])} | {_f(sw['residual_differ'])} | "
             f"{_f(sw['clean']['acc'])} | {_f(sw['clean']['both_right'])} | {_f(sw['residual_swap']['acc_vs_B'])} |"]
    for name, res in results.items():
        p, ph, s = res["probes"]["codes"], res["probes"]["reconstruction"], res["swap"]
        lines.append(f"| {name} | {_f(res['reconstruction']['fvu'])} | {_f(res['reconstruction']['acc_sae'])} | "
                     f"{_f(p['test_mean'])} / {_f(ph['test_mean'])} | {_f(p['heldout_object']['colour'])} / "
                     f"{_f(p['heldout_object']['shape'])} | {_f(s['codes_differ'])} | {_f(s['sae']['acc'])} | "
                     f"{_f(s['sae']['both_right'])} | {_f(s['code_swap']['acc_vs_B'])} |")
    lines += ["", "| SAE | edit | condition | flip | by colour | specificity |", "|---" * 6 + "|"]
    for name, res in [("residual (control)", first), *results.items()]:
        for edit in ("recolour", "swap"):
            e = res["edits"][edit]
            # conditions are the dict-valued entries; "none" is the trivial flip 0, specificity 1
            conds = ["residual"] if res is first and name.startswith("residual") else \
                [c for c in e if isinstance(e[c], dict) and "flip" in e[c] and c not in ("none", "residual")]
            for c in conds:
                lines.append(f"| {name} | {edit} | {c} | {_f(e[c]['flip'])} | {_f(e[c].get('by_colour'))} | "
                             f"{_f(e[c]['specificity'])} |")
    return "\n".join(lines)


@dataclass
class ScenesBindingConfig:
    runs: list[str] = argument("run directories (sae/cfg.json) or dictionary directories (cfg.json)")
    out: str = option("", "write the results as JSON here ('' = print only)")
    n_train: int = option(4000, "train scenes for probes and latent lookup")
    n_eval: int = option(1000, "scenes per evaluation set")
    seed: int = option(0, "seed of the scenes drawn")
    threads: int = option(1, "CPU threads for torch (0 = torch's default)")


def main(argv=None) -> int:
    args = parse_config(ScenesBindingConfig, argv, "python -m sae.eval.scenes_binding", __doc__.split("\n\n")[0],
                        positional=("runs",))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if args.n_train < 100 or args.n_eval < 10:
            raise ValueError("--n-train must be >= 100 and --n-eval >= 10")
        loaded = [load_run(r) for r in args.runs]  # every run is checked before the slow part
        model = load_scenes_model()
        results, t0 = {}, time.time()
        for m, info in loaded:
            t = time.time()
            res = evaluate_sae(m, model, args.n_train, args.n_eval, args.seed, progress=True)
            res.update(run=info, seconds=round(time.time() - t, 1))
            name = Path(info["path"]).name
            results[name if name not in results else info["path"]] = res
    except (ValueError, OSError) as e:  # sae.core.io.LoadError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        cmd = "python -m sae.eval.scenes_binding " + " ".join(sys.argv[1:] if argv is None else argv)
        write_result(Path(args.out), {"command": cmd, "hook": BOTTLENECK_HOOK, "sep_position": scenes.SEP_POS,
                                    "seconds": round(time.time() - t0, 1), "runs": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
