"""SAEBench core-eval results for our dictionaries: the JSON layout SAEBench's `core` eval writes
(sae_bench/evals/core/eval_output.py, field names as in sae-bench 0.6.0), so results sit beside
published SAEs in SAEBench's tables and plots.

    res = core_eval(model, sae, hook, batches, model_name="scenes", dataset="...")   # library
    python -m sae.eval.saebench runs/topk-x [--model scenes] [--out-dir eval_results]
    -> eval_results/{release}_{sae_id}_eval_results.json                            (SAEBench's name)

The numbers come from one pass of sae.lm.splice over held-out token batches (CE/KL with SAEBench's
zero-ablation baseline; the mean-ablation numbers go to eval_result_unstructured) plus weight
statistics. Definitions follow SAEBench's code where it is well defined; where it is not, ours
are used and said so in eval_result_unstructured["definitions"]:
  explained_variance  1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over all evaluated rows
                      (SAEBench 0.6's "correct" formula subtracts a squared mean of squares);
                      explained_variance_legacy is SAEBench's per-token, per-batch version, as is
  mse                 mean over tokens of ||x - x_hat||^2 (SAEBench also divides by the number of
                      tokens in the batch, which makes it depend on the batch size)
  l1                  mean over tokens of the summed codes (SAEBench: the same)
  CE/KL               over every next-token prediction, except for the built-in scenes model, which
                      is trained on its query answers only (elsewhere its CE is worse than uniform):
                      there over the answers; the all-position numbers stay in the unstructured part
Encoders (MiniLM) have no token loss: the CE/KL fields are -1 (SAEBench's value for NaN) and the
embedding metrics of sae.lm.splice go to eval_result_unstructured.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from sae.core.config import argument, option, parse_config
from sae.core.files import write_result
from sae.lm.splice import load_for_eval, make_batches, resolve_sae_dir, splice_eval

PRECISION = 10  # SAEBench rounds per-latent values to 10 digits (DEFAULT_FLOAT_PRECISION)


@dataclass
class CoreConfig:
    path: str = argument("dictionary directory (cfg.json) or run directory (sae/cfg.json)")
    model: str = option("", "model id ('' = the dictionary's metadata.model_name)")
    hook: str = option("", "hook name ('' = the dictionary's metadata.hook_name)")
    source: str = option("", "token source, as for sae.lm.splice ('' = scenes generator / shipped English)")
    split: str = option("test", "scenes generator split")
    n_sequences: int = option(512, "sequences to evaluate")
    seq_len: int = option(0, "text sources: tokens per sequence (0 = model n_ctx)")
    batch_size: int = option(64, "sequences per forward pass (SAEBench's batch_size_prompts)")
    seed: int = option(12345, "generator seed")
    release: str = option("local", "sae_lens_release_id, and the first part of the file name")
    sae_id: str = option("", "sae_lens_id ('' = the run directory's name)")
    out_dir: str = option("eval_results", "folder for {release}_{sae_id}_eval_results.json")
    device: str = option("cpu", "device for model and SAE")


class _Rows:
    """Statistics of the replaced rows that sae.lm.splice's RunningStats does not keep."""

    def __init__(self, n_latents: int):
        self.n = 0
        self.fires = torch.zeros(n_latents, dtype=torch.float64)
        self.prompts = torch.zeros(n_latents, dtype=torch.float64)  # sequences in which a latent fired
        self.sums = dict.fromkeys(("l2_in", "l2_out", "l2_ratio", "xhat_sq", "x_dot_xhat", "ev_legacy", "mse_literal", "l1"), 0.0)

    @torch.no_grad()
    def __call__(self, x, x_hat, codes, batch_index, seq):
        x, x_hat, codes = x.double(), x_hat.double(), codes.double().cpu()
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        rss = (x - x_hat).pow(2).sum(-1)
        s = self.sums
        s["l2_in"] += n_in.sum().item()
        s["l2_out"] += n_out.sum().item()
        s["l2_ratio"] += (n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum().item()
        s["xhat_sq"] += n_out.pow(2).sum().item()
        s["x_dot_xhat"] += (x * x_hat).sum().item()
        s["ev_legacy"] += (1 - rss / (x - x.mean(0)).pow(2).sum(-1)).sum().item()
        s["mse_literal"] += (rss / len(x)).sum().item()
        s["l1"] += codes.sum().item()
        fired = codes > 0
        self.fires += fired.sum(0)
        per_seq = torch.zeros(int(seq.max()) + 1, codes.shape[1], dtype=torch.float64).index_add_(0, seq.cpu(), fired.double())
        self.prompts += (per_seq > 0).sum(0)
        self.n += len(x)


def max_cosine(vectors: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(n,) largest cosine similarity of each row with any other row."""
    v = torch.nn.functional.normalize(vectors.double(), dim=-1)
    out = torch.empty(len(v), dtype=torch.float64)
    for i in range(0, len(v), chunk):
        sims = v[i: i + chunk] @ v.T
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = -math.inf
        out[i: i + chunk] = sims.max(1).values
    return out


@torch.no_grad()
def weight_metrics(sae) -> dict[str, torch.Tensor]:
    """Per-latent weight statistics (SAEBench's get_featurewise_weight_based_metrics). For a binding
    SAE the decoder is the materialised [D; M_2 D; ...]."""
    W_enc, W_dec = sae.W_enc.detach().double().cpu(), sae.flat_decoder().detach().double().cpu()
    return {"encoder_bias": sae.b_enc.detach().double().cpu(), "encoder_norm": W_enc.norm(dim=0),
            "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(W_enc.T, W_dec, dim=-1),
            "max_encoder_cosine_sim": max_cosine(W_enc.T), "max_decoder_cosine_sim": max_cosine(W_dec)}


def _clean(v):
    """SAEBench writes NaN as -1 (replace_nans_with_negative_one)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return -1 if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sae_lens_version():
    try:
        return version("sae_lens")
    except PackageNotFoundError:
        return None


def core_eval(model, sae, hook: str, batches, *, model_name: str, dataset: str, sae_cfg_dict: dict | None = None,
              sae_id: str = "", release: str = "local", scale: float = 1.0, progress: bool = False) -> dict:
    """The SAEBench core-eval output object (a dict, ready for json.dump) for `sae` at `hook`."""
    rows = _Rows(sae.n_total)
    sp = splice_eval(model, sae, hook, batches, scale=scale, on_rows=rows, progress=progress)
    density = rows.fires / max(rows.n, 1)
    weights = weight_metrics(sae)
    lm = sp["objective"] == "next_token"
    # the built-in scenes model is trained on its query answers only: elsewhere its next-token CE is
    # worse than uniform, so its CE/KL fields use the answers (the "all" scope stays in "splice")
    scope = "answers" if "answers" in sp["scopes"] else "all"
    T = batches[0].tokens.shape[1]
    eval_config = {
        "model_name": model_name, "llm_dtype": "float32", "batch_size_prompts": len(batches[0].tokens),
        "n_eval_reconstruction_batches": len(batches), "n_eval_sparsity_variance_batches": len(batches),
        "dataset": dataset, "context_size": T, "compute_kl": lm, "compute_ce_loss": lm, "compute_l2_norms": True,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": True, "verbose": False,
    }
    return _clean({
        "eval_type_id": "core", "eval_config": eval_config, "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": _metrics(sp, rows, density, weights, sp["scopes"][scope] if lm else {}),
        "eval_result_details": _details(rows, density, weights), "sae_bench_commit_hash": "unknown",
        "sae_lens_id": sae_id, "sae_lens_release_id": release, "sae_lens_version": _sae_lens_version(),
        "sae_cfg_dict": sae_cfg_dict, "eval_result_unstructured": _unstructured(sae, hook, sp, rows, scope if lm else None),
    })


def _metrics(sp: dict, rows: _Rows, density: torch.Tensor, weights: dict, ce_kl: dict) -> dict:
    """SAEBench's eval_result_metrics; `ce_kl` is the splice scope CE/KL are read from ({} = none)."""
    rec, s, n, nan = sp["reconstruction"], rows.sums, rows.n, math.nan
    live = density.sum()
    return {
        "model_behavior_preservation": {
            "kl_div_score": ce_kl.get("kl_recovered_zero", nan), "kl_div_with_ablation": ce_kl.get("kl_zero", nan),
            "kl_div_with_sae": ce_kl.get("kl_sae", nan)},
        "model_performance_preservation": {
            "ce_loss_score": ce_kl.get("ce_recovered_zero", nan), "ce_loss_with_ablation": ce_kl.get("ce_zero", nan),
            "ce_loss_with_sae": ce_kl.get("ce_sae", nan), "ce_loss_without_sae": ce_kl.get("ce_clean", nan)},
        "reconstruction_quality": {
            "explained_variance": rec["explained_variance"], "explained_variance_legacy": s["ev_legacy"] / n,
            "mse": rec["mse"], "cossim": rec["cossim"]},
        "shrinkage": {
            "l2_norm_in": s["l2_in"] / n, "l2_norm_out": s["l2_out"] / n, "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"] if s["x_dot_xhat"] else nan},
        "sparsity": {"l0": rec["l0"], "l1": s["l1"] / n},
        "token_stats": {"total_tokens_eval_reconstruction": n, "total_tokens_eval_sparsity_variance": n},
        "misc_metrics": {
            "freq_over_1_percent": (density > 0.01).double().mean().item(),
            "freq_over_10_percent": (density > 0.1).double().mean().item(),
            "normalized_freq_over_1_percent": (density[density > 0.01].sum() / live).item() if live > 0 else 0.0,
            "normalized_freq_over_10_percent": (density[density > 0.1].sum() / live).item() if live > 0 else 0.0,
            "average_max_encoder_cosine_sim": weights["max_encoder_cosine_sim"].mean().item(),
            "average_max_decoder_cosine_sim": weights["max_decoder_cosine_sim"].mean().item(),
            "frac_alive": (density > 0).double().mean().item(),
        },
    }


def _details(rows: _Rows, density: torch.Tensor, weights: dict) -> list[dict]:
    """SAEBench's per-latent eval_result_details, its keys in its order, rounded as it rounds."""
    cah = rows.fires / rows.prompts  # 0/0 = NaN for latents that never fired -> -1
    order = ("encoder_bias", "encoder_norm", "encoder_decoder_cosine_sim", "max_decoder_cosine_sim",
             "max_encoder_cosine_sim")
    return [{"index": i, "feature_density": round(density[i].item(), PRECISION),
             "consistent_activation_heuristic": round(cah[i].item(), PRECISION),
             **{k: round(weights[k][i].item(), PRECISION) for k in order}} for i in range(len(density))]


def _unstructured(sae, hook: str, sp: dict, rows: _Rows, ce_kl_scope: str | None) -> dict:
    """What SAEBench's layout has no field for: the splice results and the definitions used."""
    s, n = rows.sums, rows.n
    return {
        "producer": "sae.eval.saebench (not SAEBench itself; SAEBench's layout)", "git_commit": _git_commit(),
        "hook_name": hook, "architecture": sae.architecture, "objective": sp["objective"],
        "splice": {k: v for k, v in sp.items() if k != "reconstruction"},
        "mse_saebench_literal": s["mse_literal"] / n,
        "definitions": {
            "explained_variance": "1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2 over all evaluated tokens",
            "explained_variance_legacy": "mean_t (1 - ||x_t - x_hat_t||^2 / ||x_t - batch mean||^2), as SAEBench",
            "mse": "mean_t ||x_t - x_hat_t||^2 (SAEBench divides this by the batch's token count as well: mse_saebench_literal)",
            "ablation": "zero ablation, as SAEBench; mean-ablation scores are in splice.scopes.*.*_recovered_mean",
            "ce_kl_positions": {"answers": "the scenes model's query answers (the only tokens it is trained to predict)",
                                "all": "every next-token prediction", None: None}[ce_kl_scope],
            "tokens": "BOS, PAD and tokenizer special tokens are neither reconstructed nor counted",
        },
    }


def result_path(out_dir: str | Path, release: str, sae_id: str) -> Path:
    """SAEBench's file name: {release}_{sae_id}_eval_results.json with '/' -> '_'."""
    return Path(out_dir) / f"{release}_{sae_id}_eval_results.json".replace("/", "_")


def main(argv=None) -> int:
    cfg = parse_config(CoreConfig, argv, "python -m sae.eval.saebench", __doc__.split("\n\n")[0], positional=("path",))
    try:
        if cfg.n_sequences <= 0 or cfg.batch_size <= 0:
            raise ValueError("--n-sequences and --batch-size must be positive")
        sae_dir = resolve_sae_dir(Path(cfg.path))
        sae, model, model_id, hook, sae_cfg = load_for_eval(cfg.path, cfg.model, cfg.hook, cfg.device)
        sae_cfg.setdefault("metadata", {}).update(model_name=model_id, hook_name=hook)
        batches = make_batches(model_id, model, cfg.source, cfg.n_sequences, cfg.batch_size, cfg.split, cfg.seed, cfg.seq_len)
        source = cfg.source or ("generator" if model_id == "scenes" else "sae/lm/data/english.txt")
        dataset = (f"sae.lm.scenes.generate_tokens(split={cfg.split}, seed={cfg.seed})" if source == "generator" else source)
        sae_id = cfg.sae_id or (sae_dir.parent.name if sae_dir.name == "sae" else sae_dir.name)
        res = core_eval(model, sae, hook, batches, model_name=model_id, dataset=f"{dataset}, {cfg.n_sequences} sequences",
                        sae_cfg_dict=sae_cfg, sae_id=sae_id, release=cfg.release, progress=True)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = result_path(cfg.out_dir, cfg.release, sae_id)
    write_result(out, res)
    m = res["eval_result_metrics"]
    print(json.dumps({k: m[k] for k in ("model_performance_preservation", "model_behavior_preservation",
                                         "reconstruction_quality", "sparsity")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
