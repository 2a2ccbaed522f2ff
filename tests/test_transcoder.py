"""Transcoders: a dictionary that reads one hook and predicts another, with any sparsity rule and
an optional skip term; trained from tensors, a cache or the model's stream (library and train.py);
saved in SAELens' transcoder layout and loaded back; spliced in with the OUTPUT hook replaced."""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.core.io import LoadError
from sae.lm import models, splice
from sae.lm.attach import attached
from sae.lm.cache import write_tensors
from sae.lm.scenes import N_CTX, TOKENIZER
from sae.lm.stream import ModelStream, StreamConfig

TRAIN_PY = str(Path(__file__).resolve().parents[1] / "train.py")
RULES = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "relu": {}, "jumprelu": {}}
IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
# The SAELens architecture each (class, rule) is saved as; topk has no SAELens class.
SAELENS = {("transcoder", "relu"): "transcoder", ("skip_transcoder", "relu"): "skip_transcoder",
           ("transcoder", "jumprelu"): "jumprelu_transcoder", ("skip_transcoder", "jumprelu"): "jumprelu_skip_transcoder",
           ("transcoder", "batchtopk"): "jumprelu_transcoder",
           ("skip_transcoder", "batchtopk"): "jumprelu_skip_transcoder",
           ("transcoder", "topk"): "topk_transcoder", ("skip_transcoder", "topk"): "topk_skip_transcoder"}


def mlp_data(n=2048, d_in=12, d_out=8, seed=0):
    """(x, y): y a sparse-ish nonlinear map of x (an MLP of 24 units) plus a linear part and an offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w_in, w_out = torch.randn(d_in, 24, generator=g), torch.randn(24, d_out, generator=g)
    y = torch.relu(x @ w_in - 2.0) @ w_out + x @ torch.randn(d_in, d_out, generator=g) * 0.3 + 1.0
    return x, y


OPTIONS = dict(steps=30, batch_size=64, lr=3e-3, checkpoint_every=10, log_every=5, eval_tokens=512)


def build(arch="skip_transcoder", rule="topk", d_in=12, d_out=8, **kw):
    torch.manual_seed(0)
    return sae.SAE.registry[arch](d_in, 48, d_out=d_out, sparsity=rule, **{**RULES[rule], **kw})


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_each_rule_learns_the_map(arch, rule):
    x, y = mlp_data()
    m = build(arch, rule)
    result = sae.train(m, (x, y), steps=200, batch_size=64, lr=3e-3, log_every=50)
    assert result.metrics["fvu"] < 0.5, result.metrics  # predicting the mean is 1.0
    assert result.metrics["l0"] < 48
    m.eval()
    assert m(x).x_hat.shape == y.shape and m.encode(x).shape == (len(x), 48)


def test_start_continue_trains_a_saved_transcoder_further_where_it_was():
    x, y = mlp_data()
    m = build()
    before = sae.train(m, (x, y), steps=200, batch_size=64, lr=3e-3, log_every=50).metrics["fvu"]
    # input and target scales are folded back in separately (the decoder's norm gives the target's)
    again = sae.train(m, (x, y), steps=2, batch_size=64, lr=1e-7, lr_warmup=0, lr_decay=0, start="continue")
    assert again.metrics["fvu"] == pytest.approx(before, rel=0.1)


@pytest.mark.parametrize("rule", ["topk", "batchtopk"])
def test_auxk_encodes_the_input_and_fits_the_target_residual(rule):
    """The dead latents' own top-k_aux of x @ W_enc + b_enc, decoded into the OUTPUT space, fit y - y_hat."""
    m = build("skip_transcoder", rule, aux_k=4)
    x, y = mlp_data(n=64)
    with torch.no_grad():
        m.W_skip.normal_()
        m.b_dec.normal_()
        m.tokens_since_fired[::3] = m.cfg.dead_tokens  # every third latent dead
    out = m.train()(x, y)
    dead = torch.arange(0, 48, 3)
    pre = (x @ m.W_enc[:, dead] + m.b_enc[dead]).relu()
    values, idx = pre.topk(4, dim=1)
    residual_hat = torch.einsum("bk,bkd->bd", values, m.W_dec[dead][idx])
    expected = m.cfg.aux_coeff * (residual_hat - (y - out.x_hat)).pow(2).sum(-1).mean() * min(len(dead) / 4, 1.0)
    assert out.losses["aux"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_input_is_encoded_without_b_dec_and_the_skip_term_is_linear():
    m = build("skip_transcoder", "relu")
    x = torch.randn(32, 12)
    with torch.no_grad():
        m.W_skip.normal_()
        before = m.encode(x)
        m.b_dec.add_(5.0)  # the OUTPUT's bias: codes must not move (SAELens: apply_b_dec_to_input false)
        assert torch.equal(m.encode(x), before)
        assert torch.allclose(m(x).x_hat, m.decode(before) + x @ m.W_skip.T, atol=1e-5)
        assert torch.allclose(m.decode(before, x), m(x).x_hat, atol=1e-6)


def test_a_scaled_transcoder_folds_into_one_for_raw_activations():
    m = build("skip_transcoder", "jumprelu").eval()
    with torch.no_grad():
        m.W_skip.normal_()
        m.b_dec.normal_()
    x = torch.randn(32, 12)
    folded = copy.deepcopy(m)
    folded.fold_activation_scale_(3.0, 0.5)  # trained on (3 x, 0.5 y)
    assert torch.equal(folded.encode(x) > 0, m.encode(x * 3.0) > 0)
    assert torch.allclose(folded(x).x_hat, m(x * 3.0).x_hat / 0.5, atol=1e-4)


@pytest.mark.filterwarnings("ignore:the sparsity penalty collapses")  # 5 steps: only the files matter here
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_saved_in_the_saelens_transcoder_layout_and_loaded_back(tmp_path, arch, rule):
    x, y = mlp_data(n=256)
    m = build(arch, rule)
    sae.train(m, (x, y), steps=5, batch_size=64, log_every=5, eval_tokens=128)
    m.save(tmp_path / "d", metadata={"model_name": "tiny", "hook_name": IN, "hook_name_out": OUT})
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS[(arch, rule)]
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (12, 48, 8, False)
    assert cfg["metadata"]["hook_name"] == IN and cfg["metadata"]["hook_name_out"] == OUT
    weights = load_file(str(tmp_path / "d" / "sae_weights.safetensors"))
    expected = {"W_enc": (12, 48), "W_dec": (48, 8), "b_enc": (48,), "b_dec": (8,)}
    if arch == "skip_transcoder":
        expected["W_skip"] = (8, 12)  # SAELens' (d_out, d_in)
    if rule in ("jumprelu", "batchtopk"):
        expected["threshold"] = (48,)
    if rule == "topk":
        assert cfg["k"] == 3
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    back = sae.load(tmp_path / "d")
    assert type(back) is type(m) and back.sparsity.name == rule
    assert torch.allclose(back(x).x_hat, m.eval()(x).x_hat, atol=1e-5)
    # The same folder as SAELens would have written it (no block of ours): read from its fields alone.
    del cfg["sae"]
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg))
    if rule == "topk":
        with pytest.raises(LoadError, match="unknown architecture 'topk"):
            sae.load(tmp_path / "d")
        return
    theirs = sae.load(tmp_path / "d")
    assert type(theirs) is type(m) and theirs.d_out == 8
    assert torch.allclose(theirs(x).x_hat, m(x).x_hat, atol=1e-5)


@pytest.mark.parametrize("rule", ["relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_saelens_reads_ours_and_we_read_what_it_saves(tmp_path, arch, rule):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed")
    m = build(arch, rule).eval()
    with torch.no_grad():  # weights that look trained: every term matters
        m.b_enc.normal_(std=0.3)
        m.b_dec.normal_()
        if m.has_skip:
            m.W_skip.normal_()
        if rule == "jumprelu":
            m.log_threshold.normal_(std=0.5)
        if rule == "batchtopk":
            m.threshold.fill_(0.3)
    m.save(tmp_path / "ours", metadata={"hook_name": IN, "hook_name_out": OUT})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    jump, skip = "JumpReLU" if rule != "relu" else "", "Skip" if arch == "skip_transcoder" else ""
    assert type(theirs).__name__ == f"{jump}{skip}Transcoder"
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), m.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), m(x).x_hat, rtol=1e-5, atol=1e-5)
    theirs.save_model(str(tmp_path / "theirs"))
    back = sae.load(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, m(x).x_hat, rtol=1e-5, atol=1e-5)


def test_mismatched_hooks_are_one_line_errors():
    x, y = mlp_data(n=256)
    with pytest.raises(ValueError, match="input hook input holds 256 tokens but target hook target holds 200"):
        sae.train(build(), (x, y[:200]), steps=2, batch_size=64)
    with pytest.raises(ValueError, match="has d=8 but the transcoder outputs d_out=6"):
        sae.train(build(d_out=6), (x, y), steps=2, batch_size=64)
    with pytest.raises(ValueError, match="needs a target hook"):
        sae.train(build(), x, steps=2, batch_size=64)
    with pytest.raises(ValueError, match="is for transcoders"):
        sae.train(sae.TopKSAE(12, 48, k=3), {"a": x, "b": y}, hook="a", target="b", steps=2, batch_size=64)


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("pair") / "cache"
    x, y = mlp_data()
    write_tensors(path, {IN: x, OUT: y, "blocks.1.hook_mlp_out": y[:, :6]}, shard_rows=700)
    return path


def weights(folder: Path) -> dict:
    return load_file(str(folder / "sae" / "sae_weights.safetensors"))


def test_from_a_cache_the_run_records_both_hooks_and_a_set_trains_in_step(tmp_path, pair_cache):
    result = sae.train(build(), str(pair_cache), hook=IN, target=OUT, run_dir=str(tmp_path / "one"), **OPTIONS)
    cfg = json.loads((tmp_path / "one" / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == IN and cfg["metadata"]["hook_name_out"] == OUT
    record = json.loads((tmp_path / "one" / "config.json").read_text())
    assert record["data"]["hook"] == IN and record["data"]["target"] == OUT
    assert result.metrics["tokens"] == 512  # evaluated against the target's rows
    # in a set beside a plain SAE on the input hook: the transcoder is bit-identical to training alone
    pair = {"tc": build(), "sae": sae.TopKSAE(12, 48, k=3)}
    sae.train_many(pair, str(pair_cache), hooks={"tc": IN, "sae": IN}, targets={"tc": OUT},
                   run_dir=str(tmp_path / "set"), **OPTIONS)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "set" / "tc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RESUME = textwrap.dedent("""
    import os, signal, sys, sae
    sys.path.insert(0, {tests!r})
    from test_transcoder import IN, OUT, OPTIONS, build
    run_dir, cache, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    die = lambda step, logs: step == kill_at and os.kill(os.getpid(), signal.SIGKILL)
    sae.train(build(), cache, hook=IN, target=OUT, run_dir=run_dir, resume=resume, callback=die, **OPTIONS)
""")


def test_a_killed_transcoder_run_resumes_bit_identically(tmp_path, pair_cache):
    script = tmp_path / "run.py"
    script.write_text(RESUME.format(tests=os.path.dirname(__file__)))
    run = lambda d, at, resume: subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(d), str(pair_cache), str(at), resume], capture_output=True, text=True,
        timeout=300)
    assert run(tmp_path / "straight", -1, "0").returncode == 0
    assert run(tmp_path / "killed", 17, "0").returncode == -signal.SIGKILL
    resumed = run(tmp_path / "killed", -1, "1")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")


def cli(*args, cwd):
    return subprocess.run([sys.executable, TRAIN_PY, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_command_line_trains_transcoder_pairs_from_a_cache(tmp_path, pair_cache):
    result = cli("--data", str(pair_cache), "--arch", "skip_transcoder", "--sparsity", "jumprelu",
                 "--hook", IN, "--target-hook", OUT, "--n-latents", "32", "--steps", "6", "--batch-size", "64",
                 "--run-dir", str(tmp_path / "tc"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = json.loads((tmp_path / "tc" / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == 8
    assert cfg["metadata"]["hook_name_out"] == OUT
    bad = cli("--data", str(pair_cache), "--arch", "transcoder", "--hook", IN, "--target-hook", "blocks.*.hook_mlp_out",
              "--steps", "2", "--run-dir", str(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("error: --target-hook names 2 hooks for 1 input hooks: "
                                                   "each --hook needs one, paired in order")


TINY = dict(d_model=16, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=len(TOKENIZER), n_ctx=N_CTX,
            act_fn="gelu", seed=0)


@pytest.fixture(scope="module")
def lm():
    return models.build_model(TINY)


def test_from_the_stream_one_pass_feeds_input_and_target(tmp_path, lm):
    stream = ModelStream(StreamConfig(model="scenes", hooks=[IN, OUT], n_sequences=32, forward_batch=8,
                                      buffer_rows=256), model=lm)
    m = build(d_in=16, d_out=16)
    result = sae.train(m, stream, hook=IN, target=OUT, run_dir=str(tmp_path / "s"), **OPTIONS)
    cfg = json.loads((tmp_path / "s" / "sae" / "cfg.json").read_text())
    assert (cfg["metadata"]["model_name"], cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (
        "scenes", IN, OUT)
    assert result.model.d_out == 16 and result.metrics["tokens"] > 0


def test_a_hook_that_is_not_per_token_is_one_line_at_the_command_line(tmp_path):
    result = cli("--model", "scenes", "--arch", "transcoder", "--hook", IN, "--target-hook",
                 "blocks.0.attn.hook_pattern", "--steps", "2", "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "hook_pattern" in last and "not per token" in last, last


@pytest.fixture(scope="module")
def batches(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, TINY["d_vocab"], (16, 12)))
    return splice.make_batches("tiny", lm, str(path), n_sequences=16, batch_size=8)


def by_hand(lm, tc, batches) -> float:
    """Mean next-token CE with OUT replaced by tc(IN) at the spliced rows, hooks written here."""
    total, n = 0.0, 0
    for b in batches:
        seen = {}

        def read(act, hook):
            seen["x"] = act[b.splice].clone()

        def write(act, hook):
            act = act.clone()
            act[b.splice] = tc(seen["x"]).x_hat
            return act

        with torch.no_grad(), lm.hooks(fwd_hooks=[(IN, read), (OUT, write)]):
            logits = lm(b.tokens)
        lp = logits.log_softmax(-1)
        ok = b.targets[:, 1:]
        total += -lp[:, :-1].gather(-1, b.tokens[:, 1:, None])[..., 0][ok].sum().item()
        n += int(ok.sum())
    return total / n


def test_splicing_replaces_the_output_hook_and_recovers_loss(lm, batches):
    tc = build(d_in=16, d_out=16).eval()
    with torch.no_grad():
        tc.W_skip.normal_(std=0.3)
    res = splice.splice_eval(lm, tc, IN, batches, hook_out=OUT, error_term=True)
    d = res["scopes"]["all"]
    assert res["hook_out"] == OUT
    assert d["ce_sae"] == pytest.approx(by_hand(lm, tc, batches), rel=1e-5)
    assert d["ce_error"] == pytest.approx(d["ce_clean"], abs=1e-4)  # prediction + its error = the clean model
    assert "ce_recovered_zero" in d and d["ce_sae"] != d["ce_clean"]
    # a transcoder that predicts 0 is the zero ablation of the OUTPUT hook: it recovers nothing
    zero = build(d_in=16, d_out=16).eval()
    with torch.no_grad():
        zero.W_dec.zero_()
    assert splice.splice_eval(lm, zero, IN, batches, hook_out=OUT)["scopes"]["all"]["ce_recovered_zero"] == \
        pytest.approx(0.0, abs=1e-6)
    # one under training sees (s x, t y): the monitor's scale pair equals splicing the folded one
    folded = copy.deepcopy(tc)
    folded.fold_activation_scale_(2.0, 4.0)
    monitor = splice.SpliceMonitor(lm, IN, batches, every=1, hook_out=OUT)
    assert monitor(tc, 1, scale=(2.0, 4.0))["splice/all/ce_sae"] == pytest.approx(
        splice.splice_eval(lm, folded, IN, batches, hook_out=OUT)["scopes"]["all"]["ce_sae"], rel=1e-5)


def test_attached_reads_the_input_and_refuses_a_transcoder_at_one_hook(lm, batches):
    tc = build(d_in=16, d_out=16).eval()
    tokens = batches[0].tokens
    with attached(lm, {(IN, OUT): tc}) as run:
        lm(tokens)
    acts = models.hook_activations(lm, tokens, [IN])[IN].reshape(-1, 16).clone()  # out of inference mode
    with torch.no_grad():
        assert torch.allclose(run.codes[OUT], tc.encode(acts), atol=1e-5)  # codes of the clean input rows
    with pytest.raises(ValueError, match="attached at a pair of hooks"):
        with attached(lm, {OUT: tc}):
            pass
