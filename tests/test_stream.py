"""Training straight from the model: the stream serves a cache's rows in a seed-fixed shuffled
order with bounded memory, one forward pass feeds every hook, a killed run resumes at the exact
next sample, and the stream can write the cache as it goes."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.core.store import open_cache
from sae.lm import models
from sae.lm.cache import CacheConfig, write_cache
from sae.lm.scenes import N_CTX, TOKENIZER
from sae.lm.stream import KEEP_BUFFERS, ModelStream, StreamConfig

TINY = dict(d_model=16, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=len(TOKENIZER), n_ctx=N_CTX,
            act_fn="gelu", seed=0)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def model():
    return models.build_model(TINY)


def stream(model, **kw):
    cfg = dict(model="scenes", hooks=HOOKS, n_sequences=48, forward_batch=8, buffer_rows=300)
    return ModelStream(StreamConfig(**{**cfg, **kw}), model=model)


def epoch_rows(s, hook, seed=0):
    """Every row of epoch 0 as the reader serves it."""
    reader = s.readers([hook], batch_size=50, seed=seed)[hook]
    rows = []
    while reader.epoch == 0:
        rows.append(reader.next_batch())
    return torch.cat(rows)


def test_an_epoch_is_the_cache_rows_shuffled_within_buffers(tmp_path, model):
    cache = write_cache(CacheConfig(out=str(tmp_path / "c"), hooks=HOOKS, n_sequences=48, batch_size=8), model=model)
    stored = open_cache(cache).read(HOOKS[1], 0, open_cache(cache).n_rows)
    served = epoch_rows(stream(model), HOOKS[1])[: len(stored)]  # the last batch runs into epoch 1
    assert len(stored) > 300 * 2  # several buffers
    chunks = [(stored[i: i + 300], served[i: i + 300]) for i in range(0, len(stored), 300)]
    for a, b in chunks:  # each buffer holds the cache's next rows, in another order
        assert not torch.equal(a, b) or len(a) == 1
        assert torch.equal(a[a[:, 0].argsort()], b[b[:, 0].argsort()])
    again = epoch_rows(stream(model), HOOKS[1])
    assert torch.equal(epoch_rows(stream(model), HOOKS[1]), again)  # a pure function of the seed
    assert not torch.equal(epoch_rows(stream(model), HOOKS[1], seed=1), again)


def test_one_forward_pass_feeds_every_hook_and_memory_stays_bounded(model, monkeypatch):
    calls = []
    real = models.hook_activations
    monkeypatch.setattr(models, "hook_activations", lambda m, t, h: calls.append(list(h)) or real(m, t, h))
    s = stream(model)
    readers = s.readers(HOOKS, batch_size=50, seed=0)
    for _ in range(30):  # several buffers, every hook read in step
        for r in readers.values():
            r.next_batch()
        assert len(s.buffers) <= KEEP_BUFFERS
    assert calls and all(hooks == HOOKS for hooks in calls)  # both hooks from each forward pass


SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch, sae
    sys.path.insert(0, {tests!r})
    from test_stream import TINY, HOOKS
    from sae.lm import models
    from sae.lm.stream import ModelStream, StreamConfig
    run_dir, kill_at, resume, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    s = ModelStream(StreamConfig(model="scenes", hooks=HOOKS, n_sequences=48, forward_batch=8, buffer_rows=300,
                                 write_cache=cache), model=models.build_model(TINY))
    torch.manual_seed(0)
    pair = {{"L0": sae.TopKSAE(16, 32, k=3), "L1": sae.TopKSAE(16, 32, k=3)}}

    def die(step, logs):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sae.train_many(pair, s, hooks=dict(zip(pair, HOOKS)), steps=30, batch_size=64, checkpoint_every=5,
                   log_every=5, run_dir=run_dir, resume=resume, callback=die)
""")


def test_a_streamed_set_resumes_after_sigkill_and_writes_its_cache_as_it_goes(tmp_path, model):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))

    def run(name, at, resume):
        return subprocess.run([sys.executable, str(script), str(tmp_path / name), str(at), resume,
                               str(tmp_path / f"{name}-cache")], capture_output=True, text=True, timeout=300)

    assert run("straight", -1, "0").returncode == 0
    assert run("killed", 12, "0").returncode == -signal.SIGKILL
    resumed = run("killed", -1, "1")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("L0", "L1"):
        a = load_file(str(tmp_path / "straight" / name / "sae" / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "killed" / name / "sae" / "sae_weights.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # 30 steps of 64 rows pass the end of the first epoch: the cache written on the way is complete
    # and holds exactly the rows the cache writer stores for the same options
    reference = write_cache(CacheConfig(out=str(tmp_path / "ref"), hooks=HOOKS, n_sequences=48, batch_size=8),
                            model=models.build_model(TINY))
    written = open_cache(tmp_path / "straight-cache")
    assert written.n_rows == open_cache(reference).n_rows
    for hook in HOOKS:
        assert torch.equal(written.read(hook, 0, written.n_rows),
                           open_cache(reference).read(hook, 0, written.n_rows))
    manifest = json.loads((tmp_path / "straight-cache" / "manifest.json").read_text())
    assert manifest["hook_names"] == HOOKS and manifest["source"]["kind"] == "generator"


def test_a_buffer_smaller_than_a_batch_is_one_line(model):
    with pytest.raises(ValueError, match="batch_size 512 is larger than buffer_rows 300"):
        sae.train(sae.TopKSAE(16, 32, k=3), stream(model), hook=HOOKS[0], steps=2, batch_size=512)
