"""sae.eval.saebench: SAEBench core-eval JSON, field names and values checked on exact dictionaries."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import sae
from sae.lm import models
from sae.eval import saebench
from sae.lm import splice

D = 16
CFG = dict(d_model=D, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=40, n_ctx=10, act_fn="gelu", seed=0)
HOOK = "blocks.0.hook_resid_post"

# Field names of sae-bench 0.6.0 (sae_bench/evals/core/eval_output.py, eval_config.py, base_eval_output.py).
SCHEMA = {
    "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
    "model_performance_preservation": ["ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"],
    "reconstruction_quality": ["explained_variance", "explained_variance_legacy", "mse", "cossim"],
    "shrinkage": ["l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"],
    "sparsity": ["l0", "l1"],
    "token_stats": ["total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"],
    "misc_metrics": ["freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                     "average_max_decoder_cosine_sim", "frac_alive"],
}
TOP = ["eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics", "eval_result_details",
       "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
       "eval_result_unstructured"]
DETAIL = ["index", "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
          "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim"]
CONFIG = ["model_name", "llm_dtype", "batch_size_prompts", "n_eval_reconstruction_batches",
          "n_eval_sparsity_variance_batches", "dataset", "context_size", "compute_kl", "compute_ce_loss",
          "compute_l2_norms", "compute_sparsity_metrics", "compute_variance_metrics",
          "compute_featurewise_density_statistics", "compute_featurewise_weight_based_metrics",
          "exclude_special_tokens_from_reconstruction", "verbose"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = models.build_model(CFG)
    path = tmp_path_factory.mktemp("tok") / "t.npy"
    np.save(path, np.random.default_rng(0).integers(0, CFG["d_vocab"], (16, CFG["n_ctx"])))
    return model, splice.make_batches("tiny", model, str(path), n_sequences=16, batch_size=8)


def exact_relu(dead: int = 0) -> sae.SAE:
    """x_hat = relu(x) - relu(-x) = x, plus `dead` latents that never fire."""
    eye = torch.eye(D)
    m = sae.ReLUSAE(D, 2 * D + dead).eval()
    with torch.no_grad():
        m.W_enc.zero_()
        m.W_enc[:, : 2 * D] = torch.cat([eye, -eye]).T
        m.W_dec.zero_()
        m.W_dec[: 2 * D] = torch.cat([eye, -eye])
        m.W_dec[2 * D:] = torch.randn(dead, D)
        m.b_enc.zero_()
        m.b_enc[2 * D:] = -1e3  # dead
        m.b_dec.zero_()
    return m


def test_layout_matches_saebench(setup):
    model, batches = setup
    res = saebench.core_eval(model, exact_relu(), HOOK, batches, model_name="tiny", dataset="random tokens",
                             sae_cfg_dict={"d_in": D}, sae_id="exact", release="test")
    assert list(res) == TOP and res["eval_type_id"] == "core"
    assert list(res["eval_config"]) == CONFIG
    assert {k: list(v) for k, v in res["eval_result_metrics"].items()} == SCHEMA
    assert [list(d) for d in res["eval_result_details"]] == [DETAIL] * (2 * D)
    assert all(isinstance(v, (int, float)) for cat in res["eval_result_metrics"].values() for v in cat.values())
    json.loads(json.dumps(res, allow_nan=False))  # strict JSON: no NaN/inf


def test_values_on_an_exact_dictionary(setup):
    model, batches = setup
    res = saebench.core_eval(model, exact_relu(dead=4), HOOK, batches, model_name="tiny", dataset="random tokens")
    m = res["eval_result_metrics"]
    n_rows = 16 * (CFG["n_ctx"] - 1)  # BOS (position 0) is not reconstructed
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == n_rows
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1, abs=1e-4)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1, abs=1e-4)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1, abs=1e-6)
    assert m["reconstruction_quality"]["explained_variance_legacy"] == pytest.approx(1, abs=1e-6)
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1, abs=1e-6)
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(1, abs=1e-6)
    assert m["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(1, abs=1e-6)
    assert m["sparsity"]["l0"] == pytest.approx(D)  # each coordinate is positive or negative: one of its two latents
    assert m["misc_metrics"]["frac_alive"] == pytest.approx(2 * D / (2 * D + 4))
    details = res["eval_result_details"]
    dens = np.array([d["feature_density"] for d in details])
    assert dens[: 2 * D].reshape(2, D).sum(0) == pytest.approx(np.ones(D))  # +e_i and -e_i share the tokens
    assert (dens[2 * D:] == 0).all() and all(d["consistent_activation_heuristic"] == -1 for d in details[2 * D:])
    assert all(d["consistent_activation_heuristic"] >= 1 for d in details[: 2 * D] if d["feature_density"] > 0)
    # +e_i and -e_i are antiparallel: encoder-decoder cos 1, max cos to another row 0 (other axes)
    assert all(d["encoder_decoder_cosine_sim"] == pytest.approx(1) for d in details[: 2 * D])
    assert all(d["max_encoder_cosine_sim"] == pytest.approx(0, abs=1e-9) for d in details[: 2 * D])


def test_binding_sae_is_evaluated_on_its_materialised_decoder(setup):
    model, batches = setup
    torch.manual_seed(0)
    b = sae.BindingSAE(D, 8, n_slots=2, k=3, transform_init="random_orthogonal").eval()
    res = saebench.core_eval(model, b, HOOK, batches, model_name="tiny", dataset="random tokens")
    assert len(res["eval_result_details"]) == b.n_total == 16
    w = saebench.weight_metrics(b)
    assert torch.allclose(w["encoder_decoder_cosine_sim"],
                          torch.nn.functional.cosine_similarity(b.W_enc.T, b.W_dec, dim=-1).double(), atol=1e-6)
    assert 0 < res["eval_result_metrics"]["sparsity"]["l0"] <= 3 + 1e-9


def test_cli_writes_saebench_file_name(tmp_path, capsys):
    assert saebench.result_path("out", "rel/x", "topk/a").name == "rel_x_topk_a_eval_results.json"
    assert saebench.main([str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_validates_with_saebench_itself_when_installed(setup):
    eo = pytest.importorskip("sae_bench.evals.core.eval_output", reason="sae-bench not installed (optional check)")
    from sae_bench.evals.core.eval_config import CoreEvalConfig

    model, batches = setup
    res = saebench.core_eval(model, exact_relu(), HOOK, batches, model_name="tiny", dataset="random tokens")
    m = res["eval_result_metrics"]
    cats = {f.name: f.type for f in dataclasses.fields(eo.CoreMetricCategories)}
    metrics = eo.CoreMetricCategories(**{k: getattr(eo, type_name(cats[k]))(**v) for k, v in m.items()})
    eo.CoreEvalOutput(eval_config=CoreEvalConfig(**res["eval_config"]), eval_id=res["eval_id"],
                      datetime_epoch_millis=res["datetime_epoch_millis"], eval_result_metrics=metrics,
                      eval_result_details=[eo.CoreFeatureMetric(**d) for d in res["eval_result_details"]],
                      sae_bench_commit_hash="unknown", sae_lens_id=None, sae_lens_release_id=None,
                      sae_lens_version=None, sae_cfg_dict={})


def type_name(t):
    return t if isinstance(t, str) else t.__name__
