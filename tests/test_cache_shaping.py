"""No silent data shaping in the cache writer: caps, cuts and padding are said on stderr and
recorded in the manifest; options that do not apply to the source are refused by name; hooks
default to what fits the model; `cache --help` names the models."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sae.lm.cache as cache_mod
from sae.lm import models
from sae.lm.cache import CacheConfig, CacheOptionError, write_cache
from sae.lm.scenes import N_CTX, TOKENIZER, generate_tokens
from sae.core.store import CacheError, open_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=16, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=len(TOKENIZER), n_ctx=N_CTX,
            act_fn="gelu", seed=0)
HOOK = "blocks.0.hook_resid_post"
WORDS = [w for w in TOKENIZER.vocab if w.isalpha()]


@pytest.fixture(scope="module")
def model():
    return models.build_model(TINY)


def config(tmp_path, name="c", **kw):
    return CacheConfig(**{**dict(out=str(tmp_path / name), hooks=[HOOK], batch_size=64, shard_rows=4096), **kw})


def manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def text_file(path, docs):
    path.write_text("\n".join(" ".join(d) for d in docs) + "\n")
    return str(path)


# -----------------------------------------------------------------------------
# caps

def test_file_sources_are_read_whole_by_default(tmp_path, model, capsys):
    """A 5,000-line file used to give 4,096 sequences without a word (the generator's default)."""
    docs = [[WORDS[i % len(WORDS)]] for i in range(5000)]
    src = text_file(tmp_path / "d.txt", docs)
    m = manifest(write_cache(config(tmp_path, source=src), model=model))
    assert m["n_sequences"] == 5000 and m["n_tokens"] == 5000
    assert [n["kind"] for n in m["shaping"]] == ["padding"]  # nothing capped or cut
    capsys.readouterr()
    m = manifest(write_cache(config(tmp_path, "capped", source=src, n_sequences=100), model=model))
    assert m["n_sequences"] == 100
    cap = [n for n in m["shaping"] if n["kind"] == "sequences_capped"]
    msg = f"source {src}: read the first 100 documents; the file holds more (--n-sequences 100; 0 reads all of it)"
    assert cap == [{"kind": "sequences_capped", "sequences_kept": 100, "sequences_in_source": None, "message": msg}]
    assert msg in capsys.readouterr().err.splitlines()


def test_generator_default_is_4096_and_old_caches_still_match(tmp_path, model, capsys):
    """n_sequences 0 means 4096 for the generator, recorded as 4096: a cache written with
    --n-sequences 4096 by the writer before model_processing/model_kwargs existed is still this
    config (the default job's cache/scenes must not be refused after an upgrade)."""
    cfg = config(tmp_path, n_sequences=0, batch_size=512, shard_rows=0)
    path = write_cache(cfg, model=model)
    m = manifest(path)
    assert m["n_sequences"] == 4096 and m["identity"]["config"]["n_sequences"] == 4096
    old = dict(m)
    old["identity"] = {**m["identity"], "config": {k: v for k, v in m["identity"]["config"].items()
                                                   if k not in ("model_processing", "model_kwargs")}}
    (path / "manifest.json").write_text(json.dumps(old))
    capsys.readouterr()
    write_cache(cfg, model=model)
    assert "cache already complete" in capsys.readouterr().err


def test_array_caps_and_cut_columns_are_reported(tmp_path, model, capsys):
    np.save(tmp_path / "t.npy", generate_tokens(30, 0, "train").numpy())
    m = manifest(write_cache(config(tmp_path, source=str(tmp_path / "t.npy"), n_sequences=10, seq_len=20), model=model))
    kinds = {n["kind"]: n for n in m["shaping"]}
    assert kinds["sequences_capped"]["sequences_kept"] == 10 and kinds["sequences_capped"]["sequences_in_source"] == 30
    assert kinds["columns_cut"] == {"kind": "columns_cut", "columns_kept": 20, "columns_in_source": N_CTX,
                                    "tokens_dropped": 10 * (N_CTX - 20), "message": kinds["columns_cut"]["message"]}
    err = capsys.readouterr().err.splitlines()
    assert f"source {tmp_path / 't.npy'}: read the first 10 of its 30 sequences (--n-sequences 10; 0 reads all)" in err
    assert (f"source {tmp_path / 't.npy'}: kept the first 20 of {N_CTX} tokens of each sequence (--seq-len 20); "
            f"{10 * (N_CTX - 20)} tokens not cached") in err


# -----------------------------------------------------------------------------
# cuts and padding

def test_long_documents_cut_are_counted_and_pack_keeps_them(tmp_path, model, capsys):
    docs = [WORDS[:3], WORDS[:8], WORDS[:2]]  # 4, 9 and 3 tokens with BOS
    src = text_file(tmp_path / "d.txt", docs)
    m = manifest(write_cache(config(tmp_path, source=src, seq_len=5), model=model))
    cut = [n for n in m["shaping"] if n["kind"] == "sequences_cut"]
    msg = (f"source {src}: cut 1 of 3 documents to 5 tokens, dropping 4 of 16 tokens (25.0%); --pack keeps every "
           f"token or raise --seq-len (n_ctx {N_CTX})")
    assert cut == [{"kind": "sequences_cut", "sequences_cut": 1, "sequences": 3, "max_tokens": 5, "tokens_dropped": 4,
                    "tokens": 16, "message": msg}]
    assert msg in capsys.readouterr().err.splitlines()
    assert m["n_tokens"] == 3 + 4 + 2  # BOS dropped, 4 tokens cut
    packed = manifest(write_cache(config(tmp_path, "pack", source=src, seq_len=5, pack=True), model=model))
    assert packed["n_tokens"] == 16 - 3 and not [n for n in packed["shaping"] if n["kind"] == "sequences_cut"]


def test_text_is_padded_per_batch_not_to_n_ctx(tmp_path, model, monkeypatch, capsys):
    """Each batch is as wide as its longest document (MiniLM used to pad every line to 512), and
    rows are the same as when each document runs alone."""
    docs = [WORDS[:2], WORDS[:3], WORDS[:9], WORDS[:1], WORDS[:4]]
    src = text_file(tmp_path / "d.txt", docs)
    widths, real = [], models.hook_activations
    monkeypatch.setattr(cache_mod.models, "hook_activations",
                        lambda m, toks, hooks: widths.append(toks.shape[1]) or real(m, toks, hooks))
    path = write_cache(config(tmp_path, source=src, batch_size=2), model=model)
    assert widths == [3, 4, 10, 5]  # the first document alone (probing hook widths), then batches of two
    m = manifest(path)
    assert m["seq_len"] == 10 and m["source"]["seq_len"] == N_CTX  # longest document; the cap
    pad = [n for n in m["shaping"] if n["kind"] == "padding"]
    assert pad[0]["max_tokens"] == 10 and pad[0]["message"] in capsys.readouterr().err.splitlines()
    c = open_cache(path)
    for i, d in enumerate(docs):
        alone = torch.tensor([[TOKENIZER.bos_token_id] + TOKENIZER.encode(" ".join(d))])
        mine = c.read("seq_index") == i
        assert torch.allclose(c.read(HOOK)[mine], real(model, alone, [HOOK])[HOOK][0, 1:], atol=1e-5)


# -----------------------------------------------------------------------------
# options that do not apply are refused, naming the option

@pytest.mark.parametrize("source, kw, flag, problem", [
    ("d.txt", dict(text_field="body"), "--text-field", "applies only to .jsonl sources"),
    ("d.txt", dict(split="test"), "--split", "applies only to the generator"),
    ("d.txt", dict(seed=1), "--seed", "applies only to the generator"),
    ("t.npy", dict(pack=True), "--pack", "applies only to text sources"),
    ("t.npy", dict(text_field="ids"), "--text-field", "applies only to .jsonl sources"),
    ("generator", dict(pack=True), "--pack", "applies only to text sources"),
    ("generator", dict(seq_len=8), "--seq-len", "applies only to file sources"),
    ("generator", dict(model_processing="transformer_lens"), "--model-processing", "applies to Hub models only"),
    ("generator", dict(model_kwargs='{"dtype": "float16"}'), "--model-kwargs", "applies to Hub models only"),
    ("generator", dict(model_processing="folded"), "--model-processing", "must be one of none, transformer_lens"),
    ("d.txt", dict(model="gpt2", model_kwargs="{dtype}"), "--model-kwargs", "is not valid JSON"),
    ("d.txt", dict(model="gpt2", model_kwargs="[1]"), "--model-kwargs", "must be a JSON object"),
    ("d.txt", dict(model="gpt2", model_kwargs='{"device": "cuda"}'), "--model-kwargs", "use --device"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, model, source, kw, flag, problem):
    (tmp_path / "d.txt").write_text(WORDS[0] + "\n")
    np.save(tmp_path / "t.npy", generate_tokens(4, 0, "train").numpy())
    src = source if source == "generator" else str(tmp_path / source)
    with pytest.raises(CacheOptionError) as e:
        write_cache(config(tmp_path, source=src, **kw), model=model)
    assert isinstance(e.value, CacheError) and "\n" not in str(e.value)
    assert e.value.cli_message().startswith(f"{flag} ") and problem in e.value.cli_message()
    assert not (tmp_path / "c").exists()


# -----------------------------------------------------------------------------
# hooks that fit the model

def test_default_hooks_fit_the_model(tmp_path, model, capsys):
    scenes = manifest(write_cache(CacheConfig(out=str(tmp_path / "s"), n_sequences=8, batch_size=8)))
    assert scenes["hook_names"] == ["blocks.1.hook_resid_post"] and scenes["hooks_default"]
    assert "hooks: blocks.1.hook_resid_post (scenes's default; --hooks to choose)" in capsys.readouterr().err
    np.save(tmp_path / "t.npy", generate_tokens(4, 0, "train").numpy())
    other = manifest(write_cache(CacheConfig(out=str(tmp_path / "o"), model="tiny", source=str(tmp_path / "t.npy")),
                                 model=model))
    assert other["hook_names"] == ["blocks.1.hook_resid_post"]  # middle block of 2; pre-LN: the residual itself
    assert models.default_hooks("tiny", models.build_model({**TINY, "n_layers": 4})) == ["blocks.2.hook_resid_post"]


def test_passed_in_model_is_recorded_as_such(tmp_path, model):
    m = manifest(write_cache(config(tmp_path, n_sequences=8), model=model))
    assert m["model_load"] == {"model_class_name": type(model).__name__, "model_from_pretrained_kwargs": None,
                               "fold_ln": None, "center_writing_weights": None, "center_unembed": None,
                               "fold_value_biases": None, "loader": "given to write_cache (not loaded by it)"}


def test_builtin_model_load_is_recorded(tmp_path):
    m = manifest(write_cache(CacheConfig(out=str(tmp_path / "s"), n_sequences=8, batch_size=8)))
    assert m["model_load"] == {**models.load_record("scenes"), "loader": "builtin"}
    assert m["model_load"]["model_from_pretrained_kwargs"] == {} and not m["model_load"]["fold_ln"]


def test_stale_temporary_files_of_any_writer_are_cleared_on_resume(tmp_path, model, monkeypatch):
    cfg = config(tmp_path, n_sequences=40, batch_size=8, shard_rows=200)
    ref = {p.name: p.read_bytes() for p in write_cache(config(tmp_path, "ref", n_sequences=40, batch_size=8,
                                                              shard_rows=200), model=model).iterdir()}
    real = cache_mod._write_shard
    monkeypatch.setattr(cache_mod, "_write_shard", lambda p, t: (_ for _ in ()).throw(KeyboardInterrupt)
                        if p.name.endswith("2.safetensors") else real(p, t))
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg, model=model)
    monkeypatch.setattr(cache_mod, "_write_shard", real)
    (Path(cfg.out) / ".shard-00002.safetensors.tmp-999999").write_bytes(b"a killed writer's")
    (Path(cfg.out) / ".progress.json.tmp-999999").write_bytes(b"{")
    write_cache(cfg, model=model)
    assert {p.name: p.read_bytes() for p in Path(cfg.out).iterdir()} == ref


def test_cache_help_names_the_models_and_options():
    r = subprocess.run([sys.executable, "train.py", "cache", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert r.returncode == 0
    for needle in ("'minilm' (all-MiniLM-L6-v2", "'scenes' (the built-in toy model)", "Hugging Face Hub id such as gpt2",
                   "HF_HUB_OFFLINE=1", "--model-processing", "--model-kwargs", "0 = the whole file",
                   "blocks.3.hook_normalized_resid_post"):
        assert needle in text, needle
