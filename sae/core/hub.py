"""Dictionaries on the Hugging Face Hub: fetch one from a repo (and sub-folder) or from a SAELens
release, and push a run's dictionary with a generated model card.

    sae.load("owner/repo/sub/folder")            # also "hf://owner/repo/sub/folder", revision="..."
    sae.load("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")      # a SAELens release
    upload("runs/x", "owner/repo", path_in_repo="topk-512")              # python -m sae.eval.upload

sae.core.io.load decides what its argument names (a local folder always wins) and calls
`download` or `release_location` here, then reads the files as it reads any dictionary folder.
Only the dictionary's own JSON and safetensors files are asked for (never pickle, nothing else).
With HF_HUB_OFFLINE=1 only the local Hugging Face cache is read (huggingface_hub's layout:
models--owner--repo/{refs,snapshots,blobs}), and a dictionary missing from it fails at once.
huggingface_hub and sae_lens are imported inside the functions that use them: `import sae` stays
light, and sae-lens (~10 s to import) is only needed for releases.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from importlib.metadata import version
from pathlib import Path

from sae.core.files import first_line

HUB_PREFIX = "hf://"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # one part of a repo id, as the Hub allows it
_TRUE = ("1", "ON", "YES", "TRUE")
CARD = "README.md"


class HubError(ValueError):
    """A repo, release or upload that cannot be used: one line saying what and where."""


def offline() -> bool:
    """HF_HUB_OFFLINE as the user set it now (huggingface_hub reads it once, at its import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


# ---- loading ------------------------------------------------------------------------------------
def parse_hub_path(path) -> tuple[str, str] | None:
    """(repo id, sub-folder) when `path` names a Hub repo, None when it names a local path: an
    existing path, one that starts like a path (/ . ~), or one whose first part exists here."""
    text = str(path)
    explicit = text.startswith(HUB_PREFIX)
    if explicit:
        text = text[len(HUB_PREFIX):]
    elif Path(text).exists() or text.startswith(("/", ".", "~")) or Path(text.split("/")[0]).exists():
        return None
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not all(_NAME.match(p) for p in parts[:2]) or any(p in ("", ".", "..") for p in parts):
        if explicit:
            raise HubError(f"{path}: not a Hub path (hf://owner/repo or hf://owner/repo/sub/folder)")
        return None
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def download(repo_id: str, subfolder: str, names, revision: str | None = None) -> Path:
    """The local folder holding files `names` of repo_id/subfolder: from the Hugging Face cache,
    downloaded into it first unless HF_HUB_OFFLINE=1. Only those names are fetched."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (heavy: only Hub loads need it)

    prefix = f"{subfolder}/" if subfolder else ""
    where = f"Hub repo {repo_id}" + (f" folder {subfolder}" if subfolder else "") + (f" @ {revision}" if revision else "")
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + n for n in names],
                                 local_files_only=offline())
    except Exception as e:  # huggingface_hub's errors run to many lines; the first says what
        reason = first_line(e)
        mode = " (HF_HUB_OFFLINE=1: only the local Hugging Face cache is read)" if offline() else ""
        raise HubError(f"{where}: {reason}{mode}") from None
    folder = Path(root) / subfolder
    if not (folder / names[0]).is_file():
        raise HubError(f"{where}: no {names[0]} there, so no dictionary")
    return folder


def release_location(release: str, sae_id: str) -> tuple[str, str, dict]:
    """(repo id, folder, cfg.json overrides) of a SAELens release's SAE, from sae-lens' directory.
    Releases stored in another library's format need SAELens' converters and are refused."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory  # noqa: PLC0415 (heavy, optional: releases only)
    except ImportError:
        raise HubError(f"SAELens release {release!r}: loading releases needs sae-lens (pip install sae-lens)") from None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        near = difflib.get_close_matches(release, list(directory), n=3)
        raise HubError(f"unknown SAELens release {release!r}" + (f"; did you mean {', '.join(near)}?" if near else
                       f" ({len(directory)} releases in sae-lens {version('sae-lens')})"))
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        near = difflib.get_close_matches(sae_id, list(lookup.saes_map), n=3) or list(lookup.saes_map)[:3]
        raise HubError(f"SAELens release {release!r} has no SAE id {sae_id!r}; its ids include {', '.join(near)}")
    if lookup.conversion_func:
        raise HubError(f"SAELens release {release!r} is stored in the {lookup.conversion_func!r} format, which needs "
                       "SAELens' own converter; sae.load reads releases in SAELens' layout (cfg.json + safetensors)")
    if sae_id in (lookup.norm_scaling_factor or {}):
        raise HubError(f"SAELens release {release!r} id {sae_id!r} needs a run-time activation scale "
                       "(norm_scaling_factor) that is not stored with its weights")
    return lookup.repo_id, lookup.saes_map[sae_id], dict(lookup.config_overrides or {})


# ---- uploading ----------------------------------------------------------------------------------
def dictionary_files(folder: Path) -> list[Path]:
    """The files of a dictionary folder that get uploaded: its JSON and safetensors, nothing else."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    names = {p.name for p in found}
    if "cfg.json" not in names or "sae_weights.safetensors" not in names:
        raise HubError(f"{folder}: not a dictionary folder (needs cfg.json and sae_weights.safetensors)")
    return found


def check_repo_path(repo_id: str, path_in_repo: str):
    if len(repo_id.split("/")) != 2 or not all(_NAME.match(p) for p in repo_id.split("/")):
        raise HubError(f"repo id {repo_id!r} must be owner/name (letters, digits, '.', '_', '-')")
    parts = path_in_repo.strip("/").split("/") if path_in_repo.strip("/") else []
    if path_in_repo.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"path in repo {path_in_repo!r} must be a relative folder such as 'topk-512' (no '..')")


def upload(path, repo_id: str, path_in_repo: str = "", *, revision: str | None = None, private: bool = False,
           commit_message: str = "", token: str | None = None, api=None):
    """Push a dictionary (a run folder's sae/, or a dictionary folder) to `repo_id`, under
    `path_in_repo`, with a model card (README.md) written from its cfg.json and the run's
    metrics.json: one commit. `api` is a huggingface_hub.HfApi (made with `token` when None).
    Returns what HfApi.create_commit returns."""
    from huggingface_hub import CommitOperationAdd, HfApi  # noqa: PLC0415 (heavy: only uploads need it)

    folder, run = locate_dictionary(path)
    check_repo_path(repo_id, path_in_repo)
    files = dictionary_files(folder)
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
    card = model_card(folder, run, repo_id, prefix.rstrip("/"))
    ops = [CommitOperationAdd(path_in_repo=prefix + f.name, path_or_fileobj=str(f)) for f in files]
    ops.append(CommitOperationAdd(path_in_repo=prefix + CARD, path_or_fileobj=card.encode("utf-8")))
    arch = (_read(folder / "cfg.json").get("sae") or {}).get("architecture", "SAE")
    message = commit_message or f"Upload {arch} dictionary" + (f" to {prefix.rstrip('/')}" if prefix else "")
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id, operations=ops, revision=revision, commit_message=message)


def locate_dictionary(path) -> tuple[Path, Path | None]:
    """(dictionary folder, run folder or None) for a run folder or a dictionary folder."""
    path = Path(path)
    if (path / "cfg.json").is_file():
        run = path.parent if (path.parent / "config.json").is_file() else None
        return path, run
    if (path / "sae" / "cfg.json").is_file():
        return path / "sae", path
    raise HubError(f"{path}: neither a dictionary folder (cfg.json) nor a run folder (sae/cfg.json)")


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_card(folder: Path, run: Path | None, repo_id: str, sub: str) -> str:
    """A README.md for the Hub: what the dictionary is, its metrics, and how to load it."""
    cfg = _read(folder / "cfg.json")
    meta, ours = cfg.get("metadata") or {}, cfg.get("sae") or {}
    metrics = _read(run / "metrics.json") if run is not None else {}
    train = (_read(run / "config.json").get("train") or {}) if run is not None else {}
    arch = ours.get("architecture") or cfg.get("architecture", "?")
    model, hook = meta.get("model_name") or "an unnamed model", meta.get("hook_name") or "an unnamed hook"
    target = f"{repo_id}/{sub}" if sub else repo_id
    lines = ["---", "tags:", "- sparse-autoencoder", "- sae", "- saelens", "---", "",
             f"# {arch} sparse autoencoder for `{model}` at `{hook}`", "",
             f"{cfg.get('d_sae', '?')} latents on {cfg.get('d_in', '?')}-dimensional activations, saved by the `sae` "
             "library in SAELens' layout (cfg.json + sae_weights.safetensors" +
             (", sparsity.safetensors: log10 feature densities" if (folder / "sparsity.safetensors").is_file() else "") + ").", ""]
    lines += _metrics_table(metrics) + _training_table(train, ours)
    lines += ["## Load it", "", "```python", "import sae", f'm = sae.load("{target}")      # codes = m.encode(x)', "```", ""]
    if arch in ("relu", "topk", "batchtopk", "jumprelu"):
        pattern = f"{sub}/*" if sub else "*"
        lines += ["or with SAELens:", "", "```python", "from huggingface_hub import snapshot_download",
                  "from sae_lens import SAE", f'path = snapshot_download("{repo_id}", allow_patterns=["{pattern}"])',
                  f'sae = SAE.load_from_disk(path{" + " + repr("/" + sub) if sub else ""})', "```", ""]
    return "\n".join(lines)


def _metrics_table(metrics: dict) -> list[str]:
    keys = ("fvu", "explained_variance", "cossim", "l0", "dead_share", "dense_share", "mse")
    rows = [f"| {k} | {metrics[k]:.4g} |" for k in keys if isinstance(metrics.get(k), (int, float))]
    if not rows:
        return []
    over = f" over {metrics['tokens']} activations" if metrics.get("tokens") else ""
    return [f"## Metrics (end of training{over})", "", "| metric | value |", "|---|---|", *rows, ""]


def _training_table(train: dict, ours: dict) -> list[str]:
    rows = [f"| {k} | {train[k]} |" for k in ("steps", "batch_size", "lr", "seed") if k in train]
    rows += [f"| {k} | {v} |" for k, v in (ours.get("config") or {}).items() if k in ("k", "n_slots", "l1_coeff", "sparsity")]
    return ["## Training", "", "| option | value |", "|---|---|", *rows, ""] if rows else []
