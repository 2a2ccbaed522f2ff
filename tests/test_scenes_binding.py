"""sae.eval.scenes_binding on the shipped scenes model, with tiny SAEs: an exact one (x_hat = x),
a constant one (a pure bag: the same code for every scene) and a TopK trained here for a few
hundred steps. The properties checked could each fail: the error term must give back the clean
answers exactly, the truly edited residual must flip the answers, a constant code cannot answer
both scenes of a swap pair, the residual must hold object 0's colour linearly."""
import json

import pytest
import torch

import sae
from sae.lm import scenes
from sae.eval import scenes_binding as sb
from sae.eval.probes import fit_scene_probes
from sae.lm.scenes_model import BOTTLENECK_HOOK, load_scenes_model

D = sb.D_MODEL


@pytest.fixture(scope="module")
def model():
    return load_scenes_model()


@pytest.fixture(scope="module")
def train_x(model):
    return sb.sep_residuals(model, scenes.sample_batch(2048, 7, "train").tokens)


def exact_sae() -> sae.SAE:
    """Latents +e_i and -e_i, decoder rows the same: decode(encode(x)) = x."""
    eye = torch.eye(D)
    m = sae.TopKSAE(D, 2 * D, k=D)
    with torch.no_grad():
        m.W_dec.copy_(torch.cat([eye, -eye]))
        m.W_enc.copy_(torch.cat([eye, -eye]).T)
        m.b_enc.zero_()
        m.b_dec.zero_()
    return m.eval()


def constant_sae(mean: torch.Tensor) -> sae.SAE:
    """Codes always 0, x_hat = the mean residual: the same bag for every scene."""
    m = sae.ReLUSAE(D, 8)
    with torch.no_grad():
        m.W_enc.zero_()
        m.b_enc.fill_(-1.0)
        m.b_dec.copy_(mean)
    return m.eval()


@pytest.fixture(scope="module")
def topk(train_x):
    m = sae.TopKSAE(D, 64, k=4)
    sae.train(m, train_x, steps=150, batch_size=256, lr=3e-3, seed=0)
    return m.eval()


def small_eval(m, model, **kw):
    return sb.evaluate_sae(m, model, n_train=400, n_eval=60, seed=1, probe_steps=150, **kw)


@pytest.fixture(scope="module")
def topk_result(topk, model):
    return small_eval(topk, model)


def test_error_term_gives_back_the_clean_answers(topk, model):
    batch = scenes.sample_batch(200, 3, "test")
    x = sb.sep_residuals(model, batch.tokens)
    codec = sb.Codec(topk)
    x_hat = codec.decode(codec.encode(x))
    assert (x_hat - x).abs().max() > 1e-3  # a real, lossy SAE: the test is not vacuous
    assert torch.equal(sb.predict(model, batch, x_hat + (x - x_hat)), sb.predict(model, batch))


def test_topk_eval_properties(topk_result):
    r = topk_result
    assert r["reconstruction"]["acc_sae_err"] == r["reconstruction"]["acc_clean"]
    sw = r["swap"]
    assert sw["sae_err"] == sw["clean"]  # error held fixed, no edit: the clean answers exactly
    assert sw["clean"]["both_right"] > 0.9 and sw["residual_swap"]["acc_vs_B"] > 0.95
    for edit in ("recolour", "swap"):
        e = r["edits"][edit]
        assert e["none"]["flip"] == 0.0 and e["none"]["specificity"] == 1.0
        assert e["residual"]["flip"] > 0.95, f"{edit}: the truly edited residual must flip the answers"
        assert e["residual"]["specificity"] > 0.9
        assert {"data/moved", "data/mean_on"} <= set(e)
    assert "binding" not in r["latent_lookup"]  # only a BindingSAE gets its own lookup
    assert set(r["probes"]) == {"residual", "codes", "reconstruction"}


def test_exact_sae_edits_reach_the_ceiling(model):
    r = small_eval(exact_sae(), model)
    assert abs(r["reconstruction"]["fvu"]) < 1e-6
    assert r["swap"]["sae"] == r["swap"]["clean"]
    assert r["swap"]["code_swap"] == r["swap"]["residual_swap"]
    for edit in ("recolour", "swap"):
        e = r["edits"][edit]
        # decode(codes of the truly edited scene) + error = the edited residual, up to rounding
        assert e["sae_codes"]["flip"] == pytest.approx(e["residual"]["flip"], abs=0.02) and e["sae_codes"]["flip"] > 0.95


def test_a_bag_code_cannot_answer_both_scenes(model, train_x):
    r = small_eval(constant_sae(train_x.mean(0)), model)
    sw = r["swap"]
    assert sw["sae"]["same_answer"] == 1.0 and sw["sae"]["both_right"] == 0.0
    assert sw["sae_err"] == sw["clean"]  # the error term carries everything back
    for edit in ("recolour", "swap"):  # codes that carry nothing cannot be edited: all is in the error
        e = r["edits"][edit]
        assert e["sae_codes"]["flip"] == 0.0 and e["sae_codes"]["specificity"] == 1.0
        assert e["residual"]["flip"] > 0.95
    assert r["probes"]["codes"]["test_mean"] < 0.5  # nothing to read: constant predictions


def test_residual_probe_reads_object_0_colour(model, train_x):
    train = scenes.sample_batch(2048, 7, "train")  # the rows of train_x
    test = scenes.sample_batch(300, 8, "test")
    fn = fit_scene_probes(train_x, train.attributes, steps=300)
    pred = fn(sb.sep_residuals(model, test.tokens))
    colour = scenes.ATTRIBUTES.index("colour")
    assert (pred[:, 0, colour] == test.attributes[:, 0, colour]).float().mean() > 0.9


def test_binding_lookup_and_moves(model, train_x):
    m = sae.BindingSAE(D, 32, n_slots=3, k=4)
    train = scenes.sample_batch(2048, 7, "train")
    z = sb.Codec(m.eval()).encode(train_x)
    lookups, info = sb.latent_lookups(m, z, train.attributes)
    lk = lookups["binding"]
    assert lk["lat"].shape == (scenes.MAX_OBJECTS, len(scenes.COLOURS))
    # flat index = slot * n_latents + atom, the layout of BindingSAE.slot_codes
    assert torch.equal(lk["lat"], lk["sigma"][:, None] * 32 + lk["atom"][None])
    assert info["binding"]["slot_votes"] and len(info["data"]["latents"]) == scenes.MAX_OBJECTS
    z = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    out = sb.apply_moves(z, torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([[5.0, 6.0]]))
    assert out.tolist() == [[0.0, 0.0, 5.0, 6.0]]


def test_queries_spread_over_rows_keep_their_scene():
    bases, recol, swaps = sb.sample_edits(20, 0)
    assert swaps and all(len(set(o.colour for o in new)) == len(new) for *_, new in swaps)
    specs = [sb.recolour_specs(sc.objects, new, s) for sc, (s, _, new) in zip(bases, recol)]
    qs = sb.build_queries(bases, specs)
    for i, sc in enumerate(bases):
        rows = (qs.base == i).nonzero()[:, 0]
        assert all(torch.equal(qs.batch.tokens[r, : scenes.SEP_POS + 1], qs.batch.tokens[rows[0], : scenes.SEP_POS + 1])
                   for r in rows)
        s, c_new, _ = recol[i]
        flips = qs.group[rows] == sb.FLIP
        assert set(qs.batch.answers[rows][flips].tolist()) == {scenes.TOKENIZER.word_to_id[c_new]}
        assert int((qs.group[rows] >= 0).sum()) == len(specs[i])


def test_cli(tmp_path, capsys, topk):
    assert sb.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing" in err[0]

    wrong = sae.TopKSAE(16, 32, k=4)
    wrong.save(tmp_path / "narrow" / "sae", metadata={"model_name": "scenes", "hook_name": BOTTLENECK_HOOK})
    assert sb.main([str(tmp_path / "narrow")]) == 2
    assert "d_in=16" in capsys.readouterr().err

    topk.save(tmp_path / "other_hook" / "sae", metadata={"model_name": "scenes", "hook_name": "blocks.0.hook_resid_post"})
    assert sb.main([str(tmp_path / "other_hook")]) == 2
    assert "blocks.0.hook_resid_post" in capsys.readouterr().err

    topk.save(tmp_path / "ok" / "sae", metadata={"model_name": "scenes", "hook_name": BOTTLENECK_HOOK})
    out = tmp_path / "res.json"
    argv = [str(tmp_path / "ok"), "--n-train", "300", "--n-eval", "40", "--out", str(out)]
    assert sb.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ok |" in printed and "residual (reference)" in printed
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"ok"} and res["runs"]["ok"]["n_eval"] == 40
