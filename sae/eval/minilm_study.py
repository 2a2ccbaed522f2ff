"""What MiniLM does with binding, read from outside and through dictionaries.

    python -m sae.eval.minilm_study swap --n-scenes 1000 --out results/caption_swap.json [--sae RUN_DIR]
    python -m sae.eval.minilm_study corpus --out cache/minilm_corpus.txt    # captions + shipped English
    python train.py cache --model minilm --source cache/minilm_corpus.txt --out cache/minilm
    python -m sae.eval.minilm_study features RUN_DIR --cache cache/minilm   # colour latents, slots, echoes

The caption-swap test asks whether MiniLM's sentence embedding binds attributes to objects: a
caption and its attribute-swapped twin ("a red cube and a blue sphere" / "a blue cube and a red
sphere") against a paraphrase that keeps the binding. The model itself (hook names, loading) is
sae/lm/minilm.py.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import stats

from sae.core.config import HelpFormatter, add_options, from_args, option
from sae.core.files import make_dirs, write_result, write_text
from sae.core.io import load
from sae.eval.echo import EchoConfig, find_echoes
from sae.eval.worlds import random_orthogonal
from sae.lm.minilm import BertTokenizer, embed, load_minilm, model_dir
from sae.lm.scenes import COLOURS, MATERIALS, SHAPES
from sae.lm.splice import ENGLISH, resolve_sae_dir


# -----------------------------------------------------------------------------
# the caption-swap test

@dataclass
class SwapConfig:
    n_scenes: int = option(1000, "generated two-object scenes")
    seed: int = option(0, "scene generator seed")
    n_boot: int = option(2000, "bootstrap resamples for the percentile CIs")
    batch_size: int = option(128, "sentences per forward pass")
    out: str = option("", "write the result as JSON here ('' = print only)")
    backend: str = option("auto", "auto (HookedEncoder under TL 3.x, torch twin under 4.x), tl or torch")


# relations: symmetric ones paraphrase by reordering the objects; asymmetric ones by reordering
# and using the converse
SYMMETRIC = ("next to", "beside", "near")
CONVERSE = (("to the left of", "to the right of"), ("above", "below"), ("in front of", "behind"))


def _a(phrase: str) -> str:
    """'a red cube', 'an orange cube'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(det: str, colour: str, shape: str) -> str:
    return _a(f"{colour} {shape}") if det == "a" else f"{det} {colour} {shape}"


def make_captions(n: int, seed: int) -> list[dict]:
    """Per scene: the anchor caption and its variants (see `caption_swap`).

    anchor     a red cube next to a blue sphere
    reorder    a blue sphere next to a red cube              same bindings, objects in the other order
    rephrase   the cube is red and the sphere is blue        same bindings, other words
    swap       a blue cube next to a red sphere              colours exchanged: same words, wrong bindings
    recolour   a red cube next to a green sphere             one colour replaced by a colour not in the scene
    """
    rng = random.Random(f"caption-swap/{seed}")
    rows = []
    for _ in range(n):
        c1, c2, c3 = rng.sample(COLOURS, 3)
        s1, s2 = rng.sample(SHAPES, 2)
        if rng.random() < 0.5:
            rel = rng.choice(SYMMETRIC)
            conv = rel
        else:
            rel, conv = rng.choice(CONVERSE)
            if rng.random() < 0.5:
                rel, conv = conv, rel
        rows.append({
            "anchor": f"{_np('a', c1, s1)} {rel} {_np('a', c2, s2)}",
            "reorder": f"{_np('a', c2, s2)} {conv} {_np('a', c1, s1)}",
            "rephrase": f"the {s1} is {c1} and the {s2} is {c2}",
            "swap": f"{_np('a', c2, s1)} {rel} {_np('a', c1, s2)}",
            "recolour": f"{_np('a', c1, s1)} {rel} {_np('a', c3, s2)}" if rng.random() < 0.5
                        else f"{_np('a', c3, s1)} {rel} {_np('a', c2, s2)}",
        })
    return rows


MATERIAL_ADJ = {"metal": "metal", "wood": "wooden", "glass": "glass", "rubber": "rubber"}


def scene_sentences(n: int, seed: int) -> list[str]:
    """n varied natural-English scene captions (2 or 3 objects, colour, sometimes material), for
    caching MiniLM's residuals on text whose binding structure is known."""
    rng = random.Random(f"scene-sentences/{seed}")
    rels = SYMMETRIC + tuple(r for pair in CONVERSE for r in pair)
    out = []
    for _ in range(n):
        k = rng.choice((2, 2, 3))
        cs, ss = rng.sample(COLOURS, k), rng.sample(SHAPES, k)
        ms = [MATERIAL_ADJ[rng.choice(MATERIALS)] if rng.random() < 0.4 else "" for _ in range(k)]
        objs = [" ".join(w for w in (c, m, s) if w) for c, m, s in zip(cs, ms, ss)]
        form = rng.randrange(4)
        if form == 0:
            text = f"{_a(objs[0])} {rng.choice(rels)} {_a(objs[1])}"
            if k == 3:
                text += f", and {_a(objs[2])} {rng.choice(rels)} them"
        elif form == 1:
            text = "there is " + ", ".join(_a(o) for o in objs[:-1]) + f" and {_a(objs[-1])}"
        elif form == 2:
            text = " and ".join(f"the {s} is {c}" for c, s in zip(cs, ss))
        else:
            text = f"the {ss[0]} {rng.choice(rels)} the {ss[1]} is {cs[0]}, and the {ss[1]} is {cs[1]}"
        out.append(text[0].upper() + text[1:] + ".")
    return out


def write_corpus(path: Path, n_captions: int, seed: int = 0, english: bool = True) -> dict:
    """The MiniLM caching corpus: generated scene captions with the shipped English text
    (sae/lm/data/english.txt) spread evenly among them, one document per line."""
    english = [l.strip() for l in ENGLISH.read_text().splitlines() if l.strip()] if english else []
    captions = scene_sentences(n_captions, seed)
    every = max(1, len(captions) // max(1, len(english)))
    lines, todo = [], list(reversed(english))
    for i, c in enumerate(captions):
        lines.append(c)
        if (i + 1) % every == 0 and todo:
            lines.append(todo.pop())
    lines += reversed(todo)
    make_dirs(path.parent)
    write_text(path, "\n".join(lines) + "\n")
    return {"lines": len(lines), "captions": len(captions), "english": len(english)}


def mean_ci(x: torch.Tensor, n_boot: int, seed: int = 0) -> dict:
    """Mean with a 95% t interval and a 95% percentile-bootstrap interval."""
    x = x.double()
    n = len(x)
    mean, sd = x.mean().item(), x.std().item()
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    g = torch.Generator().manual_seed(seed)
    boot = x[torch.randint(0, n, (n_boot, n), generator=g)].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {"mean": mean, "t_ci95": [mean - half, mean + half], "boot_ci95": [lo, hi], "sd": sd, "n": n}


def caption_swap(model, cfg: SwapConfig, splice=None) -> dict:
    """Does the model tell a paraphrase (same bindings) from the attribute-swapped caption (same
    words, wrong bindings)? For each scene and layer, cosine similarity of the anchor's mean-pooled
    representation to each variant. margin(p) = cos(anchor, p) - cos(anchor, swap) > 0 means p is
    closer than the swap; win rate = share of scenes where it is. swap_vs_recolour =
    (1 - cos(anchor, swap)) / (1 - cos(anchor, recolour)): 0 if a swap changes nothing (bag of
    words), 1 if exchanging two colours moves the representation as far as changing one colour
    does. The last layer's row is the sentence embedding itself (cosine ignores the final
    normalisation). splice=(sae, hook) runs it all with an SAE spliced in (layers before the hook
    are then unchanged): does the dictionary keep what the model tells apart?"""
    rows = make_captions(cfg.n_scenes, cfg.seed)
    kinds = list(rows[0])
    texts = [r[k] for r in rows for k in kinds]
    reps = embed(model, texts, cfg.batch_size, layers=True, splice=splice)  # (L+1, n*K, d)
    reps = reps.reshape(reps.shape[0], len(rows), len(kinds), -1)
    cos = F.cosine_similarity(reps[:, :, :1], reps[:, :, 1:], dim=-1)  # (L+1, n, K-1) anchor vs each variant
    sims = {k: cos[..., i] for i, k in enumerate(kinds[1:])}
    names = ["embeddings"] + [f"block {l}" for l in range(model.cfg.n_layers)]
    layers = []
    for li, name in enumerate(names):
        entry = {"layer": name, "hook": "hook_full_embed" if li == 0 else f"blocks.{li - 1}.hook_normalized_resid_post",
                 "cos": {k: v[li].mean().item() for k, v in sims.items()}}
        for p in ("reorder", "rephrase"):
            m = sims[p][li] - sims["swap"][li]
            entry[f"margin_{p}"] = mean_ci(m, cfg.n_boot, cfg.seed + li)
            entry[f"win_rate_{p}"] = mean_ci((m > 0).double(), cfg.n_boot, cfg.seed + li)
        ratio = (1 - sims["swap"][li]) / (1 - sims["recolour"][li]).clamp_min(1e-12)
        entry["swap_vs_recolour"] = mean_ci(ratio, cfg.n_boot, cfg.seed + li)
        layers.append(entry)
    return {"config": asdict(cfg), "backend": getattr(model, "backend", type(model).__name__),
            "splice": None if splice is None else {"hook": splice[1], "architecture": splice[0].architecture},
            "examples": rows[:3], "layers": layers, "pooled": layers[-1]}


# -----------------------------------------------------------------------------
# SAEs on MiniLM's residuals: colour latents, their slots, and echo pairs

def read_cache(cache_dir: str | Path, hook: str) -> dict:
    """All rows of `hook` in a (small) cache with their token_ids / seq_index / position columns."""
    cache_dir = Path(cache_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    if hook not in manifest["hook_names"]:
        raise ValueError(f"{cache_dir} has no hook {hook!r}; it holds {', '.join(manifest['hook_names'])}")
    parts = [load_file(str(cache_dir / s["file"])) for s in manifest["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in (hook, "token_ids", "seq_index", "position")}


@torch.no_grad()
def colour_latents(sae, rows: dict, hook: str, tokenizer, min_fires: int = 20, purity: float = 0.9) -> dict:
    """Which latents are colour features, and are they tied to an object slot? A latent is a
    colour latent when >= `purity` of its firings are on colour words. A colour word's slot is its
    rank among the colour words of its sentence (0 = first-mentioned object). For each colour
    latent: the colour it prefers and the share of its firings in its preferred slot; a latent is
    slot-bound when that share is >= purity (a position-bound "red in slot 1" feature). Chance for
    that share is the slot distribution of colour words (about 0.5 with 2-3 objects)."""
    colour_ids = torch.tensor([tokenizer.tok.token_to_id(c) for c in COLOURS])
    is_colour = torch.isin(rows["token_ids"].long(), colour_ids)
    # slot of each colour row: rank among the colour rows of its sequence (rows are in position order)
    seq = rows["seq_index"][is_colour]
    pos = rows["position"][is_colour].long()
    order = torch.argsort(seq * 10_000 + pos)
    seq_sorted = seq[order]
    first = torch.ones_like(seq_sorted, dtype=torch.bool)
    first[1:] = seq_sorted[1:] != seq_sorted[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(seq_sorted)), torch.zeros_like(seq_sorted)), 0).values
    slot_sorted = torch.arange(len(seq_sorted)) - start
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    colour_of = torch.bucketize(rows["token_ids"][is_colour].long(), colour_ids.sort().values)
    colour_of = colour_ids.sort().indices[colour_of]  # index into COLOURS

    X = rows[hook].float()
    fires = torch.zeros(sae.n_total)
    fires_colour = torch.zeros(sae.n_total)
    by = torch.zeros(sae.n_total, len(COLOURS), 3)  # fires on colour c in slot s
    cidx = torch.full((len(X),), -1)
    cidx[is_colour] = torch.arange(int(is_colour.sum()))
    for i in range(0, len(X), 4096):
        z = sae.encode(X[i: i + 4096]) > 0
        fires += z.sum(0)
        m = is_colour[i: i + 4096]
        if m.any():
            k = cidx[i: i + 4096][m]
            zc = z[m].float()
            fires_colour += zc.sum(0)
            onehot = torch.zeros(len(k), len(COLOURS) * 3)
            onehot[torch.arange(len(k)), colour_of[k] * 3 + slot[k].clamp_max(2)] = 1
            by += (zc.T @ onehot).reshape(-1, len(COLOURS), 3)
    sel = (fires >= min_fires) & (fires_colour >= purity * fires)
    latents = sel.nonzero()[:, 0]
    per_slot = by[latents].sum(1)  # (L, 3)
    slot_share = per_slot.max(1).values / per_slot.sum(1).clamp_min(1)
    colour_share = by[latents].sum(2).max(1).values / per_slot.sum(1).clamp_min(1)
    slot_base = torch.bincount(slot.clamp_max(2), minlength=3).float()
    return {"hook": hook, "n_latents": sae.n_total, "n_colour_rows": int(is_colour.sum()),
            "slot_distribution_of_colour_words": (slot_base / slot_base.sum()).tolist(),
            "colour_latents": latents.tolist(), "n_colour_latents": len(latents),
            "colour_share": colour_share.tolist(), "slot_share": slot_share.tolist(),
            "n_slot_bound": int((slot_share >= purity).sum()),
            "n_single_colour": int((colour_share >= purity).sum())}


def echo_check(W: torch.Tensor, rows: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Run the echo-feature detector (sae.eval.echo, written for the binding evals) on decoder rows
    W[rows], on a random control of the same shape (should find none), and on a planted positive
    control: the first half of those rows plus copies moved by one random rotation, with 10%
    noise (should find most of the planted pairs), so that "no echoes" means something."""
    W = W.detach().float().cpu()
    W = W if rows is None else W[rows]
    g = torch.Generator().manual_seed(seed)
    control = torch.randn(W.shape, generator=g)
    half = F.normalize(W[: max(3, len(W) // 2)], dim=-1)
    echo = half @ random_orthogonal(W.shape[1], g).T
    echo = F.normalize(echo + 0.1 * torch.randn(echo.shape, generator=g) / math.sqrt(W.shape[1]), dim=-1)
    cfg = EchoConfig(seed=seed)
    res, ctl, pos = find_echoes(W, cfg), find_echoes(control, cfg), find_echoes(torch.cat([half, echo]), cfg)
    planted = {(i, i + len(half)) for i in range(len(half))}
    found = {tuple(sorted(p)) for p in pos.pairs.tolist()}
    return {"n_rows": W.shape[0], "share": res.share, "pairs": len(res.pairs), "pairs_list": res.pairs.tolist(),
            "control_share": ctl.share, "control_pairs": len(ctl.pairs),
            "positive_control_planted": len(planted), "positive_control_found": len(found & planted),
            "positive_control_false": len(found - planted)}


def format_table(res: dict) -> str:
    f = lambda d: f"{d['mean']:+.4f} [{d['t_ci95'][0]:+.4f}, {d['t_ci95'][1]:+.4f}]"  # noqa: E731
    head = (f"{'layer':<11} {'cos swap':>8} {'cos reord':>9} {'cos reph':>8} {'cos recol':>9}  "
            f"{'margin reorder (95% t CI)':<29} {'win':>5}  {'margin rephrase (95% t CI)':<29} {'win':>5}  swap/recolour")
    lines = [head]
    for e in res["layers"]:
        c = e["cos"]
        lines.append(f"{e['layer']:<11} {c['swap']:8.4f} {c['reorder']:9.4f} {c['rephrase']:8.4f} {c['recolour']:9.4f}  "
                     f"{f(e['margin_reorder']):<29} {e['win_rate_reorder']['mean']:5.1%}  "
                     f"{f(e['margin_rephrase']):<29} {e['win_rate_rephrase']['mean']:5.1%}  "
                     f"{e['swap_vs_recolour']['mean']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae.eval.minilm_study", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("swap", help="the caption-swap test: table on stdout, JSON to --out")
    add_options(s, SwapConfig)
    s.add_argument("--sae", default="", help="dictionary or run directory: splice it in at its hook (metadata.hook_name)")
    c = sub.add_parser("corpus", help="write the MiniLM caching corpus: scene captions + the shipped English")
    c.add_argument("--out", required=True)
    c.add_argument("--n-captions", type=int, default=3000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--english", action=argparse.BooleanOptionalAction, default=True, help="include the shipped sae/lm/data/english.txt")
    f = sub.add_parser("features", help="colour latents, their slots, and echo pairs of an SAE trained on a MiniLM cache")
    f.add_argument("sae_dir", help="dictionary or run directory")
    f.add_argument("--cache", required=True, help="the MiniLM cache it was trained on (or a held-out one)")
    f.add_argument("--hook", default="", help="'' = the dictionary's metadata.hook_name")
    f.add_argument("--out", default="")
    e = sub.add_parser("embed", help="print sentence embeddings' cosine similarities for the given sentences")
    e.add_argument("sentences", nargs="+")
    args = p.parse_args(argv)
    try:
        if args.cmd == "swap":
            cfg = from_args(SwapConfig, args)
            if cfg.n_scenes < 2 or cfg.n_boot < 1:
                raise ValueError("--n-scenes must be >= 2 and --n-boot >= 1")
            spliced = None
            if args.sae:
                sae_dir = resolve_sae_dir(Path(args.sae))
                spliced = (load(sae_dir), json.loads((sae_dir / "cfg.json").read_text())["metadata"]["hook_name"])
            res = caption_swap(load_minilm(backend=cfg.backend), cfg, spliced)
            print(format_table(res))
            if cfg.out:
                write_result(Path(cfg.out), res)
                print(f"wrote {cfg.out}")
        elif args.cmd == "features":
            sae_dir = resolve_sae_dir(Path(args.sae_dir))
            hook = args.hook or json.loads((sae_dir / "cfg.json").read_text())["metadata"].get("hook_name", "")
            model_sae = load(sae_dir)
            rows = read_cache(args.cache, hook)
            res = colour_latents(model_sae, rows, hook, BertTokenizer(model_dir()))
            res["echo_colour_latents"] = echo_check(model_sae.flat_decoder(), torch.tensor(res["colour_latents"][:160])) \
                if res["n_colour_latents"] >= 6 else None
            res["sae"] = str(sae_dir)
            print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))
            if args.out:
                write_result(Path(args.out), res)
        elif args.cmd == "corpus":
            if args.n_captions < 1:
                raise ValueError("--n-captions must be >= 1")
            print(json.dumps(write_corpus(Path(args.out), args.n_captions, args.seed, args.english)), f"-> {args.out}")
        else:
            emb = embed(load_minilm(), args.sentences)
            print(json.dumps((emb @ emb.T).tolist()))
    except (ImportError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
