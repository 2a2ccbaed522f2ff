"""The activation-cache writer (sae/cache.py): sources, masks, manifest, atomic writes, resume and
bad input. A tiny random model with the scenes vocabulary stands in for the built-in one, built
through sae.lm.models so the file runs under TL 3.x and TL 4.x alike."""

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import sae
from sae.lm import models
from sae.lm.cache import CacheConfig, write_cache
from sae.lm.scenes import N_CTX, TOKENIZER, generate_tokens
from sae.core.store import CacheError, make_store, open_cache

TINY = dict(d_model=16, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=len(TOKENIZER), n_ctx=N_CTX,
            act_fn="gelu", seed=0)
HOOK = "blocks.0.hook_resid_post"
WORDS = [w for w in TOKENIZER.vocab if w.isalpha()]  # ordinary words of the scenes vocabulary


@pytest.fixture(scope="module")
def model():
    return models.build_model(TINY)


def config(tmp_path, name="c", **kw):
    base = dict(out=str(tmp_path / name), hooks=[HOOK], n_sequences=40, batch_size=8, shard_rows=200)
    return CacheConfig(**{**base, **kw})


def files(path):
    """{name: bytes} of a directory, to show that nothing changed or that two caches are identical."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def one_line(e):
    return "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# what a cache holds

def test_generator_cache_rows_map_back_to_tokens(tmp_path, model):
    cfg = config(tmp_path, hooks=[HOOK, "blocks.1.attn.hook_z"])
    path = write_cache(cfg, model=model)
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "sae-activation-cache" and m["version"] == 1 and m["model"] == "scenes"
    assert m["hook_names"] == [HOOK, "blocks.1.attn.hook_z"] and m["d_in"] == {HOOK: 16, "blocks.1.attn.hook_z": 16}
    assert m["dtype"] == "float32" and m["n_sequences"] == 40 and m["source"]["kind"] == "generator"
    assert not (path / "progress.json").exists() and not list(path.glob("*.tmp"))

    toks = generate_tokens(40, 0, "train")
    keep = (toks != TOKENIZER.pad_token_id) & (toks != TOKENIZER.bos_token_id)
    assert m["n_tokens"] == int(keep.sum())
    assert [s["rows"] for s in m["shards"]] == [200] * (m["n_tokens"] // 200) + [m["n_tokens"] % 200]

    cache = open_cache(path)  # verifies sizes and sha256
    seq, pos = cache.read("seq_index").long(), cache.read("position").long()
    assert torch.equal(cache.read("token_ids").long(), toks[seq, pos])
    assert keep[seq, pos].all() and len(set(zip(seq.tolist(), pos.tolist()))) == m["n_tokens"]
    acts = models.hook_activations(model, toks, [HOOK, "blocks.1.attn.hook_z"])
    for h in m["hook_names"]:
        assert torch.allclose(cache.read(h), acts[h][seq, pos], atol=1e-5)


def test_drop_bos_false_and_positions(tmp_path, model):
    m = open_cache(write_cache(config(tmp_path, "a", drop_bos=False), model=model))
    assert (m.read("position") == 0).sum() == 40  # one BOS row per sequence
    p = open_cache(write_cache(config(tmp_path, "b", positions="12,13"), model=model))
    assert set(p.read("position").tolist()) == {12, 13} and p.n_rows == 80


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage(tmp_path, model, dtype):
    full = open_cache(write_cache(config(tmp_path, "f32"), model=model)).read(HOOK)
    path = write_cache(config(tmp_path, dtype, dtype=dtype), model=model)
    assert open_cache(path).read(HOOK).dtype == getattr(torch, dtype)
    x = make_store(path, batch_size=full.shape[0], seed=0).next_batch()
    assert x.dtype == torch.float32
    assert torch.allclose(torch.sort(x[:, 0]).values, torch.sort(full[:, 0]).values, rtol=1e-2, atol=1e-2)


def test_token_arrays_match_the_generator(tmp_path, model):
    """The same tokens from .npy / .safetensors give byte-identical shards to the generator's."""
    from safetensors.torch import save_file

    toks = generate_tokens(40, 0, "train")
    np.save(tmp_path / "t.npy", toks.numpy().astype(np.int32))
    save_file({"tokens": toks}, str(tmp_path / "t.safetensors"))
    ref = files(write_cache(config(tmp_path, "gen"), model=model))
    for src in ("t.npy", "t.safetensors"):
        got = files(write_cache(config(tmp_path, "out-" + src, source=str(tmp_path / src), n_sequences=0), model=model))
        assert {k: v for k, v in got.items() if k.startswith("shard")} == {k: v for k, v in ref.items() if k.startswith("shard")}


def test_model_without_tokenizer(tmp_path, model):
    """Any other model id: token arrays work (BOS assumed at position 0, no PAD dropping); text needs a tokenizer."""
    np.save(tmp_path / "t.npy", generate_tokens(10, 0, "train").numpy())
    c = open_cache(write_cache(config(tmp_path, "a", model="tiny", source=str(tmp_path / "t.npy"), n_sequences=0), model=model))
    assert c.n_rows == 10 * (N_CTX - 1) and c.manifest["model"] == "tiny" and c.read("position").min() == 1
    (tmp_path / "d.txt").write_text(WORDS[0] + "\n")
    with pytest.raises(CacheError, match="model 'tiny' has no tokenizer; use a .npy/.safetensors token file"):
        write_cache(config(tmp_path, "b", model="tiny", source=str(tmp_path / "d.txt"), n_sequences=0), model=model)


def test_text_sources(tmp_path, model):
    lines = [" ".join(WORDS[:7]), "", " ".join(WORDS[3:6]), " ".join(WORDS[7:11])]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": s}) for s in lines if s) + "\n")
    t = open_cache(write_cache(config(tmp_path, "txt", source=str(tmp_path / "d.txt"), n_sequences=0), model=model))
    j = open_cache(write_cache(config(tmp_path, "jsonl", source=str(tmp_path / "d.jsonl"), n_sequences=0,
                                      text_field="body"), model=model))
    words = [TOKENIZER.encode(s) for s in lines if s]
    assert t.n_rows == sum(map(len, words)) and t.manifest["n_sequences"] == 3
    assert t.read("token_ids").tolist() == [i for w in words for i in w]  # BOS and padding dropped
    assert torch.equal(t.read(HOOK), j.read(HOOK))
    # packed: documents run on across sequence boundaries, so later tokens see earlier documents
    p = open_cache(write_cache(config(tmp_path, "pack", source=str(tmp_path / "d.txt"), n_sequences=0, pack=True,
                                      seq_len=8), model=model))
    assert p.read("token_ids").tolist() == [i for w in words for i in w]
    assert p.manifest["n_sequences"] == 3 and p.read("position").max() == 7  # 17 tokens with BOS: 8 + 8 + 1


# -----------------------------------------------------------------------------
# atomic writes and resume

def test_interrupted_run_resumes_to_an_identical_cache(tmp_path, model, monkeypatch):
    import sae.lm.cache as cache_mod

    ref = files(write_cache(config(tmp_path, "ref"), model=model))
    cfg = config(tmp_path, "run")
    real, calls = cache_mod._write_shard, []

    def interrupt_on_third(path, tensors):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, tensors)

    monkeypatch.setattr(cache_mod, "_write_shard", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg, model=model)
    monkeypatch.setattr(cache_mod, "_write_shard", real)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == ["progress.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(CacheError, match="no manifest.json.*unfinished write.*rerun") as e:
        make_store(out, batch_size=8)
    assert one_line(e)
    # what a SIGKILL can leave besides: a half-written temp file, a renamed shard not yet recorded
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half")
    (out / "shard-00002.safetensors").write_bytes(b"renamed but unrecorded")
    written = []
    monkeypatch.setattr(cache_mod, "_write_shard", lambda p, t: written.append(p.name) or real(p, t))
    write_cache(cfg, model=model)
    assert written[0] == "shard-00002.safetensors"  # finished shards were not redone
    assert files(out) == ref  # byte-identical to the uninterrupted run, manifest included


def test_sigkill_mid_shard_then_resume(tmp_path, model):
    """A real SIGKILL while a shard's temp file is half written."""
    ref = files(write_cache(config(tmp_path, "ref"), model=model))
    out = tmp_path / "run"
    child = f"""
import os, signal, sae.lm.cache as c
from sae.lm import models
real, n = c._write_shard, [0]
def kill_on_third(path, tensors):
    n[0] += 1
    if n[0] == 3:
        path.with_name(path.name + ".tmp").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, tensors)
c._write_shard = kill_on_third
cfg = c.CacheConfig(out={str(out)!r}, hooks=[{HOOK!r}], n_sequences=40, batch_size=8, shard_rows=200)
c.write_cache(cfg, model=models.build_model({TINY!r}))
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "shard-00002.safetensors.tmp").exists() and not (out / "manifest.json").exists()
    write_cache(config(tmp_path, "run"), model=model)
    assert files(out) == ref


def test_complete_cache_is_left_alone(tmp_path, model, capsys):
    cfg = config(tmp_path)
    before = files(write_cache(cfg, model=model))
    write_cache(cfg, model=model)
    assert "already complete" in capsys.readouterr().err and files(cfg.out) == before


def interrupted_run(cfg, model, monkeypatch, after_shards):
    """Run cfg until `after_shards` shards are written, then Ctrl-C."""
    import sae.lm.cache as cache_mod

    real, calls = cache_mod._write_shard, []

    def interrupt(path, tensors):
        calls.append(path.name)
        if len(calls) > after_shards:
            raise KeyboardInterrupt
        return real(path, tensors)

    monkeypatch.setattr(cache_mod, "_write_shard", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg, model=model)
    monkeypatch.setattr(cache_mod, "_write_shard", real)


def test_changed_shard_is_rewritten_on_resume(tmp_path, model, monkeypatch):
    ref = files(write_cache(config(tmp_path, "ref"), model=model))
    cfg = config(tmp_path, "run")
    interrupted_run(cfg, model, monkeypatch, after_shards=3)
    f = Path(cfg.out) / "shard-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"x")
    write_cache(cfg, model=model)
    assert files(cfg.out) == ref


@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize("change", [dict(n_sequences=41), dict(hooks=["blocks.1.hook_resid_post"]), dict(drop_bos=False)])
def test_different_config_in_same_dir_is_refused_untouched(tmp_path, model, monkeypatch, finished, change):
    cfg = config(tmp_path)
    if finished:
        write_cache(cfg, model=model)
    else:
        interrupted_run(cfg, model, monkeypatch, after_shards=1)
    before = files(cfg.out)
    with pytest.raises(CacheError, match="holds a cache of a different config") as e:
        write_cache(replace(cfg, **change), model=model)
    assert one_line(e) and files(cfg.out) == before


def test_different_weights_are_refused(tmp_path, model):
    cfg = config(tmp_path)
    before = files(write_cache(cfg, model=model))
    with pytest.raises(CacheError, match="same config but different model weights"):
        write_cache(cfg, model=models.build_model({**TINY, "seed": 1}))
    assert files(cfg.out) == before


def test_foreign_directory_is_refused(tmp_path, model):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty and holds no cache"):
        write_cache(config(tmp_path), model=model)
    assert files(tmp_path / "c") == {"notes.txt": b"mine"}


# -----------------------------------------------------------------------------
# bad input: one line, nothing written

@pytest.mark.parametrize("kw, msg", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(shard_rows=-1), "shard_rows must be an integer >= 0"),
    (dict(dtype="float64"), "dtype must be float32, float16 or bfloat16"),
    (dict(hooks=[""]), "hooks must be a list of hook names"),
    (dict(hooks=[HOOK, HOOK]), "hooks has duplicates"),
    (dict(split="dev"), "split must be train, test or heldout"),
    (dict(n_sequences=-1), "n_sequences must be an integer >= 0"),
    (dict(model="gpt2"), "built-in generator makes scenes tokens"),
    (dict(source="data.csv"), "must be 'generator' or a .txt/.jsonl/.npy/.safetensors file"),
    (dict(source="missing.npy"), "source missing.npy: no such file"),
    (dict(positions="12,x"), "positions must be comma-separated integers"),
    (dict(positions="99"), "positions 99 is beyond the sequence length 34"),
])
def test_invalid_options(tmp_path, model, kw, msg):
    with pytest.raises(CacheError, match=msg) as e:
        write_cache(config(tmp_path, **kw), model=model)
    assert one_line(e) and not (tmp_path / "c").exists()


def test_unknown_hook_name(tmp_path, model):
    with pytest.raises(ValueError, match="unknown hook name 'blocks.9.hook_resid_post'.*valid names include") as e:
        write_cache(config(tmp_path, hooks=["blocks.9.hook_resid_post"]), model=model)
    assert one_line(e) and not (tmp_path / "c").exists()


def bad_source(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(p, content, allow_pickle=True)
    else:
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return dict(source=str(p), n_sequences=0)


@pytest.mark.parametrize("name, content, msg", [
    ("e.txt", "\n\n  \n", "empty dataset"),
    ("e.jsonl", "", "empty dataset"),
    ("e.npy", np.zeros((0, 34), dtype=np.int64), "empty dataset"),
    ("b.jsonl", '{"text": "red cube"}\n{"text": oops}\n', "line 2: invalid JSON"),
    ("f.jsonl", '{"body": "red cube"}\n', "line 1: no string field 'text'"),
    ("w.txt", f"{WORDS[0]}\n{WORDS[0]} zzzunknown\n", "line 2: cannot tokenise"),
    ("f.npy", np.zeros((4, 34), dtype=np.float32), "expected a 2-D integer array"),
    ("p.npy", np.array([{"a": 1}], dtype=object), "cannot read as a .npy array"),
    ("v.npy", np.full((4, 34), 999, dtype=np.int64), "sequence 0 has a token id outside the model's vocabulary"),
    ("l.npy", np.ones((4, 40), dtype=np.int64), "sequences of 40 tokens exceed the model's n_ctx 34"),
    ("c.safetensors", b"\x00garbage", "cannot read as safetensors"),
    ("u.txt", b"\xff\xfe red", "not UTF-8 text"),
])
def test_bad_sources(tmp_path, model, name, content, msg):
    with pytest.raises(CacheError, match=msg) as e:
        write_cache(config(tmp_path, **bad_source(tmp_path, name, content)), model=model)
    assert one_line(e) and not (tmp_path / "c").exists()


def test_everything_dropped_is_an_empty_dataset(tmp_path, model):
    toks = torch.full((4, 34), TOKENIZER.pad_token_id)
    toks[:, 0] = TOKENIZER.bos_token_id
    with pytest.raises(CacheError, match="no rows to cache") as e:
        write_cache(config(tmp_path, **bad_source(tmp_path, "pad.npy", toks.numpy())), model=model)
    assert one_line(e) and not (tmp_path / "c").exists()


def test_nan_activations(tmp_path):
    sd = models.hooked_state_dict(models.build_model(TINY))
    toks = generate_tokens(8, 0, "train")
    common = torch.mode(toks[toks > max(TOKENIZER.bos_token_id, TOKENIZER.pad_token_id)]).values  # in the first batch
    sd["embed.W_E"][common] = float("nan")
    bad = models.build_model(TINY, state_dict=sd)
    with pytest.raises(CacheError, match=f"NaN/inf activations from hook {HOOK} in source sequences") as e:
        write_cache(config(tmp_path), model=bad)
    assert one_line(e) and not (tmp_path / "c").exists()


def test_a_dictionary_records_how_its_model_was_loaded(tmp_path, model):
    """SAELens reloads the model from cfg.json's model_class_name and model_from_pretrained_kwargs:
    the cache's model_load record must reach every dictionary trained on it."""
    path = write_cache(config(tmp_path), model=model)
    manifest = json.loads((path / "manifest.json").read_text())
    record = {**manifest["model_load"], "model_class_name": "HookedTransformer",
              "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    manifest["model_load"] = record  # as a Hub model's cache records it (loading one needs the network)
    (path / "manifest.json").write_text(json.dumps(manifest))
    result = sae.train(sae.TopKSAE(16, 32, k=2), str(path), steps=3, batch_size=32, run_dir=str(tmp_path / "r"))
    meta = json.loads((result.run_dir / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["model_class_name"] == "HookedTransformer"
    assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    assert meta["model_load"] == record and meta["model_name"] == "scenes" and meta["hook_name"] == HOOK
