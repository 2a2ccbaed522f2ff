"""Saving and loading: trained dictionaries (SAELens layout) and resumable training checkpoints.

A dictionary directory holds
    cfg.json                  SAELens fields (so SAELens' SAE.load_from_disk reads it) + our "sae" block
    sae_weights.safetensors   W_enc, W_dec, b_enc, b_dec (+ threshold, W_skip), SAELens keys and orientation
    sparsity.safetensors      "sparsity": log10 feature density per latent (optional)
Everything is written to a temporary directory first and renamed into place, so a crash never
leaves a half-written directory that looks complete, and a dictionary replaces only a folder that
is new, empty or an earlier dictionary: a user's other files are never deleted (sae/files.py).
Only safetensors and JSON are read: no pickle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae.core import files, hub
from typing import TYPE_CHECKING

from sae.core.architectures.registry import ARCHITECTURES

if TYPE_CHECKING:  # annotations only: the base class imports this module for SAE.save
    from sae.core.architectures.base import SAE

FORMAT_VERSION = 1
CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# The SAELens version whose cfg.json layout we write (>= 6 skips its legacy-config conversion).
SAELENS_LAYOUT_VERSION = "6.0.0"
# SAELens architecture names -> ours, for directories SAELens saved.
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
# SAELens transcoder architectures -> (ours, sparsity rule); they encode x without b_dec (d_out wide).
TRANSCODERS_FROM_SAELENS = {"transcoder": ("transcoder", "relu"), "skip_transcoder": ("skip_transcoder", "relu"),
                            "jumprelu_transcoder": ("transcoder", "jumprelu"),
                            "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu")}


class LoadError(ValueError):
    """A directory or file that cannot be read as what it claims to be."""


def write_json(path: Path, obj):
    """Atomically write JSON (sae.core.files: temporary name, fsync, rename)."""
    files.write_json(path, obj)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise LoadError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path}: corrupt or truncated safetensors file ({e})") from None


# ---- dictionaries -----------------------------------------------------------------------------
def save(model: SAE, path: str | os.PathLike, *, metadata: dict | None = None,
         log_feature_density: Tensor | None = None) -> Path:
    """Write a dictionary directory. `metadata` (model_name, hook_name, ...) goes to cfg.json."""
    final = Path(path)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.export_state().items()}
    cfg = {
        "architecture": "standard",
        "d_in": model.d_in,
        "d_sae": model.n_total,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # any training-time scaling is folded into the weights
        "reshape_activations": "none",
        **model.saelens_fields(),
        "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION,
                     "sae_lens_training_version": SAELENS_LAYOUT_VERSION, **(metadata or {})},
        "sae": {"format_version": FORMAT_VERSION, "architecture": model.architecture,
                "config": model.config_dict()},
    }
    with files.replacing_dir(final, "dictionary", is_dictionary) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        if model.extra_weights_file:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.export_extra().items()},
                      str(tmp / model.extra_weights_file))
        if log_feature_density is not None:
            save_file({"sparsity": log_feature_density.detach().float().cpu().contiguous()},
                      str(tmp / SPARSITY_FILE))
        write_json(tmp / CFG_FILE, cfg)
    return final


def is_dictionary(path: Path) -> bool:
    """A folder this library saved a dictionary into, holding nothing else (safe to replace)."""
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except (OSError, ValueError):
        return False
    ours = isinstance(cfg, dict) and isinstance(cfg.get("sae"), dict)
    extra = {cls.extra_weights_file for cls in ARCHITECTURES.values() if cls.extra_weights_file}
    return ours and files.only_files(path, {CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, *extra})


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
         sae_id: str | None = None) -> SAE:
    """Load a dictionary: a local folder saved by `save` (or by SAELens, same architectures); a
    Hugging Face Hub repo with an optional sub-folder, "owner/repo/sub/folder" or
    "hf://owner/repo/sub/folder" (`revision`: a branch, tag or commit); or, with `sae_id`, the SAE
    `sae_id` of the SAELens release `path` (needs sae-lens). A local folder wins over a Hub id of
    the same name. HF_HUB_OFFLINE=1 reads only the local Hugging Face cache (sae/core/hub.py)."""
    folder, overrides = locate(path, revision=revision, sae_id=sae_id)
    return _load_dir(folder, device, overrides)


def locate(path: str | os.PathLike, *, revision: str | None = None, sae_id: str | None = None) -> tuple[Path, dict]:
    """(local folder, cfg.json overrides) of what `load` takes: the folder itself, or the Hugging
    Face cache's copy of a Hub dictionary or SAELens release (downloaded unless HF_HUB_OFFLINE=1)."""
    try:
        if sae_id is not None:
            repo_id, folder, overrides = hub.release_location(str(path), sae_id)
            return hub.download(repo_id, folder, _file_names(), revision), overrides
        where = hub.parse_hub_path(path)
        if where is not None:
            return hub.download(*where, _file_names(), revision), {}
    except hub.HubError as e:
        raise LoadError(str(e)) from None
    return Path(path), {}


def _file_names() -> list[str]:
    """Every file a dictionary folder may hold, cfg.json first (what a Hub download asks for)."""
    extra = sorted({cls.extra_weights_file for cls in ARCHITECTURES.values() if cls.extra_weights_file})
    return [CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, *extra]


def _load_dir(path: Path, device, overrides: dict | None = None) -> SAE:
    """A dictionary folder; `overrides` replace cfg.json fields (a SAELens release's config_overrides)."""
    if not path.is_dir():
        raise LoadError(f"{path}: not a directory")
    cfg = {**read_json(path / CFG_FILE), **(overrides or {})}
    state = read_safetensors(path / WEIGHTS_FILE)
    if "sae" in cfg:
        model = _from_our_cfg(path, cfg["sae"])
    else:
        model, state = _from_saelens_cfg(path, cfg, state)
    expected = set(model.export_state())
    if set(state) != expected:
        raise LoadError(f"{path / WEIGHTS_FILE}: expected tensors {sorted(expected)}, found {sorted(state)}")
    for name, tensor in model.export_state().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise LoadError(f"{path / WEIGHTS_FILE}: {name} has shape {tuple(state[name].shape)}, "
                            f"cfg.json implies {tuple(tensor.shape)}")
        if not torch.isfinite(state[name]).all():
            raise LoadError(f"{path / WEIGHTS_FILE}: {name} contains NaN or inf")
    extra = read_safetensors(path / model.extra_weights_file) if model.extra_weights_file else None
    try:
        model.load_export_state({k: v.float() for k, v in state.items()}, extra)
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from None
    return model.to(device).eval()


def _from_our_cfg(path: Path, block: dict) -> SAE:
    if block.get("format_version", 0) > FORMAT_VERSION:
        raise LoadError(f"{path / CFG_FILE}: format_version {block['format_version']} is newer than "
                        f"this library reads ({FORMAT_VERSION}); upgrade sae")
    arch = block.get("architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(f"{path / CFG_FILE}: unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    options = dict(block.get("config", {}))
    try:
        return ARCHITECTURES[arch](**options)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path / CFG_FILE}: invalid config for {arch}: {e}") from None


def _from_saelens_cfg(path: Path, cfg: dict, state: dict[str, Tensor]) -> tuple[SAE, dict[str, Tensor]]:
    arch = cfg.get("architecture", "standard")
    if arch in TRANSCODERS_FROM_SAELENS:
        return _transcoder_from_saelens(path, cfg, state)
    if arch not in FROM_SAELENS:
        known = sorted({*FROM_SAELENS, *TRANSCODERS_FROM_SAELENS})
        raise LoadError(f"{path / CFG_FILE}: unknown architecture {arch!r}; "
                        f"SAELens architectures read: {', '.join(known)}")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):  # pre-6.0 configs say false
        raise LoadError(f"{path / CFG_FILE}: normalize_activations={cfg['normalize_activations']!r} needs a "
                        "run-time scale that is not stored with the weights; fold it and save with 'none'")
    try:
        d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, ValueError, TypeError):
        raise LoadError(f"{path / CFG_FILE}: needs integer d_in and d_sae") from None
    ours = FROM_SAELENS[arch]
    options = {"k": int(cfg.get("k", 100))} if ours in ("topk", "batchtopk") else {}
    model = ARCHITECTURES[ours](d_in, n, **options)
    state = dict(state)
    if "W_enc" not in state or "W_dec" not in state or "b_enc" not in state or "b_dec" not in state:
        return model, state  # the caller reports the missing tensors
    with torch.no_grad():
        if ours == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens ranks pre * ||W_dec_i|| and decodes acts / ||W_dec_i||: fold both into the weights.
            norms = state["W_dec"].float().norm(dim=1)
            state["W_enc"] = state["W_enc"] * norms
            state["b_enc"] = state["b_enc"] * norms
            state["W_dec"] = state["W_dec"] / norms[:, None]
        if not cfg.get("apply_b_dec_to_input", True):
            # We always encode x - b_dec; an SAE that encodes x needs b_enc + b_dec @ W_enc.
            state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
        if ours == "batchtopk" and "threshold" not in state and "topk_threshold" in state:
            state["threshold"] = state.pop("topk_threshold").expand(n)
    return model, state


def _transcoder_from_saelens(path: Path, cfg: dict, state: dict[str, Tensor]) -> tuple[SAE, dict[str, Tensor]]:
    """A transcoder SAELens saved: our Transcoder / SkipTranscoder with its ReLU or JumpReLU rule.
    Weights map one to one (SAELens encodes x, not x - b_dec, as we do for transcoders)."""
    ours, rule = TRANSCODERS_FROM_SAELENS[cfg["architecture"]]
    if cfg.get("apply_b_dec_to_input", False):
        raise LoadError(f"{path / CFG_FILE}: a transcoder with apply_b_dec_to_input true (its b_dec is the output's)")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise LoadError(f"{path / CFG_FILE}: normalize_activations={cfg['normalize_activations']!r} needs a "
                        "run-time scale that is not stored with the weights")
    try:
        d_in, n, d_out = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["d_out"])
    except (KeyError, ValueError, TypeError):
        raise LoadError(f"{path / CFG_FILE}: needs integer d_in, d_sae and d_out") from None
    return ARCHITECTURES[ours](d_in, n, d_out=d_out, sparsity=rule), dict(state)


def load_sparsity(path: str | os.PathLike) -> Tensor | None:
    """log10 feature densities saved beside a dictionary, or None if absent."""
    file = Path(path) / SPARSITY_FILE
    return read_safetensors(file)["sparsity"] if file.exists() else None


# ---- training checkpoints ---------------------------------------------------------------------
def save_checkpoint(path: Path, parts: dict[str, tuple[SAE, torch.optim.Optimizer]], state: dict,
                    tensors: dict[str, Tensor]):
    """A checkpoint directory: every part's model + optimizer tensors (one safetensors file, keys
    under each part's prefix: "" for a run of one dictionary, "name/" in a set) and the trainer
    state (JSON). `state` is JSON-serialisable; `tensors` holds extra tensors such as RNG states.
    """
    flat, groups = {}, {}
    for prefix, (model, optimizer) in parts.items():
        opt_state = optimizer.state_dict()
        flat.update({f"{prefix}model.{k}": v for k, v in model.state_dict().items()})
        for idx, per_param in opt_state["state"].items():
            for name, value in per_param.items():
                flat[f"{prefix}optim.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        groups[prefix] = opt_state["param_groups"]
    flat.update({f"extra.{k}": v for k, v in tensors.items()})
    flat = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
    meta = {"format_version": FORMAT_VERSION, "state": state,
            # one dictionary: the layout every checkpoint had before sets existed
            "optimizer_groups": groups[""] if list(groups) == [""] else groups}
    with files.replacing_dir(path, "checkpoint", is_checkpoint) as tmp:
        save_file(flat, str(tmp / "tensors.safetensors"))
        write_json(tmp / "trainer.json", meta)  # written last: its presence marks a complete checkpoint


def is_checkpoint(path: Path) -> bool:
    return files.only_files(path, ("tensors.safetensors", "trainer.json"))


def load_checkpoint(path: Path, parts: dict[str, tuple[SAE, torch.optim.Optimizer]]) -> tuple[dict, dict[str, Tensor]]:
    """Restore every part's model and optimizer in place; return (trainer state, extra tensors)."""
    meta = read_json(path / "trainer.json")
    flat = read_safetensors(path / "tensors.safetensors")
    groups = meta["optimizer_groups"] if list(parts) != [""] else {"": meta["optimizer_groups"]}
    for prefix, (model, optimizer) in parts.items():
        model_state = {k[len(prefix) + 6:]: v for k, v in flat.items() if k.startswith(f"{prefix}model.")}
        try:
            model.load_state_dict(model_state)
        except RuntimeError as e:
            raise LoadError(f"{path}: checkpoint does not fit {prefix or 'this model'} ({str(e).splitlines()[0]})") from None
        per_param: dict[int, dict] = {}
        for key, value in flat.items():
            if key.startswith(f"{prefix}optim."):
                _, idx, name = key[len(prefix):].split(".", 2)
                per_param.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": groups[prefix]})
    extras = {k[len("extra."):]: v for k, v in flat.items() if k.startswith("extra.")}
    return meta["state"], extras
