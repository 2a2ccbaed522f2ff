"""sae.lm.models: building, hook reading and loading under whichever transformer-lens is installed
(CI runs this file under TL 3.x and again under TL 4.x)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.lm import models

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(d_model=16, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=40, n_ctx=12, act_fn="gelu", seed=0)


@pytest.fixture(scope="module")
def model():
    return models.build_model(CFG)


def tokens(n=3, seed=0):
    return torch.randint(0, CFG["d_vocab"], (n, CFG["n_ctx"]), generator=torch.Generator().manual_seed(seed))


def test_import_sae_does_not_import_transformer_lens():
    code = "import sys, sae, sae.lm.cache, sae.core.store, sae.lm.models; print('transformer_lens' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_model_class_matches_version(model):
    expected = "HookedTransformer" if models.tl_major() < 4 else "TransformerBridge"
    assert type(model).__name__ == expected


def test_hooked_state_dict_round_trip(model):
    """Weights exported in HookedTransformer format rebuild the same model (the cross-version format)."""
    sd = models.hooked_state_dict(model)
    assert sd["blocks.0.attn.W_Q"].shape == (4, 16, 4) and sd["blocks.0.attn.W_O"].shape == (4, 4, 16)
    other = models.build_model({**CFG, "seed": 1}, state_dict=sd)
    fresh = models.build_model({**CFG, "seed": 1})
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    a, b, c = (models.hook_activations(m, tokens(), names) for m in (model, other, fresh))
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert not torch.equal(a[names[0]], c[names[0]])  # the seed matters: the equality above is not trivial
    assert models.model_fingerprint(other) == models.model_fingerprint(model) != models.model_fingerprint(fresh)


def test_hook_activations_shapes_and_early_stop(model):
    t = tokens()
    acts = models.hook_activations(model, t, ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"])
    assert {k: tuple(v.shape) for k, v in acts.items()} == {
        "blocks.0.hook_resid_post": (3, 12, 16), "blocks.0.attn.hook_z": (3, 12, 16), "hook_embed": (3, 12, 16)}
    # stopping after block 0 must not change what block 0 computes
    with torch.no_grad():
        _, full = model.run_with_cache(t, names_filter=["blocks.0.hook_resid_post"])
    assert torch.allclose(acts["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("name", ["blocks.2.hook_resid_post", "blocks.0.hook_resid_pots", "resid"])
def test_unknown_hook_name_lists_valid_ones(model, name):
    with pytest.raises(ValueError, match=f"unknown hook name '{name}'.*valid names include .*hook_resid_post") as e:
        models.hook_activations(model, tokens(), [name])
    assert "\n" not in str(e.value)


def test_attention_pattern_is_refused(model):
    with pytest.raises(ValueError, match="per \\(query, key\\) pair"):
        models.check_hook_names(model, ["blocks.0.attn.hook_pattern"])


def test_missing_pretrained_model_fails_fast_in_one_line_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ValueError, match=r"model 'gpt2': could not be loaded offline \(HF_HUB_OFFLINE=1: only the "
                                         r"local Hugging Face cache is read\)") as e:
        models.load_model("gpt2")
    assert "\n" not in str(e.value)
    assert time.time() - t < 30  # offline: no network retries (these take ~30 s)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


class FakeModel:
    """What a fake loader returns: records the TL 4.x processing call."""

    compat = None

    def enable_compatibility_mode(self, **kw):
        self.compat = kw

    def eval(self):
        return self


def fake_loader(calls):
    import huggingface_hub.constants as c

    def load(name, **kw):
        calls.append({"name": name, "kw": kw, "env": os.environ.get("HF_HUB_OFFLINE"), "const": c.HF_HUB_OFFLINE})
        return FakeModel()
    return load


@pytest.mark.parametrize("processing, flags", [
    ("none", dict(center_writing_weights=False)),
    ("transformer_lens", dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)),
])
def test_hub_models_download_and_load_as_saelens_does(monkeypatch, processing, flags):
    """Without HF_HUB_OFFLINE the Hub is not cut off (it used to be, unless HF_HUB_OFFLINE=0), and
    the model is loaded like SAELens' load_model: from_pretrained_no_processing(name, device=...,
    center_writing_weights=False) by default. How it was loaded is recorded on the model."""
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before, calls = c.HF_HUB_OFFLINE, []
    if models.tl_major() >= 4:
        pytest.skip("TL 4.x: the bridge path is checked by test_tl4_loader_boots_raw_weights_then_processes")
    from transformer_lens import HookedTransformer

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", fake_loader(calls))
    m = models.load_model("gpt2", processing=processing, kwargs={"dtype": "float16"})
    assert calls == [{"name": "gpt2", "kw": {"device": "cpu", **flags, "dtype": "float16"}, "env": None, "const": before}]
    assert m.sae_model_load == {
        "model_class_name": "HookedTransformer", "model_from_pretrained_kwargs": {**flags, "dtype": "float16"},
        "fold_ln": flags.get("fold_ln", False), "center_writing_weights": flags["center_writing_weights"],
        "center_unembed": flags.get("center_unembed", False), "fold_value_biases": flags.get("fold_value_biases", False),
        "loader": "transformer_lens.HookedTransformer.from_pretrained_no_processing", "transformer_lens": models.tl_version()}


@pytest.mark.parametrize("processing, compat", [
    ("none", dict(disable_warnings=True, no_processing=True)),
    ("transformer_lens", dict(disable_warnings=True, fold_ln=True, center_writing_weights=True, center_unembed=True,
                              fold_value_biases=True, refactor_factored_attn_matrices=False)),
])
def test_tl4_loader_boots_raw_weights_then_processes(monkeypatch, processing, compat):
    """TL 4.x (the bridge also ships in 3.9): boot_transformers gets the loader kwargs (a dtype
    named in JSON becomes the torch dtype), enable_compatibility_mode the processing flags."""
    from transformer_lens.model_bridge import TransformerBridge

    calls = []
    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(fake_loader(calls)), raising=False)
    m = models._load_tl4("gpt2", "cpu", models.from_pretrained_kwargs(processing, {"dtype": "bfloat16", "n_ctx": 64}))
    assert [(x["name"], x["kw"]) for x in calls] == [("gpt2", {"device": "cpu", "dtype": torch.bfloat16, "n_ctx": 64})]
    assert m.compat == compat


def test_builtin_models_take_no_processing():
    with pytest.raises(ValueError, match="built in: model processing and kwargs apply to Hub models only"):
        models.load_model("scenes", processing="transformer_lens")
    assert models.load_model("scenes").sae_model_load["loader"] == "builtin"


# A stand-in for the Hub: a tiny random GPT-2 saved in a Hugging Face cache folder under the name
# "gpt2", so the real loaders (transformer-lens, transformers, huggingface_hub) run offline.
MAKE_HUB = """
import sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
repo = Path(sys.argv[1]) / "models--gpt2"
snap = repo / "snapshots" / ("0" * 40)
snap.mkdir(parents=True)
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text("0" * 40)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tok.train_from_iterator(["the red cube is next to the blue sphere"] * 10, trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                         unk_token="<|endoftext|>")
fast.save_pretrained(snap)
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=len(fast), n_positions=32, n_ctx=32,
                           bos_token_id=0, eos_token_id=0)).save_pretrained(snap)
"""

LOAD = """
import json, torch
from transformers import GPT2LMHeadModel
from sae.lm import models
t = torch.tensor([[0, 5, 6, 7, 8, 9]])
ref = GPT2LMHeadModel.from_pretrained("gpt2")(t, output_hidden_states=True).hidden_states[1]
def check(m):
    a = models.hook_activations(m, t, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    return {"class": type(m).__name__, "record": getattr(m, "sae_model_load", None),
            "raw": torch.allclose(a, ref, atol=1e-5), "centred": torch.allclose(a, ref - ref.mean(-1, keepdim=True), atol=1e-5)}
out = {p: check(models.load_model("gpt2", processing=p)) for p in ("none", "transformer_lens")}
if models.tl_major() < 4:  # the TL 4.x loader, on the TransformerBridge that 3.9 already ships
    out["bridge"] = {p: check(models._load_tl4("gpt2", "cpu", models.from_pretrained_kwargs(p))) for p in ("none", "transformer_lens")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    r = subprocess.run([sys.executable, "-c", MAKE_HUB, str(hub)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1"}


def test_hub_model_from_the_local_cache_for_real(hub_env):
    """The real loaders on a real (tiny) GPT-2 from the local Hugging Face cache: by default the
    residual stream is the Hugging Face model's own (no folding, no centring); processing
    "transformer_lens" gives from_pretrained's centred residual."""
    r = subprocess.run([sys.executable, "-c", LOAD], env=hub_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["none"]["raw"] and not out["transformer_lens"]["raw"] and out["transformer_lens"]["centred"]
    assert out["none"]["record"] == models.load_record("gpt2")
    assert out["transformer_lens"]["record"] == models.load_record("gpt2", "transformer_lens")
    if "bridge" in out:
        assert out["bridge"]["none"]["class"] == "TransformerBridge"
        assert out["bridge"]["none"]["raw"] and out["bridge"]["transformer_lens"]["centred"]


def test_cache_of_a_hub_model_records_how_it_was_loaded(hub_env, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("the red cube\nthe blue sphere is next to the red cube\n")
    r = subprocess.run([sys.executable, "train.py", "cache", "--model", "gpt2", "--source", str(src), "--out",
                        str(tmp_path / "c"), "--model-kwargs", '{"dtype": "float32"}', "--threads", "1"],
                       cwd=ROOT, env=hub_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["model_load"] == models.load_record("gpt2", "none", {"dtype": "float32"})
    assert m["model_load"]["model_from_pretrained_kwargs"] == {"center_writing_weights": False, "dtype": "float32"}
    assert m["model_load"]["model_class_name"] == "HookedTransformer" and not m["model_load"]["fold_ln"]
    assert m["hook_names"] == ["blocks.1.hook_resid_post"] and m["identity"]["config"]["model_processing"] == "none"
    assert "hooks: blocks.1.hook_resid_post (gpt2's default; --hooks to choose)" in r.stderr


def test_scenes_tokenizer():
    tok = models.get_tokenizer("scenes")
    words = " ".join(w for w in tok.vocab if w.isalpha())
    assert tok.decode(tok.encode(words)) == words
    assert tok.bos_token_id is not None and tok.pad_token_id is not None


def test_model_without_tokenizer(model):
    with pytest.raises(ValueError, match="has no tokenizer"):
        models.get_tokenizer("tiny", model)
