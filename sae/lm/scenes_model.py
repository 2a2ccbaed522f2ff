"""A tiny transformer-lens model trained on the scenes language (sae/lm/scenes.py), shipped with
the package (the script that trains and measures it is sae/eval/train_scenes_model.py).

    model = load_scenes_model()                 # HookedTransformer (TL 3.x) / TransformerBridge (TL 4.x)

The model sees the scene only through ONE vector: blocks.{BOTTLENECK_LAYER}.hook_resid_post at
SEP_POS. A fixed attention restriction (part of the loaded model in both TL versions) makes it so:

    layers <= BOTTLENECK_LAYER   scene and separator attend causally as usual; a query block
                                 attends only to <bos> and itself (so it learns nothing of the scene)
    layers >  BOTTLENECK_LAYER   separator and query blocks attend only to <bos>, the separator and
                                 their own block (never to scene tokens)

Hence every query's logits are a function of its own tokens and the separator's residual after
block BOTTLENECK_LAYER, and query blocks never see each other (no answer leaks between queries).
sae.eval.train_scenes_model.bottleneck_report checks this numerically (patching, ablation, probes).

TL 3.x applies the restriction with permanent hooks on blocks.{l}.attn.hook_attn_scores (they
survive reset_hooks() and run_with_cache; reset_hooks(including_permanent=True) would remove them). TL 4.x's native bridge only fires hook_attn_scores
after the fact, so there the restriction replaces each NativeAttention's `causal_mask` buffer.
Weights are stored in HookedTransformer's state-dict format (safetensors) and converted for TL 4.x
with transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sae.lm.hooked import build_model, tl_major
from sae.lm import scenes
from sae.lm.scenes import DEFAULT_WORLD, KIND_NAMES, SEP_POS, SceneBatch, World


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
    # the world (sae/lm/scenes.py World); the defaults are the shipped model's
    max_objects: int = 3
    query_mix: str = "all"

    @property
    def world(self) -> World:
        return World(max_objects=self.max_objects, min_objects=min(scenes.MIN_OBJECTS, self.max_objects),
                     query_mix=self.query_mix)


SCENES_MODEL_ID = "scenes"
ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_PATH = ASSETS / "scenes_model.safetensors"
META_PATH = ASSETS / "scenes_model.json"
BOTTLENECK_LAYER = ScenesModelConfig.bottleneck_layer
SEP_POSITION = SEP_POS
BOTTLENECK_HOOK = f"blocks.{BOTTLENECK_LAYER}.hook_resid_post"

# ----------------------------------------------------------------------------- the restriction


def attention_allowed(n_layers: int, bottleneck_layer: int, world: World = DEFAULT_WORLD) -> torch.Tensor:
    """(n_layers, n_ctx, n_ctx) bool, True where query position q may attend to key position k."""
    seg = torch.tensor(world.segment_ids())
    n_ctx = len(seg)
    q, k = seg[:, None], seg[None, :]
    BOS, SEP, FIRST_QUERY = 0, 2, 3
    causal = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
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
        if nk > self.allowed.shape[-1]:
            raise ValueError(f"the scenes model takes at most {self.allowed.shape[-1]} positions, got {nk}")
        allowed = self.allowed[nk - nq : nk, :nk].to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------- building / loading


def build_scenes_model(cfg: ScenesModelConfig, device="cpu", state_dict=None):
    """A scenes model with the attention restriction active; random init when state_dict is None
    (TL 3.x only: training reads HookedTransformer parameter names, so TL 4.x only loads weights)."""
    if state_dict is None and tl_major() >= 4:
        raise RuntimeError("training the scenes model needs transformer-lens 3.x (HookedTransformer)")
    world = cfg.world
    tl_cfg = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
                  d_mlp=cfg.d_mlp, d_vocab=len(world.tokenizer), n_ctx=world.n_ctx, act_fn=cfg.act_fn,
                  normalization_type="LN", seed=cfg.seed, model_name=SCENES_MODEL_ID)
    model = build_model(tl_cfg, state_dict, device)
    allowed = attention_allowed(cfg.n_layers, cfg.bottleneck_layer, world)
    # what world_of / hook_of read: the layout and the bottleneck its evaluation must use
    model.scenes_world, model.scenes_hook = world, f"blocks.{cfg.bottleneck_layer}.hook_resid_post"
    if tl_major() < 4:
        for l in range(cfg.n_layers):
            model.add_hook(f"blocks.{l}.attn.hook_attn_scores", _RestrictScores(allowed[l]), is_permanent=True)
    else:
        # NativeAttention masks scores with its `causal_mask` buffer (True = masked, sliced
        # [:seq, :seq]); hook_attn_scores on the bridge fires after the fact and changes nothing.
        for l, layer in enumerate(model.original_model.layers):
            layer.attn.causal_mask = (~allowed[l]).to(layer.attn.causal_mask.device)
    return model


def world_of(model) -> World:
    """The world a scenes model was built for (the default world for models built elsewhere)."""
    return getattr(model, "scenes_world", DEFAULT_WORLD)


def hook_of(model) -> str:
    """The hook whose separator residual carries the scene to the queries."""
    return getattr(model, "scenes_hook", BOTTLENECK_HOOK)


def load_scenes_metadata(path: Path | str = META_PATH) -> dict:
    """The JSON written next to the weights: config, layout, training command, measured accuracies."""
    with open(path) as f:
        return json.load(f)


def load_scenes_model(device="cpu", weights: Path | str = WEIGHTS_PATH):
    """The shipped scenes model (eval mode) with its attention restriction active."""
    weights = Path(weights)
    if not weights.exists():
        raise FileNotFoundError(f"no scenes weights at {weights}: run `python -m sae.eval.train_scenes_model train`")
    meta = load_scenes_metadata(weights.with_suffix(".json"))
    names = {f.name for f in fields(ScenesModelConfig)}
    cfg = ScenesModelConfig(**{k: v for k, v in meta["config"].items() if k in names})
    if meta["vocab"] != list(cfg.world.vocab) or meta["layout"]["n_ctx"] != cfg.world.n_ctx:
        raise ValueError(f"{weights} was trained on a different scenes vocabulary or layout than sae/scenes.py")
    model = build_scenes_model(cfg, device, load_file(str(weights), device="cpu"))
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
def task_accuracy(model, batch: SceneBatch, fwd_hooks=(), chunk: int = 1000) -> dict:
    """Answer accuracy (argmax over the whole vocabulary), overall and per query kind."""
    correct = []
    for i in range(0, len(batch), chunk):
        part = slice_batch(batch, slice(i, i + chunk))
        correct.append(query_logits(model, part, fwd_hooks).argmax(-1).cpu() == part.answers)
    correct = torch.cat(correct)
    out = {"accuracy": correct.float().mean().item(), "n_queries": correct.numel()}
    for k, name in enumerate(KIND_NAMES):
        sel = batch.kinds == k
        out[name] = correct[sel].float().mean().item() if sel.any() else float("nan")
    return out


def slice_batch(batch: SceneBatch, idx) -> SceneBatch:
    return SceneBatch(**{f.name: getattr(batch, f.name)[idx] for f in fields(SceneBatch)})


def patch_sep(value: torch.Tensor, pos: int = SEP_POS):
    """A forward hook that overwrites the bottleneck residual at `pos` (the separator) with `value` (N, d_model)."""

    def hook(resid, hook=None):
        resid = resid.clone()
        resid[:, pos] = value.to(resid.device, resid.dtype)
        return resid

    return hook


@torch.no_grad()
def bottleneck_residual(model, tokens: torch.Tensor, layer: int = BOTTLENECK_LAYER) -> torch.Tensor:
    """(N, d_model) residual at the separator after block `layer`."""
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n == name)
    return cache[name][:, world_of(model).sep_pos].cpu()


def reference_logits(params: dict, tokens: torch.Tensor, cfg: ScenesModelConfig) -> torch.Tensor:
    """The scenes model as plain torch over HookedTransformer-named parameters (the shipped
    safetensors, or dict(model.named_parameters())), restriction included. Training uses it because
    TL 3.x's general forward (einsums, hooks) costs ~2x more per step on 2 CPU cores; tests use it
    as a TL-free reference that both TL versions must match."""
    allowed = attention_allowed(cfg.n_layers, cfg.bottleneck_layer, cfg.world).to(tokens.device)
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
