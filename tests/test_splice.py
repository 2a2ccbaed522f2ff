"""sae.lm.splice: loss recovered by splicing, on a tiny random transformer-lens model.

Exact dictionaries make the formula checkable: an SAE that reconstructs x exactly must recover
1.0, one that outputs zeros must recover 0 against zero-ablation, the error term must reproduce
the clean model, and splice_eval must agree with a hook written by hand, for every architecture."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sae
from sae.lm import models
from sae.eval import splice as splice_cli
from sae.lm import splice

D = 16
CFG = dict(d_model=D, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=40, n_ctx=12, act_fn="gelu", seed=0)
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return models.build_model(CFG)


@pytest.fixture(scope="module")
def batches(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, CFG["d_vocab"], (24, CFG["n_ctx"])))
    return splice.make_batches("tiny", model, str(path), n_sequences=24, batch_size=8)


def exact(arch: str) -> sae.SAE:
    """An SAE whose reconstruction is x itself: latents +e_i and -e_i, decoder rows the same."""
    eye = torch.eye(D)
    if arch == "binding":  # D = I, M_2 = -I: slot 2 carries the negative parts
        m = sae.BindingSAE(D, D, n_slots=2, sparsity="relu", slot_transform="full")
        with torch.no_grad():
            m.dictionary.copy_(eye)
            m.transform_param.copy_(-eye[None])
    else:
        opts = {"topk": dict(k=D), "batchtopk": dict(k=D), "relu": {}, "jumprelu": {}}[arch]
        m = sae.SAE.registry[arch](D, 2 * D, **opts)
        with torch.no_grad():
            m.W_dec.copy_(torch.cat([eye, -eye]))
    with torch.no_grad():
        m.W_enc.copy_(torch.cat([eye, -eye]).T)
        m.b_enc.zero_()
        m.b_dec.zero_()
        if hasattr(m, "threshold"):
            m.threshold.fill_(1e-6)
    m.eval()
    x = torch.randn(64, D)
    assert torch.allclose(m(x).x_hat, x, atol=1e-5), f"{arch}: test dictionary is not exact"
    return m


def test_batches_mirror_the_cache(batches):
    b = batches[0]
    assert b.tokens.shape == (8, CFG["n_ctx"]) and len(batches) == 3
    assert not b.splice[:, 0].any() and b.splice[:, 1:].all()  # token arrays: BOS by convention at 0
    assert not b.targets[:, 0].any()


@pytest.mark.parametrize("arch", ["topk", "relu", "binding"])
def test_exact_dictionary_recovers_everything(model, batches, arch):
    res = splice.splice_eval(model, exact(arch), HOOK, batches, error_term=True)
    d = res["scopes"]["all"]
    # the baselines move the output (a random model's CE need not get worse): the ratios mean something
    assert abs(d["ce_zero"] - d["ce_clean"]) > 0.02 and abs(d["ce_mean"] - d["ce_clean"]) > 0.002
    assert d["kl_zero"] > 0.02 and d["kl_mean"] > 0.002
    assert d["ce_recovered_zero"] == pytest.approx(1, abs=1e-4)
    assert d["ce_recovered_mean"] == pytest.approx(1, abs=1e-3)
    assert d["kl_sae"] < 1e-6 and d["kl_recovered_zero"] == pytest.approx(1, abs=1e-4)
    assert res["reconstruction"]["fvu"] < 1e-8
    assert res["n_spliced_rows"] == 24 * (CFG["n_ctx"] - 1)


def test_error_term_reproduces_clean_and_baselines_score_zero(model, batches):
    torch.manual_seed(0)
    noisy = sae.TopKSAE(D, 64, k=2).eval()  # random: a poor reconstruction
    res = splice.splice_eval(model, noisy, HOOK, batches, error_term=True)
    d = res["scopes"]["all"]
    assert d["ce_error"] == pytest.approx(d["ce_clean"], abs=1e-5) and d["kl_error"] < 1e-8
    assert d["kl_sae"] > 1e-3 and d["kl_recovered_zero"] < 0.99 and abs(d["ce_sae"] - d["ce_clean"]) > 1e-3

    zero = sae.TopKSAE(D, 64, k=2).eval()  # decodes to 0: exactly the zero-ablation baseline
    with torch.no_grad():
        zero.W_dec.zero_()
    d = splice.splice_eval(model, zero, HOOK, batches)["scopes"]["all"]
    assert d["ce_sae"] == pytest.approx(d["ce_zero"], abs=1e-6) and d["ce_recovered_zero"] == pytest.approx(0, abs=1e-5)


# Transcoders replace another hook than they read: tests/test_transcoder.py checks them against hooks by hand.
@pytest.mark.parametrize("arch", sorted(a for a, cls in sae.SAE.registry.items() if not issubclass(cls, sae.Transcoder)))
def test_matches_a_hand_written_hook(model, batches, arch):
    """CE with the SAE spliced in equals what a plain run_with_hooks computes, for every architecture."""
    torch.manual_seed(1)
    opts = {"relu": {}, "jumprelu": {}}.get(arch, dict(k=4))
    m = sae.SAE.registry[arch](D, 32, **opts).eval()
    res = splice.splice_eval(model, m, HOOK, batches)
    ce, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            def hook(act, hook=None, b=b):
                new = act.clone()
                new[b.splice] = m.decode(m.encode(act[b.splice]))
                return new

            logits = model.run_with_hooks(b.tokens, fwd_hooks=[(HOOK, hook)])
            lp = logits.log_softmax(-1)[:, :-1].gather(-1, b.tokens[:, 1:, None])[..., 0]
            ok = b.targets[:, 1:]
            ce, n = ce - lp[ok].sum().item(), n + int(ok.sum())
    assert res["scopes"]["all"]["ce_sae"] == pytest.approx(ce / n, rel=1e-5)


def test_scale_is_taken_into_account(model, batches):
    """An SAE that works on x * s, evaluated with scale=s, equals the same SAE with s folded in."""
    torch.manual_seed(2)
    scaled = sae.TopKSAE(D, 48, k=4).eval()
    with torch.no_grad():  # biases make the SAE not scale-equivariant, so the test can fail
        scaled.b_dec.normal_()
        scaled.b_enc.normal_()
    folded = sae.TopKSAE(D, 48, k=4).eval()
    folded.load_state_dict(scaled.state_dict())
    folded.fold_activation_scale_(3.0)
    a = splice.splice_eval(model, scaled, HOOK, batches, scale=3.0)["scopes"]["all"]
    b = splice.splice_eval(model, folded, HOOK, batches)["scopes"]["all"]
    assert a["ce_sae"] == pytest.approx(b["ce_sae"], rel=1e-5)
    unscaled = splice.splice_eval(model, scaled, HOOK, batches)["scopes"]["all"]
    assert abs(unscaled["ce_sae"] - a["ce_sae"]) > 1e-4  # the scale changes the answer


def test_training_callback(model, batches, tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, batches[0].tokens.numpy())
    monitor = splice.make_splice_callback("tiny", HOOK, every=5, n_sequences=8, source=str(path), model=model)
    m = sae.TopKSAE(D, 32, k=4).train()
    assert monitor(m, step=3) == {}
    logs = monitor(m, step=10, scale=1.0)
    assert set(logs) >= {"splice/all/ce_sae", "splice/all/ce_recovered_zero", "splice/all/kl_sae"}
    assert all(np.isfinite(v) for v in logs.values())
    assert m.training and int(m.tokens_since_fired.sum()) == 0  # mode restored; no firing counted


def test_width_mismatch_and_bad_hook(model, batches):
    with pytest.raises(ValueError, match="d_in"):
        splice.splice_eval(model, sae.TopKSAE(D + 1, 8, k=2), HOOK, batches)
    with pytest.raises(ValueError, match="unknown hook"):
        splice.splice_eval(model, sae.TopKSAE(D, 8, k=2), "blocks.9.hook_resid_post", batches)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert splice_cli.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    sae.TopKSAE(D, 8, k=2).save(tmp_path / "dict")  # no metadata: the model must be named
    assert splice_cli.main([str(tmp_path / "dict"), "--out", str(tmp_path / "o.json")]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "o.json").exists()


@pytest.mark.skipif(models.tl_major() >= 4, reason="a random scenes model can only be built under TL 3.x")
def test_scenes_answer_scope_on_a_random_scenes_model():
    """The answers scope reads the logits before each answer (the model is untrained: mechanics only)."""
    from sae.lm.scenes_model import ScenesModelConfig, build_scenes_model

    m = build_scenes_model(ScenesModelConfig(d_model=32, n_heads=4, d_mlp=64)).eval()
    batches = splice.make_batches("scenes", m, "generator", n_sequences=16, batch_size=8)
    b = batches[0]
    assert b.answers.shape == (8, 3) and torch.equal(b.tokens.gather(1, b.answer_pos), b.answers)
    assert not b.splice[:, 0].any() and not b.splice[b.tokens == 0].any()  # BOS and PAD are not replaced
    eye = torch.eye(32)
    ex = sae.ReLUSAE(32, 64).eval()
    with torch.no_grad():
        ex.W_enc.copy_(torch.cat([eye, -eye]).T)
        ex.W_dec.copy_(torch.cat([eye, -eye]))
        ex.b_enc.zero_()
        ex.b_dec.zero_()
    a = splice.splice_eval(m, ex, "blocks.1.hook_resid_post", batches)["scopes"]["answers"]
    assert a["n"] == 48 and a["acc_sae"] == a["acc_clean"] and a["ce_recovered_zero"] == pytest.approx(1, abs=1e-4)
    with torch.no_grad():  # the answers' CE by hand
        logits = m(b.tokens)
        lp = logits.log_softmax(-1).gather(1, (b.answer_pos - 1)[..., None].expand(-1, -1, logits.shape[-1]))
    ce0 = -lp.gather(-1, b.answers[..., None]).mean().item()
    b2 = splice.splice_eval(m, ex, "blocks.1.hook_resid_post", batches[:1])["scopes"]["answers"]
    assert b2["ce_clean"] == pytest.approx(ce0, rel=1e-5)


SCENES_WEIGHTS = Path(models.__file__).resolve().parent / "assets" / "scenes_model.safetensors"


@pytest.mark.skipif(not SCENES_WEIGHTS.exists(), reason="scenes model weights not shipped yet (sae/assets)")
def test_scenes_model_answers_scope():
    m = models.load_model("scenes")
    d = m.cfg.d_model
    eye = torch.eye(d)
    ex = sae.ReLUSAE(d, 2 * d).eval()
    with torch.no_grad():
        ex.W_enc.copy_(torch.cat([eye, -eye]).T)
        ex.W_dec.copy_(torch.cat([eye, -eye]))
        ex.b_enc.zero_()
        ex.b_dec.zero_()
    batches = splice.make_batches("scenes", m, "generator", n_sequences=64, batch_size=32)
    res = splice.splice_eval(m, ex, "blocks.1.hook_resid_post", batches)
    a = res["scopes"]["answers"]
    assert a["n"] == 64 * 3 and a["acc_clean"] > 0.5
    assert a["acc_sae"] == pytest.approx(a["acc_clean"]) and a["acc_zero"] < a["acc_clean"]
    json.dumps(res)  # serialisable
