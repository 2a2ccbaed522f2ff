"""A tiny transformer-lens model trained on the scenes language (sae/scenes.py), shipped with
the package, and the script that trains it.

    model = load_scenes_model()                 # HookedTransformer (TL 3.x) / TransformerBridge (TL 4.x)
    python -m sae.lm.scenes_model train            # retrain from scratch, rewrite sae/assets/scenes_model.*
    python -m sae.lm.scenes_model eval             # re-measure the shipped model

The model sees the scene only through ONE vector: blocks.{BOTTLENECK_LAYER}.hook_resid_post at
SEP_POS. A fixed attention restriction (part of the loaded model in both TL versions) makes it so:

    layers <= BOTTLENECK_LAYER   scene and separator attend causally as usual; a query block
                                 attends only to <bos> and itself (so it learns nothing of the scene)
    layers >  BOTTLENECK_LAYER   separator and query blocks attend only to <bos>, the separator and
                                 their own block (never to scene tokens)

Hence every query's logits are a function of its own tokens and the separator's residual after
block BOTTLENECK_LAYER, and query blocks never see each other (no answer leaks between queries).
`bottleneck_report` checks this numerically (patching, ablation, linear and MLP probes).

TL 3.x applies the restriction with permanent hooks on blocks.{l}.attn.hook_attn_scores (they
survive reset_hooks() and run_with_cache; reset_hooks(including_permanent=True) would remove them). TL 4.x's native bridge only fires hook_attn_scores
after the fact, so there the restriction replaces each NativeAttention's `causal_mask` buffer.
Weights are stored in HookedTransformer's state-dict format (safetensors) and converted for TL 4.x
with transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from sae.lm import scenes
from sae.lm.scenes import KIND_NAMES, N_CTX, SEP_POS, TOKENIZER, SceneBatch


@dataclass
class ScenesModelConfig:
    # architecture
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 256
    act_fn: str = "gelu"
    bottleneck_layer: int = 1  # queries see the scene only via blocks.{this}.hook_resid_post at SEP_POS
    # training
    seed: int = 0
    steps: int = 6000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    eval_scenes: int = 2000  # per split, for the accuracies recorded with the weights


SCENES_MODEL_ID = "scenes"
ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_PATH = ASSETS / "scenes_model.safetensors"
META_PATH = ASSETS / "scenes_model.json"
BOTTLENECK_LAYER = ScenesModelConfig.bottleneck_layer
SEP_POSITION = SEP_POS
BOTTLENECK_HOOK = f"blocks.{BOTTLENECK_LAYER}.hook_resid_post"

# ----------------------------------------------------------------------------- the restriction


def attention_allowed(n_layers: int, bottleneck_layer: int) -> torch.Tensor:
    """(n_layers, N_CTX, N_CTX) bool, True where query position q may attend to key position k."""
    seg = torch.tensor(scenes.segment_ids())
    q, k = seg[:, None], seg[None, :]
    BOS, SEP, FIRST_QUERY = 0, 2, 3
    causal = torch.ones(N_CTX, N_CTX, dtype=torch.bool).tril()
    own_block = q == k
    early = causal & ((q < FIRST_QUERY) | (k == BOS) | own_block)
    late = causal & ((q < SEP) | (k == BOS) | (k == SEP) | own_block)
    return torch.stack([early if l <= bottleneck_layer else late for l in range(n_layers)])


class _RestrictScores:
    """TL 3.x permanent hook on hook_attn_scores: -inf where the restriction forbids."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, scores: torch.Tensor, hook=None) -> torch.Tensor:
        nq, nk = scores.shape[-2:]  # nq < nk only with a KV cache: queries are the last nq positions
        if nk > N_CTX:
            raise ValueError(f"the scenes model takes at most {N_CTX} positions, got {nk}")
        allowed = self.allowed[nk - nq : nk, :nk].to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------- building / loading


def build_model(cfg: ScenesModelConfig, device="cpu", state_dict=None):
    """A scenes model with the attention restriction active; random init when state_dict is None
    (TL 3.x only: training reads HookedTransformer parameter names, so TL 4.x only loads weights)."""
    from sae.lm.models import build_model as build_tl_model, tl_major

    if state_dict is None and tl_major() >= 4:
        raise RuntimeError("training the scenes model needs transformer-lens 3.x (HookedTransformer)")
    tl_cfg = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
                  d_mlp=cfg.d_mlp, d_vocab=len(TOKENIZER), n_ctx=N_CTX, act_fn=cfg.act_fn,
                  normalization_type="LN", seed=cfg.seed, model_name=SCENES_MODEL_ID)
    model = build_tl_model(tl_cfg, state_dict, device)
    allowed = attention_allowed(cfg.n_layers, cfg.bottleneck_layer)
    if tl_major() < 4:
        for l in range(cfg.n_layers):
            model.add_hook(f"blocks.{l}.attn.hook_attn_scores", _RestrictScores(allowed[l]), is_permanent=True)
    else:
        # NativeAttention masks scores with its `causal_mask` buffer (True = masked, sliced
        # [:seq, :seq]); hook_attn_scores on the bridge fires after the fact and changes nothing.
        for l, layer in enumerate(model.original_model.layers):
            layer.attn.causal_mask = (~allowed[l]).to(layer.attn.causal_mask.device)
    return model


def load_scenes_metadata(path: Path | str = META_PATH) -> dict:
    """The JSON written next to the weights: config, layout, training command, measured accuracies."""
    with open(path) as f:
        return json.load(f)


def load_scenes_model(device="cpu", weights: Path | str = WEIGHTS_PATH):
    """The shipped scenes model (eval mode) with its attention restriction active."""
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.exists():
        raise FileNotFoundError(f"no scenes weights at {weights}: run `python -m sae.lm.scenes_model train`")
    meta = load_scenes_metadata(weights.with_suffix(".json"))
    names = {f.name for f in fields(ScenesModelConfig)}
    cfg = ScenesModelConfig(**{k: v for k, v in meta["config"].items() if k in names})
    if meta["vocab"] != TOKENIZER.vocab or meta["layout"]["n_ctx"] != N_CTX:
        raise ValueError(f"{weights} was trained on a different scenes vocabulary or layout than sae/scenes.py")
    model = build_model(cfg, device, load_file(str(weights), device="cpu"))
    model.eval()
    return model


# ----------------------------------------------------------------------------- evaluation


def query_logits(model, batch: SceneBatch, fwd_hooks=()) -> torch.Tensor:
    """(N, N_QUERIES, d_vocab) logits at each query's last prompt word (which predicts the answer)."""
    tokens = batch.tokens.to(model.cfg.device)
    if fwd_hooks:
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    else:
        logits = model(tokens)
    pos = (batch.answer_pos - 1).to(logits.device)
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def evaluate(model, batch: SceneBatch, fwd_hooks=(), chunk: int = 1000) -> dict:
    """Answer accuracy (argmax over the whole vocabulary), overall and per query kind."""
    correct = []
    for i in range(0, len(batch), chunk):
        part = _slice(batch, slice(i, i + chunk))
        correct.append(query_logits(model, part, fwd_hooks).argmax(-1).cpu() == part.answers)
    correct = torch.cat(correct)
    out = {"accuracy": correct.float().mean().item(), "n_queries": correct.numel()}
    for k, name in enumerate(KIND_NAMES):
        sel = batch.kinds == k
        out[name] = correct[sel].float().mean().item() if sel.any() else float("nan")
    return out


def _slice(batch: SceneBatch, idx) -> SceneBatch:
    return SceneBatch(**{f.name: getattr(batch, f.name)[idx] for f in fields(SceneBatch)})


def _patch_sep(value: torch.Tensor):
    """A forward hook that overwrites the bottleneck residual at SEP_POS with `value` (N, d_model)."""

    def hook(resid, hook=None):
        resid = resid.clone()
        resid[:, SEP_POS] = value.to(resid.device, resid.dtype)
        return resid

    return hook


@torch.no_grad()
def bottleneck_residual(model, tokens: torch.Tensor, layer: int = BOTTLENECK_LAYER) -> torch.Tensor:
    """(N, d_model) residual at SEP_POS after block `layer`."""
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n == name)
    return cache[name][:, SEP_POS].cpu()


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


def _probe_accuracy(x_train, y_train, x_test, y_test, n_classes: int, hidden: int = 0, steps: int = 600,
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


@torch.no_grad()
def bottleneck_report(model, layer: int = BOTTLENECK_LAYER, n: int = 1000, seed: int = 12345,
                      probe_train: int = 4000) -> dict:
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
    """
    import random

    hook = f"blocks.{layer}.hook_resid_post"
    rng = random.Random(seed)
    base = scenes.sample_scenes(n, seed, "test")
    edited = [recolour(s, rng) for s in base]
    A, B = scenes.encode_scenes(base), scenes.encode_scenes(edited)
    # hybrid: B's scene (positions < SEP_POS... and separator) with A's query blocks
    hybrid_tokens = torch.cat([B.tokens[:, : SEP_POS + 1], A.tokens[:, SEP_POS + 1 :]], 1)
    hybrid = SceneBatch(hybrid_tokens, A.answer_pos, A.answers, A.kinds, A.slots, B.attributes, B.n_objects)
    sep_B = bottleneck_residual(model, B.tokens, layer)
    patched = query_logits(model, A, [(hook, _patch_sep(sep_B))])
    identity = (patched - query_logits(model, hybrid)).abs().max().item()

    # expected answers for A's prompts in scene B (undefined when the prompt names a colour B lacks)
    expected = torch.full_like(A.answers, -1)
    for i, (a, b) in enumerate(zip(base, edited)):
        for j, q in enumerate(a.queries):
            _, by, asked = scenes.QUERY_KINDS[q.kind]
            if by == "slot":
                match = [b.objects[q.slot]]
            else:
                match = [o for o in b.objects if getattr(o, by) == q.prompt[1]]
            if match:
                expected[i, j] = TOKENIZER.word_to_id[getattr(match[0], asked)]
    pred = patched.argmax(-1)
    flipped = (expected >= 0) & (expected != A.answers)
    same = (expected >= 0) & (expected == A.answers)

    reference = bottleneck_residual(model, scenes.generate_tokens(n, seed + 1, "train"), layer)
    ablated = evaluate(model, A, [(hook, _patch_sep(reference.mean(0, keepdim=True).expand(n, -1)))])
    clean = evaluate(model, A)

    # chance: the best scene-blind answer (most frequent value of the asked family)
    asked_family = {k: scenes.QUERY_KINDS[name][2] for k, name in enumerate(KIND_NAMES)}
    chance = {name: 1 / len(scenes.FAMILIES[asked_family[k]]) for k, name in enumerate(KIND_NAMES)}
    chance["accuracy"] = sum(chance[KIND_NAMES[k]] * (A.kinds == k).float().mean().item() for k in range(len(KIND_NAMES)))

    probes = _probes(model, layer, n, seed, probe_train)
    return {
        "bottleneck_hook": hook, "sep_position": SEP_POS, "n_scenes": n,
        "identity_max_abs_logit_diff": identity,
        "clean": clean, "mean_ablated": ablated, "chance": chance,
        "recolour_patch": {
            "flip_accuracy": (pred == expected)[flipped].float().mean().item(), "n_flipped": int(flipped.sum()),
            "unchanged_accuracy": (pred == expected)[same].float().mean().item(), "n_unchanged": int(same.sum()),
        },
        "probes": probes,
    }


PROBES = {"linear": 0, "mlp": 256}  # probe kind -> hidden width


def _probes(model, layer: int, n: int, seed: int, n_train: int) -> dict:
    train = scenes.sample_batch(n_train, seed + 2, "train")
    test = scenes.sample_batch(n, seed + 3, "test")
    held = scenes.sample_batch(n, seed + 4, "heldout")
    first_query = scenes.query_start(0) + 1  # a prompt word: it cannot see the scene before the bottleneck
    sites = {"bottleneck": (layer, SEP_POS), "sep_one_layer_earlier": (layer - 1, SEP_POS),
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
            probe = lambda xs, ys, xt, yt, k: _probe_accuracy(xs, ys, xt, yt, k, hidden=hidden)  # noqa: E731
            res = out[site][kind] = {}
            for a, attr in enumerate(scenes.ATTRIBUTES):
                k = len(scenes.FAMILIES[attr])
                for s in range(scenes.MAX_OBJECTS):
                    tr, te = train.attributes[:, s, a] >= 0, test.attributes[:, s, a] >= 0
                    res[f"{attr}@slot{s}"] = probe(feats["train"][tr], train.attributes[tr, s, a],
                                                   feats["test"][te], test.attributes[te, s, a], k)
                if attr != "material" and site == "bottleneck":
                    # the held-out conjunction object (the one every heldout query asks about)
                    slot = held.slots[:, 0]
                    ys = held.attributes[torch.arange(len(held)), slot, a]
                    accs = []
                    for s in range(scenes.MAX_OBJECTS):
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


def reference_logits(params: dict, tokens: torch.Tensor, cfg: ScenesModelConfig) -> torch.Tensor:
    """The scenes model as plain torch over HookedTransformer-named parameters (the shipped
    safetensors, or dict(model.named_parameters())), restriction included. Training uses it because
    TL 3.x's general forward (einsums, hooks) costs ~2x more per step on 2 CPU cores; tests use it
    as a TL-free reference that both TL versions must match."""
    allowed = attention_allowed(cfg.n_layers, cfg.bottleneck_layer).to(tokens.device)
    T, H, eps = tokens.shape[1], cfg.n_heads, 1e-5
    P = lambda name: params[name]  # noqa: E731
    x = P("embed.W_E")[tokens] + P("pos_embed.W_pos")[:T]
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        h = F.layer_norm(x, (cfg.d_model,), P(b + "ln1.w"), P(b + "ln1.b"), eps)
        W = torch.cat([P(b + "attn.W_Q"), P(b + "attn.W_K"), P(b + "attn.W_V")])  # (3H, d_model, d_head)
        bias = torch.cat([P(b + "attn.b_Q"), P(b + "attn.b_K"), P(b + "attn.b_V")])  # (3H, d_head)
        q, k, v = (torch.einsum("btd,hde->bhte", h, W) + bias[None, :, None]).split(H, dim=1)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[l, :T, :T])  # scale 1/sqrt(d_head), as TL
        x = x + torch.einsum("bhte,hed->btd", z, P(b + "attn.W_O")) + P(b + "attn.b_O")
        h = F.layer_norm(x, (cfg.d_model,), P(b + "ln2.w"), P(b + "ln2.b"), eps)
        x = x + F.gelu(h @ P(b + "mlp.W_in") + P(b + "mlp.b_in")) @ P(b + "mlp.W_out") + P(b + "mlp.b_out")
    x = F.layer_norm(x, (cfg.d_model,), P("ln_final.w"), P("ln_final.b"), eps)
    return x @ P("unembed.W_U") + P("unembed.b_U")


def train(cfg: ScenesModelConfig, device="cpu", log_every: int = 100, eval_every: int = 500):
    """Train from scratch on freshly sampled "train" scenes; returns the model (eval mode)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    if cfg.act_fn != "gelu":
        raise ValueError(f"training supports act_fn='gelu' only, got {cfg.act_fn!r}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "W_pos" not in n and "W_E" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "W_pos" not in n and "W_E" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    bar = tqdm(range(cfg.steps), desc="scenes model", mininterval=2)
    ema = None
    watch = {split: scenes.sample_batch(300, seed=-1, split=split) for split in ("test", "heldout")}
    for step in bar:
        batch = scenes.sample_batch(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, split="train")
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
        if (step + 1) % eval_every == 0:
            for split, b in watch.items():
                r = evaluate(model, b)
                tqdm.write(f"step {step + 1} {split:8s} acc {r['accuracy']:.3f} | "
                           + " ".join(f"{k} {r[k]:.2f}" for k in KIND_NAMES))
    model.eval()
    with torch.no_grad():  # the training forward must be the TL model's function, restriction included
        tokens = scenes.generate_tokens(64, seed=cfg.seed, split="test").to(device)
        diff = (reference_logits(dict(model.named_parameters()), tokens, cfg) - model(tokens)).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"training forward and transformer-lens forward disagree (max |diff| {diff:.2e})")
    return model


def measure(model, cfg: ScenesModelConfig) -> dict:
    """Accuracies on fresh scenes: held-out scenes ("test") and held-out conjunctions ("heldout")."""
    seed = 10_000 + cfg.seed
    return {
        "test": evaluate(model, scenes.sample_batch(cfg.eval_scenes, seed, "test")),
        "heldout_conjunctions": evaluate(model, scenes.sample_batch(cfg.eval_scenes, seed, "heldout")),
        "train": evaluate(model, scenes.sample_batch(cfg.eval_scenes, seed, "train")),
        "eval_seed": seed, "eval_scenes": cfg.eval_scenes,
    }


def save(model, cfg: ScenesModelConfig, meta: dict, weights: Path = WEIGHTS_PATH) -> None:
    """Weights (HookedTransformer state-dict keys, parameters only) + JSON, each written atomically."""
    from safetensors.torch import save_file

    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"model": SCENES_MODEL_ID, "format": "transformer_lens_3_state_dict"})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; the file ships as package data
    os.replace(tmp, weights)
    _write_json(weights.with_suffix(".json"), meta)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _metadata(cfg: ScenesModelConfig, model, seconds: float, command: str) -> dict:
    import transformer_lens

    try:
        from importlib.metadata import version
        tl_version = version("transformer-lens")
    except Exception:  # pragma: no cover
        tl_version = getattr(transformer_lens, "__version__", "unknown")
    return {
        "model_id": SCENES_MODEL_ID,
        "config": asdict(cfg),
        "layout": {"n_ctx": N_CTX, "sep_position": SEP_POS, "bottleneck_layer": cfg.bottleneck_layer,
                   "bottleneck_hook": f"blocks.{cfg.bottleneck_layer}.hook_resid_post",
                   "n_queries": scenes.N_QUERIES, "query_len": scenes.QUERY_LEN, "max_objects": scenes.MAX_OBJECTS},
        "vocab": TOKENIZER.vocab,
        "heldout_conjunctions": sorted(scenes.HELDOUT_CONJUNCTIONS),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "training": {"command": command, "seconds": round(seconds, 1), "torch": torch.__version__,
                     "transformer_lens": tl_version, "threads": torch.get_num_threads()},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sae.lm.scenes_model", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch and write the weights + JSON")
    for f in fields(ScenesModelConfig):
        t.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    t.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights path (.safetensors; JSON beside it)")
    e = sub.add_parser("eval", help="re-measure a saved model")
    e.add_argument("--weights", type=Path, default=WEIGHTS_PATH)
    e.add_argument("--n", type=int, default=None, help="scenes per split (default: the recorded eval_scenes)")
    e.add_argument("--update", action="store_true", help="write the new measurements into the JSON")
    args = p.parse_args(argv)
    command = "python -m sae.lm.scenes_model " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.cmd == "train":
        cfg = ScenesModelConfig(**{f.name: getattr(args, f.name) for f in fields(ScenesModelConfig)})
        t0 = time.time()
        model = train(cfg)
        seconds = time.time() - t0
        meta = _metadata(cfg, model, seconds, command)
        meta["accuracy"] = measure(model, cfg)
        meta["bottleneck"] = bottleneck_report(model, cfg.bottleneck_layer)
        save(model, cfg, meta, args.out)
        print(json.dumps({k: meta[k] for k in ("accuracy", "bottleneck", "training")}, indent=2))
    else:
        model = load_scenes_model(weights=args.weights)
        meta = load_scenes_metadata(args.weights.with_suffix(".json"))
        cfg = ScenesModelConfig(**meta["config"])
        cfg.eval_scenes = args.n or cfg.eval_scenes
        report = {"accuracy": measure(model, cfg), "bottleneck": bottleneck_report(model, cfg.bottleneck_layer)}
        print(json.dumps(report, indent=2))
        if args.update:
            _write_json(args.weights.with_suffix(".json"), {**meta, **report, "measured_with": command})

if __name__ == "__main__":
    main()
