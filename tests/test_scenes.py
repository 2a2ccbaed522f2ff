"""The scenes language (sae/scenes.py) and the shipped model trained on it (sae/scenes_model.py).
The model tests run under whichever transformer-lens is installed (3.x or 4.x)."""

import pytest
import torch

from sae.lm import scenes
from sae.lm.scenes import N_CTX, SEP_POS, TOKENIZER

# ----------------------------------------------------------------------------- language


def test_tokenizer_round_trip_and_errors():
    text = "<bos> red metal cube left blue glass sphere . the cube is red"
    ids = TOKENIZER.encode(text)
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.encode(TOKENIZER.decode(ids)) == ids
    assert ids[0] == TOKENIZER.bos_token_id and ids[8] == TOKENIZER.sep_token_id
    assert len(TOKENIZER) == len(TOKENIZER.vocab) == len(set(TOKENIZER.vocab))
    assert TOKENIZER.vocab[TOKENIZER.pad_token_id] == "<pad>"
    with pytest.raises(ValueError, match="'dodecahedron'"):
        TOKENIZER.encode("the dodecahedron is red")
    with pytest.raises(ValueError, match="999"):
        TOKENIZER.decode([1, 999])


def test_sampler_is_deterministic_and_laid_out():
    a = scenes.generate_tokens(50, seed=3)
    assert a.dtype == torch.long and a.shape == (50, N_CTX)
    assert torch.equal(a, scenes.generate_tokens(50, seed=3))
    assert not torch.equal(a, scenes.generate_tokens(50, seed=4))
    assert not torch.equal(a, scenes.generate_tokens(50, seed=3, split="test"))
    assert (a[:, 0] == TOKENIZER.bos_token_id).all() and (a[:, SEP_POS] == TOKENIZER.sep_token_id).all()
    assert (a[:, 1:] != TOKENIZER.bos_token_id).all() and (a[:, SEP_POS + 1 :] != TOKENIZER.sep_token_id).all()
    with pytest.raises(ValueError, match="split"):
        scenes.generate_tokens(2, seed=0, split="valid")


def test_answers_follow_from_the_scene():
    sc = scenes.sample_scenes(200, seed=1, split="train")
    batch = scenes.encode_scenes(sc)
    for s, toks, pos in zip(sc, batch.tokens, batch.answer_pos):
        words = TOKENIZER.decode(toks).split()
        assert words == s.words()
        for q, p in zip(s.queries, pos.tolist()):
            obj = s.objects[q.slot]
            _, by, asked = scenes.QUERY_KINDS[q.kind]
            assert words[p] == q.answer == getattr(obj, asked)
            if by == "slot":
                assert scenes.ORDINALS[q.slot] in q.prompt
            else:  # the object is named by another attribute, unambiguously
                assert getattr(obj, by) in q.prompt
                assert sum(getattr(o, by) in q.prompt for o in s.objects) == 1
        # 2-object scenes pad the third object slot; pads never sit before the separator otherwise
        n_pad_scene = (toks[1:SEP_POS] == TOKENIZER.pad_token_id).sum().item()
        assert n_pad_scene == (4 if len(s.objects) == 2 else 0)


def _conjunctions(scene_list):
    return [(o.colour, o.shape) for s in scene_list for o in s.objects]


def test_heldout_conjunctions_never_in_train_split():
    train = scenes.sample_scenes(3000, seed=0, split="train")
    conj = set(_conjunctions(train))
    assert not conj & scenes.HELDOUT_CONJUNCTIONS
    all_pairs = {(c, s) for c in scenes.COLOURS for s in scenes.SHAPES}
    assert conj == all_pairs - scenes.HELDOUT_CONJUNCTIONS  # everything else does occur
    assert not any(scenes.is_test_scene(s.objects) for s in train)
    test = scenes.sample_scenes(300, seed=0, split="test")
    assert all(scenes.is_test_scene(s.objects) for s in test)
    assert not set(_conjunctions(test)) & scenes.HELDOUT_CONJUNCTIONS
    held = scenes.sample_scenes(300, seed=0, split="heldout")
    for s in held:
        slots = [i for i, o in enumerate(s.objects) if (o.colour, o.shape) in scenes.HELDOUT_CONJUNCTIONS]
        assert len(slots) == 1 and all(q.slot == slots[0] for q in s.queries)
    # the train split, tokenised, never shows a held-out pair in any object slot
    toks = scenes.generate_tokens(3000, seed=0, split="train")
    for slot in range(scenes.MAX_OBJECTS):
        pos = scenes.object_positions(slot)
        pairs = {(TOKENIZER.vocab[c], TOKENIZER.vocab[s]) for c, s in toks[:, [pos[0], pos[2]]].tolist()}
        assert not pairs & scenes.HELDOUT_CONJUNCTIONS


def test_attention_restriction_shape():
    from sae.lm.scenes_model import attention_allowed

    allowed = attention_allowed(n_layers=4, bottleneck_layer=1)
    seg = torch.tensor(scenes.segment_ids())
    q0 = scenes.query_start(0)
    assert not allowed[:2, q0:, 1:SEP_POS + 1].any()  # queries never read scene/separator early
    assert not allowed[2:, SEP_POS:, 1:SEP_POS].any()  # nor scene tokens later; the separator neither
    assert allowed[2:, q0:, SEP_POS].all() and allowed[:, :, 0].all()  # they read it (and <bos>) late
    cross = (seg[:, None] >= 3) & (seg[None, :] >= 3) & (seg[:, None] != seg[None, :])
    assert not allowed[:, cross].any()  # query blocks never see each other
    assert allowed[:, SEP_POS, :SEP_POS + 1][:2].all()  # the separator reads the whole scene early
    assert not (allowed & ~torch.ones(N_CTX, N_CTX, dtype=torch.bool).tril()).any()  # causal


# ----------------------------------------------------------------------------- the shipped model

tl = pytest.importorskip("transformer_lens")


@pytest.fixture(scope="module")
def model():
    from sae.lm.scenes_model import load_scenes_model

    return load_scenes_model()


@pytest.fixture(scope="module")
def meta():
    from sae.lm.scenes_model import load_scenes_metadata

    return load_scenes_metadata()


def test_shipped_files_are_small_and_consistent(meta):
    from sae.lm.scenes_model import BOTTLENECK_HOOK, BOTTLENECK_LAYER, META_PATH, SEP_POSITION, WEIGHTS_PATH

    assert WEIGHTS_PATH.stat().st_size + META_PATH.stat().st_size < 4e6
    assert meta["layout"]["bottleneck_layer"] == BOTTLENECK_LAYER and meta["layout"]["bottleneck_hook"] == BOTTLENECK_HOOK
    assert meta["layout"]["sep_position"] == SEP_POSITION == SEP_POS and meta["vocab"] == TOKENIZER.vocab


def test_loaded_model_matches_tl_free_reference(model, meta):
    """TL 3.x and 4.x must both compute the function of the shipped weights (restriction included):
    compare each against the same plain-torch reference."""
    from safetensors.torch import load_file

    from sae.lm.scenes_model import WEIGHTS_PATH, ScenesModelConfig, reference_logits

    cfg = ScenesModelConfig(**meta["config"])
    tokens = scenes.generate_tokens(64, seed=5, split="test")
    with torch.no_grad():
        ref = reference_logits(load_file(str(WEIGHTS_PATH)), tokens, cfg)
        logits = model(tokens)
        cached_logits, cache = model.run_with_cache(tokens)
    assert (logits - ref).abs().max() < 1e-4
    assert (cached_logits - ref).abs().max() < 1e-4  # run_with_cache keeps the restriction
    # and the restriction is visible in the attention patterns
    from sae.lm.scenes_model import attention_allowed

    allowed = attention_allowed(cfg.n_layers, cfg.bottleneck_layer)
    for l in range(cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]
        assert pattern[:, :, ~allowed[l]].abs().max() == 0
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)


def test_restriction_survives_reset_hooks(model):
    tokens = scenes.generate_tokens(8, seed=6, split="test")
    with torch.no_grad():
        before = model(tokens)
        model.reset_hooks()
        assert torch.equal(model(tokens), before)


def test_shipped_model_reaches_recorded_accuracy(model, meta):
    from sae.lm.scenes_model import task_accuracy as evaluate

    rec = meta["accuracy"]
    test = evaluate(model, scenes.sample_batch(300, seed=777, split="test"))
    held = evaluate(model, scenes.sample_batch(300, seed=777, split="heldout"))
    assert test["accuracy"] >= rec["test"]["accuracy"] - 0.03, test
    assert held["accuracy"] >= rec["heldout_conjunctions"]["accuracy"] - 0.06, held
    assert test["accuracy"] > 0.9  # the model does the task


def test_bottleneck_holds(model):
    """Patch the separator's bottleneck residual from a recoloured scene: the queries' logits are
    exactly those of the recoloured scene (nothing else carries the scene), answers flip, and a
    mean-ablated bottleneck leaves the queries near chance."""
    import random

    from sae.eval.train_scenes_model import recolour
    from sae.lm.scenes_model import BOTTLENECK_HOOK, bottleneck_residual, patch_sep, query_logits
    from sae.lm.scenes_model import task_accuracy as evaluate

    base = scenes.sample_scenes(200, seed=8, split="test")
    rng = random.Random(0)
    edited = [recolour(s, rng) for s in base]
    A, B = scenes.encode_scenes(base), scenes.encode_scenes(edited)
    with torch.no_grad():
        patched = query_logits(model, A, [(BOTTLENECK_HOOK, patch_sep(bottleneck_residual(model, B.tokens)))])
        hybrid = A.tokens.clone()
        hybrid[:, : SEP_POS + 1] = B.tokens[:, : SEP_POS + 1]
        A_on_B_scene = scenes.SceneBatch(hybrid, A.answer_pos, A.answers, A.kinds, A.slots, B.attributes, B.n_objects)
        assert (patched - query_logits(model, A_on_B_scene)).abs().max() < 1e-4
        # colour queries ("the cube is") about the recoloured object now answer the new colour
        colour = scenes.KIND_NAMES.index("colour")
        changed = (A.kinds == colour) & (B.answers != A.answers)
        # B.answers: B's queries are A's queries rebuilt on B's objects (same kind and slot)
        assert changed.sum() > 20
        assert (patched.argmax(-1) == B.answers)[changed].float().mean() > 0.9

        clean = evaluate(model, A)["accuracy"]
        mean = bottleneck_residual(model, scenes.generate_tokens(500, seed=9)).mean(0, keepdim=True)
        ablated = evaluate(model, A, [(BOTTLENECK_HOOK, patch_sep(mean.expand(len(A), -1)))])["accuracy"]
    assert clean > 0.9 and ablated < 0.35  # chance (best scene-blind guess) is about 0.19


def test_probe_reads_bindings_from_the_bottleneck(model):
    """Each attribute of the first two objects is decodable from the one bottleneck vector by an
    MLP probe (a linear probe reads only some of them: see probes in the JSON), and not from a
    query position at the same layer, which cannot see the scene."""
    from sae.eval.probes import probe_accuracy as _probe_accuracy
    from sae.lm.scenes_model import BOTTLENECK_HOOK

    def residual(batch, pos):
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n == BOTTLENECK_HOOK)
        return cache[BOTTLENECK_HOOK][:, pos]

    train = scenes.sample_batch(1500, seed=10, split="train")
    test = scenes.sample_batch(300, seed=11, split="test")
    x_tr, x_te = residual(train, SEP_POS), residual(test, SEP_POS)
    for a, attr in enumerate(scenes.ATTRIBUTES):
        k = len(scenes.FAMILIES[attr])
        for s in range(2):  # slots 0 and 1 are always filled
            y_tr, y_te = train.attributes[:, s, a], test.attributes[:, s, a]
            acc = _probe_accuracy(x_tr, y_tr, x_te, y_te, k, hidden=256, steps=300)
            assert acc > 0.9, (attr, s, acc)
    blind_pos = scenes.query_start(0) + 1
    y_tr, y_te = train.attributes[:, 0, 0], test.attributes[:, 0, 0]
    blind = _probe_accuracy(residual(train, blind_pos), y_tr, residual(test, blind_pos), y_te, 8, hidden=256, steps=300)
    assert blind < 0.4, blind  # chance is 1/8
