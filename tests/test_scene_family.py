"""Scenes worlds (sae/lm/scenes.World) and the scene-family study (sae/eval/scene_family.py) at tiny
sizes: the default world is the old constants, a 4-object world is laid out consistently, and the
family command resumes without redoing finished stages."""

import json
from pathlib import Path

import pytest
import torch

from sae.lm import scenes
from sae.lm.scenes import World

# ----------------------------------------------------------------------------- worlds


def test_default_world_is_the_old_constants():
    w = World()
    # the shipped model's layout, written out: a change here would silently break its weights
    assert (w.max_objects, w.min_objects, w.scene_len, w.sep_pos, w.n_ctx) == (3, 2, 11, 12, 34)
    assert (w.sep_pos, w.n_ctx, w.scene_len) == (scenes.SEP_POS, scenes.N_CTX, scenes.SCENE_LEN)
    assert w.vocab == scenes.VOCAB and w.tokenizer is scenes.TOKENIZER and w.kinds == scenes.KIND_NAMES
    assert w.segment_ids() == scenes.segment_ids() and w == scenes.DEFAULT_WORLD
    for split in scenes.SPLITS:
        a, b = w.sample_batch(300, 5, split), scenes.sample_batch(300, 5, split)
        for f in ("tokens", "answer_pos", "answers", "kinds", "slots", "attributes", "n_objects"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (split, f)


def test_four_object_world_encodes_and_decodes():
    w = World(max_objects=4)
    assert (w.scene_len, w.sep_pos, w.n_ctx) == (15, 16, 38)
    assert w.vocab[: len(scenes.VOCAB)] == scenes.VOCAB and w.vocab[-1] == "fourth"  # old ids unchanged
    sc = w.sample_scenes(300, seed=2, split="train")
    batch = scenes.encode_scenes(sc, w)
    assert batch.tokens.shape == (300, 38) and batch.attributes.shape == (300, 4, 3)
    assert set(batch.n_objects.tolist()) == {2, 3, 4}
    seg = w.segment_ids()
    assert len(seg) == w.n_ctx and seg[w.sep_pos] == 2 and seg[w.query_start(0)] == 3
    for s, toks, attrs, pos in zip(sc, batch.tokens, batch.attributes, batch.answer_pos):
        words = w.tokenizer.decode(toks).split()
        assert words == s.words(w) and words[w.sep_pos] == "."
        assert [words[p] for p in pos.tolist()] == [q.answer for q in s.queries]
        for slot in range(4):
            if slot < len(s.objects):
                assert [words[p] for p in w.object_positions(slot)] == s.objects[slot].words()
                assert attrs[slot].min() >= 0
            else:
                assert all(words[p] == "<pad>" for p in w.object_positions(slot)) and (attrs[slot] == -1).all()
    asked_fourth = [q for s in sc for q in s.queries if q.slot == 3 and q.kind.endswith("by_slot")]
    assert asked_fourth and all("fourth" in q.prompt for q in asked_fourth)
    held = w.sample_scenes(50, seed=0, split="heldout")
    assert all(len({q.slot for q in s.queries}) == 1 for s in held)
    with pytest.raises(ValueError, match="does not fit"):
        scenes.encode_scenes(sc[:5] + [s for s in sc if len(s.objects) == 4][:1], World())


def test_query_mix_and_bad_worlds():
    slot = World(query_mix="slot").sample_scenes(100, seed=0)
    assert {q.kind for s in slot for q in s.queries} == set(scenes.QUERY_MIXES["slot"])
    attr = World(query_mix="attribute").sample_scenes(100, seed=0)
    assert all(not q.kind.endswith("by_slot") for s in attr for q in s.queries)
    with pytest.raises(ValueError, match="max_objects"):
        World(max_objects=9)
    with pytest.raises(ValueError, match="max_objects"):
        World(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="query mix"):
        World(query_mix="colours")


def test_four_object_model_runs_its_world():
    from sae.lm.scenes_model import ScenesModelConfig, build_scenes_model, reference_logits, world_of

    cfg = ScenesModelConfig(d_model=16, n_layers=2, n_heads=4, d_mlp=32, bottleneck_layer=0, max_objects=4)
    model = build_scenes_model(cfg)
    assert world_of(model) == cfg.world and model.cfg.n_ctx == 38 and model.cfg.d_vocab == len(cfg.world.vocab)
    tokens = cfg.world.generate_tokens(8, seed=0)
    with torch.no_grad():
        diff = (reference_logits(dict(model.named_parameters()), tokens, cfg) - model(tokens)).abs().max()
    assert diff < 1e-4


# ----------------------------------------------------------------------------- the family command

TINY = ["--family", "tiny", "--sae-steps", "30", "--sae-batch", "128", "--n-cache", "512", "--n-train", "200",
        "--probe-steps", "20", "--expansion", "4"]


def _stamps(models_dir):
    return {p.relative_to(models_dir): p.stat().st_mtime_ns for p in models_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    from sae.eval.scene_family import main

    out = tmp_path_factory.mktemp("family")
    assert main(["--out", str(out)] + TINY) == 0
    return out


def test_family_table_json_and_picture(family_run):
    from sae.eval.scene_family import STAGES, stage_file

    table = (family_run / "table.md").read_text()
    for column in ("accuracy: unseen / held-out conj.", "patch identity max Δlogit", "mean-ablated acc.",
                   "probes, unseen scenes: linear / MLP", "slot 3: colour · material · shape, linear / MLP",
                   "echo pairs (transfer cos)", "(object, colour) latents: distinct",
                   "binding recipe: pairs, fallback, tie cost, slot usage",
                   "swap: codes differ TopK / binding", "recolour flip / specificity"):
        assert column in table, column
    assert "t16-obj2" in table and "t16-obj4" in table and "not run yet" not in table
    summary = json.loads((family_run / "family.json").read_text())
    assert [r["name"] for r in summary["models"]] == ["t16-obj2", "t16-obj4"] and summary["not_trained"] == []
    for row in summary["models"]:
        assert {"probes", "topk", "binding", "topk_eval", "binding_eval"} <= set(row)
        # the scene passes only through the separator: patching it reproduces the other scene exactly
        assert row["identity_max_abs_logit_diff"] < 1e-4
        assert len([k for k in row["probes"]["linear"]["test"]]) == 3 * row["max_objects"]
        assert "pairs" in row["topk_eval"]["echo"]
        for stage in STAGES:
            assert stage_file(family_run / "models" / row["name"], stage).exists()
    assert (family_run / "family.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_family_resume_skips_done_work(family_run):
    from sae.eval.scene_family import main

    models = family_run / "models"
    before = _stamps(models)
    assert main(["--out", str(family_run)] + TINY) == 0
    assert _stamps(models) == before  # nothing recomputed
    # a stage lost (as if killed before its atomic write) is redone, and only it
    (models / "t16-obj4" / "probes.json").unlink()
    assert main(["--out", str(family_run)] + TINY) == 0
    after = _stamps(models)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {Path("t16-obj4") / "probes.json"}


def test_family_refuses_a_different_model_and_bad_options(family_run, capsys):
    from sae.eval.scene_family import main

    assert main(["--out", str(family_run), "--steps-scale", "2"] + TINY) == 2
    assert "different model" in capsys.readouterr().err
    assert main(["--family", "nope"]) == 2
    assert main(["--family", "tiny", "--models", "w999"]) == 2
    assert "w999" in capsys.readouterr().err
