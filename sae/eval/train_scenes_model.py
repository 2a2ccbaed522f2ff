"""Train the built-in scenes model (sae/lm/scenes_model.py) and measure it: accuracies, and the
evidence that the scene reaches the queries only through the bottleneck.

    python -m sae.eval.train_scenes_model train     # retrain from scratch, rewrite sae/lm/assets/scenes_model.*
    python -m sae.eval.train_scenes_model eval      # re-measure the shipped model
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sae.core.config import HelpFormatter, add_options, from_args
from sae.core.files import make_dirs, save_safetensors, write_json
from sae.eval.probes import probe_accuracy
from sae.lm import scenes
from sae.lm.scenes import KIND_NAMES, TOKENIZER, SceneBatch
from sae.lm.scenes_model import (BOTTLENECK_LAYER, SCENES_MODEL_ID, WEIGHTS_PATH, ScenesModelConfig, bottleneck_residual,
                                 build_scenes_model, load_scenes_metadata, load_scenes_model, patch_sep, query_logits,
                                 reference_logits, task_accuracy, world_of)


def recolour(scene: scenes.Scene, rng) -> scenes.Scene:
    """The same scene with one object's colour changed to a colour absent from the scene (keeping
    the train-split rule: no held-out conjunction); queries are rebuilt for the new scene."""
    slot = rng.randrange(len(scene.objects))
    obj = scene.objects[slot]
    used = {o.colour for o in scene.objects}
    options = [c for c in scenes.COLOURS if c not in used and (c, obj.shape) not in scenes.HELDOUT_CONJUNCTIONS]
    new = scenes.SceneObject(rng.choice(options), obj.material, obj.shape)
    objects = scene.objects[:slot] + (new,) + scene.objects[slot + 1 :]
    queries = tuple(scenes.make_query(objects, q.kind, q.slot) for q in scene.queries)
    return scenes.Scene(objects, scene.relations, queries)


@torch.no_grad()
def bottleneck_report(model, layer: int = BOTTLENECK_LAYER, n: int = 1000, seed: int = 12345,
                      probe_train: int = 4000, with_probes: bool = True) -> dict:
    """Evidence that the scene reaches the queries only through the bottleneck (see module doc).

    identity      max |logit difference| between (scene A's tokens with the bottleneck vector of a
                  recoloured scene A' patched in) and (A' 's scene tokens + A's query tokens): zero
                  up to float error iff nothing else carries the scene
    mean_ablated  accuracy when the bottleneck vector is replaced by its mean over other scenes
    chance        accuracy of always answering the most frequent value of the asked family
    recolour      after patching A' 's vector into A: accuracy against A' 's answers on queries
                  whose answer changed (flips) and on those that did not
    probes        linear and MLP probes for each (slot, attribute) from the bottleneck vector (train
                  split -> test split), from the same position one layer earlier, and from a query
                  position at the bottleneck layer (which cannot see the scene: chance); plus the
                  held-out conjunction object's colour and shape on the heldout split. The shipped
                  model's binding is readable by MLP probes but only partly by linear ones.
                  (with_probes=False skips them: the costly part.)
    The model's world (world_of) sets the layout and the queries asked.
    """
    hook = f"blocks.{layer}.hook_resid_post"
    world = world_of(model)
    sep = world.sep_pos
    rng = random.Random(seed)
    base = world.sample_scenes(n, seed, "test")
    edited = [recolour(s, rng) for s in base]
    A, B = scenes.encode_scenes(base, world), scenes.encode_scenes(edited, world)
    # hybrid: B's scene (positions < sep... and separator) with A's query blocks
    hybrid_tokens = torch.cat([B.tokens[:, : sep + 1], A.tokens[:, sep + 1 :]], 1)
    hybrid = SceneBatch(hybrid_tokens, A.answer_pos, A.answers, A.kinds, A.slots, B.attributes, B.n_objects)
    sep_B = bottleneck_residual(model, B.tokens, layer)
    patched = query_logits(model, A, [(hook, patch_sep(sep_B, sep))])
    identity = (patched - query_logits(model, hybrid)).abs().max().item()

    expected = answers_in(base, edited, A.answers)
    pred = patched.argmax(-1)
    flipped = (expected >= 0) & (expected != A.answers)
    same = (expected >= 0) & (expected == A.answers)

    reference = bottleneck_residual(model, world.generate_tokens(n, seed + 1, "train"), layer)
    ablated = task_accuracy(model, A, [(hook, patch_sep(reference.mean(0, keepdim=True).expand(n, -1), sep))])
    clean = task_accuracy(model, A)

    # chance: the best scene-blind answer (most frequent value of the asked family)
    asked_family = {k: scenes.QUERY_KINDS[name][2] for k, name in enumerate(KIND_NAMES)}
    chance = {name: 1 / len(scenes.FAMILIES[asked_family[k]]) for k, name in enumerate(KIND_NAMES)}
    chance["accuracy"] = sum(chance[KIND_NAMES[k]] * (A.kinds == k).float().mean().item() for k in range(len(KIND_NAMES)))

    probes = _probes(model, layer, n, seed, probe_train) if with_probes else None
    return {
        "bottleneck_hook": hook, "sep_position": sep, "n_scenes": n,
        "identity_max_abs_logit_diff": identity,
        "clean": clean, "mean_ablated": ablated, "chance": chance,
        "recolour_patch": {
            "flip_accuracy": (pred == expected)[flipped].float().mean().item(), "n_flipped": int(flipped.sum()),
            "unchanged_accuracy": (pred == expected)[same].float().mean().item(), "n_unchanged": int(same.sum()),
        },
        "probes": probes,
    }


def answers_in(base: list, edited: list, answers: torch.Tensor) -> torch.Tensor:
    """The answers to each base scene's queries asked of its edited scene, token ids shaped like
    `answers`; -1 where undefined (the prompt names a colour the edited scene lacks)."""
    expected = torch.full_like(answers, -1)
    for i, (a, b) in enumerate(zip(base, edited)):
        for j, q in enumerate(a.queries):
            _, by, asked = scenes.QUERY_KINDS[q.kind]
            match = [b.objects[q.slot]] if by == "slot" else [o for o in b.objects if getattr(o, by) == q.prompt[1]]
            if match:
                # attribute words have the same ids in every world (only ordinals are appended)
                expected[i, j] = TOKENIZER.word_to_id[getattr(match[0], asked)]
    return expected


PROBES = {"linear": 0, "mlp": 256}  # probe kind -> hidden width


def _probes(model, layer: int, n: int, seed: int, n_train: int) -> dict:
    world = world_of(model)
    train = world.sample_batch(n_train, seed + 2, "train")
    test = world.sample_batch(n, seed + 3, "test")
    held = world.sample_batch(n, seed + 4, "heldout")
    first_query = world.query_start(0) + 1  # a prompt word: it cannot see the scene before the bottleneck
    sep = world.sep_pos
    sites = {"bottleneck": (layer, sep), "sep_one_layer_earlier": (layer - 1, sep),
             "query_at_bottleneck_layer": (layer, first_query)}
    out = {}
    for site, (l, pos) in sites.items():
        if l < 0:
            continue
        feats = {}
        for split, b in (("train", train), ("test", test), ("heldout", held)):
            name = f"blocks.{l}.hook_resid_post"
            _, cache = model.run_with_cache(b.tokens.to(model.cfg.device), names_filter=lambda x: x == name)
            feats[split] = cache[name][:, pos].cpu()
        out[site] = {}
        for kind, hidden in PROBES.items():
            probe = lambda xs, ys, xt, yt, k: probe_accuracy(xs, ys, xt, yt, k, hidden=hidden)  # noqa: E731
            res = out[site][kind] = {}
            for a, attr in enumerate(scenes.ATTRIBUTES):
                k = len(scenes.FAMILIES[attr])
                for s in range(world.max_objects):
                    tr, te = train.attributes[:, s, a] >= 0, test.attributes[:, s, a] >= 0
                    res[f"{attr}@slot{s}"] = probe(feats["train"][tr], train.attributes[tr, s, a],
                                                   feats["test"][te], test.attributes[te, s, a], k)
                if attr != "material" and site == "bottleneck":
                    # the held-out conjunction object (the one every heldout query asks about)
                    slot = held.slots[:, 0]
                    ys = held.attributes[torch.arange(len(held)), slot, a]
                    accs = []
                    for s in range(world.max_objects):
                        tr, sel = train.attributes[:, s, a] >= 0, slot == s
                        if sel.any():
                            accs.append((probe(feats["train"][tr], train.attributes[tr, s, a],
                                               feats["heldout"][sel], ys[sel], k), int(sel.sum())))
                    res[f"heldout_object_{attr}"] = sum(acc * m for acc, m in accs) / sum(m for _, m in accs)
    return out


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, cfg: ScenesModelConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def train_scenes_model(cfg: ScenesModelConfig, device="cpu", log_every: int = 100, eval_every: int = 500,
                       progress: bool = True):
    """Train from scratch on freshly sampled "train" scenes of cfg.world; returns the model (eval mode)."""
    world = cfg.world
    torch.manual_seed(cfg.seed)
    model = build_scenes_model(cfg, device)
    if cfg.act_fn != "gelu":
        raise ValueError(f"training supports act_fn='gelu' only, got {cfg.act_fn!r}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "W_pos" not in n and "W_E" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "W_pos" not in n and "W_E" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(range(cfg.steps), desc="scenes model", mininterval=2, disable=not progress, leave=False)
    ema = None
    watch = {split: world.sample_batch(300, seed=-1, split=split) for split in ("test", "heldout")}
    for step in bar:
        batch = world.sample_batch(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, split="train")
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        logits = reference_logits(dict(model.named_parameters()), batch.tokens.to(device), cfg)
        pos = (batch.answer_pos - 1).to(device)
        logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), batch.answers.flatten().to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % log_every == 0 or step == cfg.steps - 1:
            acc = (logits.argmax(-1).cpu() == batch.answers).float().mean().item()
            bar.set_postfix(loss=f"{ema:.3f}", batch_acc=f"{acc:.3f}")
        if eval_every and (step + 1) % eval_every == 0:
            for split, b in watch.items():
                r = task_accuracy(model, b)
                tqdm.write(f"step {step + 1} {split:8s} acc {r['accuracy']:.3f} | "
                           + " ".join(f"{k} {r[k]:.2f}" for k in KIND_NAMES))
    model.eval()
    with torch.no_grad():  # the training forward must be the TL model's function, restriction included
        tokens = world.generate_tokens(64, seed=cfg.seed, split="test").to(device)
        diff = (reference_logits(dict(model.named_parameters()), tokens, cfg) - model(tokens)).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"training forward and transformer-lens forward disagree (max |diff| {diff:.2e})")
    return model


def measure(model, cfg: ScenesModelConfig) -> dict:
    """Accuracies on fresh scenes: held-out scenes ("test") and held-out conjunctions ("heldout")."""
    seed, world = 10_000 + cfg.seed, cfg.world
    return {
        "test": task_accuracy(model, world.sample_batch(cfg.eval_scenes, seed, "test")),
        "heldout_conjunctions": task_accuracy(model, world.sample_batch(cfg.eval_scenes, seed, "heldout")),
        "train": task_accuracy(model, world.sample_batch(cfg.eval_scenes, seed, "train")),
        "eval_seed": seed, "eval_scenes": cfg.eval_scenes,
    }


def save_scenes_model(model, meta: dict, weights: Path = WEIGHTS_PATH) -> None:
    """Weights (HookedTransformer state-dict keys, parameters only) + JSON, each written atomically."""
    weights = Path(weights)
    make_dirs(weights.parent)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
    save_safetensors(weights, tensors, metadata={"model": SCENES_MODEL_ID, "format": "transformer_lens_3_state_dict"})
    write_json(weights.with_suffix(".json"), meta)


def model_metadata(cfg: ScenesModelConfig, model, seconds: float, command: str) -> dict:
    world = cfg.world
    return {
        "model_id": SCENES_MODEL_ID,
        "config": asdict(cfg),
        "layout": {"n_ctx": world.n_ctx, "sep_position": world.sep_pos, "bottleneck_layer": cfg.bottleneck_layer,
                   "bottleneck_hook": f"blocks.{cfg.bottleneck_layer}.hook_resid_post",
                   "n_queries": scenes.N_QUERIES, "query_len": scenes.QUERY_LEN, "max_objects": world.max_objects},
        "vocab": list(world.vocab),
        "heldout_conjunctions": sorted(scenes.HELDOUT_CONJUNCTIONS),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "training": {"command": command, "seconds": round(seconds, 1), "torch": torch.__version__,
                     "transformer_lens": version("transformer-lens"), "threads": torch.get_num_threads()},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sae.eval.train_scenes_model", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch and write the weights + JSON")
    add_options(t, ScenesModelConfig)
    t.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights path (.safetensors; JSON beside it)")
    e = sub.add_parser("eval", help="re-measure a saved model")
    e.add_argument("--weights", type=Path, default=WEIGHTS_PATH)
    e.add_argument("--n", type=int, default=None, help="scenes per split (default: the recorded eval_scenes)")
    e.add_argument("--update", action="store_true", help="write the new measurements into the JSON")
    args = p.parse_args(argv)
    command = "python -m sae.eval.train_scenes_model " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.cmd == "train":
        cfg = from_args(ScenesModelConfig, args)
        t0 = time.time()
        model = train_scenes_model(cfg)
        seconds = time.time() - t0
        meta = model_metadata(cfg, model, seconds, command)
        meta["accuracy"] = measure(model, cfg)
        meta["bottleneck"] = bottleneck_report(model, cfg.bottleneck_layer)
        save_scenes_model(model, meta, args.out)
        print(json.dumps({k: meta[k] for k in ("accuracy", "bottleneck", "training")}, indent=2))
    else:
        model = load_scenes_model(weights=args.weights)
        meta = load_scenes_metadata(args.weights.with_suffix(".json"))
        cfg = ScenesModelConfig(**meta["config"])
        cfg.eval_scenes = args.n or cfg.eval_scenes
        report = {"accuracy": measure(model, cfg), "bottleneck": bottleneck_report(model, cfg.bottleneck_layer)}
        print(json.dumps(report, indent=2))
        if args.update:
            write_json(args.weights.with_suffix(".json"), {**meta, **report, "measured_with": command})

if __name__ == "__main__":
    main()
