"""transformer-lens 3.x and 4.x behind one surface: building models, their weights, their hooks.

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
import re
import warnings

import torch


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
        from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: PLC0415 (heavy, version-specific)

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
        import transformer_lens.model_bridge.sources.native  # noqa: F401, PLC0415 (TL 4.x only; attaches boot_native)
        from transformer_lens.config import TransformerBridgeConfig  # noqa: PLC0415 (TL 4.x only)
        from transformer_lens.model_bridge import TransformerBridge  # noqa: PLC0415 (TL 4.x only)

        tl_cfg = TransformerBridgeConfig(**cfg)
        model = TransformerBridge.boot_native(tl_cfg, device=device)
        if state_dict is not None:
            from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint  # noqa: PLC0415 (TL 4.x only)

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
