"""Many dictionaries from one pass over the data: each is bit-identical to training it alone, the
set resumes after SIGKILL as one run, and the command line builds sets from hook patterns and
option lists."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.lm.cache import write_tensors
from test_trainer import sparse_data

TRAIN_PY = str(Path(__file__).resolve().parents[1] / "train.py")
OPTIONS = dict(steps=40, batch_size=128, lr=3e-3, checkpoint_every=10, log_every=5)


def weights(folder: Path) -> dict:
    return load_file(str(folder / "sae" / "sae_weights.safetensors"))


def same_run(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(a) == losses(b)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma == mb


def models():
    torch.manual_seed(0)
    made = {"k3": sae.TopKSAE(16, 64, k=3), "k6": sae.TopKSAE(16, 64, k=6)}
    made["relu"] = sae.ReLUSAE(16, 64)
    made["bt"] = sae.BatchTopKSAE(16, 48, k=4)
    return made


def test_each_dictionary_of_a_set_is_bit_identical_to_training_it_alone(tmp_path):
    data = sparse_data(n=2048)
    together = sae.train_many(models(), data, run_dir=str(tmp_path / "set"), **OPTIONS)
    assert sorted(together) == ["bt", "k3", "k6", "relu"]
    for name, model in models().items():  # the same initial weights, trained alone
        alone = sae.train(model, data, run_dir=str(tmp_path / name), **OPTIONS)
        same_run(tmp_path / "set" / name, tmp_path / name)
        assert together[name].metrics == alone.metrics
    assert sorted(p.name for p in (tmp_path / "set" / "checkpoints").iterdir()) == ["step_000000030", "step_000000040"]


def test_members_on_different_hooks_read_the_same_rows(tmp_path):
    a, b = sparse_data(n=2048, seed=1), sparse_data(n=2048, seed=2)
    write_tensors(tmp_path / "cache", {"blocks.0.hook_resid_post": a, "blocks.1.hook_resid_post": b}, shard_rows=300)
    torch.manual_seed(0)
    pair = {"L0": sae.TopKSAE(16, 64, k=3), "L1": sae.TopKSAE(16, 64, k=3)}
    start = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in pair.items()}
    sae.train_many(pair, str(tmp_path / "cache"), run_dir=str(tmp_path / "set"),
                   hooks={"L0": "blocks.0.hook_resid_post", "L1": "blocks.1.hook_resid_post"}, **OPTIONS)
    for name, layer in (("L0", 0), ("L1", 1)):
        alone = sae.TopKSAE(16, 64, k=3)
        alone.load_state_dict(start[name])
        sae.train(alone, str(tmp_path / "cache"), hook=f"blocks.{layer}.hook_resid_post",
                  run_dir=str(tmp_path / name), **OPTIONS)
        same_run(tmp_path / "set" / name, tmp_path / name)


SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch, sae
    sys.path.insert(0, {tests!r})
    from test_trainer import sparse_data
    from test_train_many import OPTIONS, models
    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

    def die(step, logs):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sae.train_many(models(), sparse_data(n=2048), run_dir=run_dir, resume=resume, callback=die, **OPTIONS)
""")


def test_a_set_killed_mid_run_resumes_bit_identically(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    run = lambda d, at, resume: subprocess.run([sys.executable, str(script), str(d), str(at), resume],  # noqa: E731
                                               capture_output=True, text=True, timeout=300)
    assert run(tmp_path / "straight", -1, "0").returncode == 0
    assert run(tmp_path / "killed", 17, "0").returncode == -signal.SIGKILL
    resumed = run(tmp_path / "killed", -1, "1")
    assert resumed.returncode == 0, resumed.stderr
    for name in models():
        same_run(tmp_path / "straight" / name, tmp_path / "killed" / name)


def test_a_set_refuses_what_cannot_train_in_step(tmp_path):
    with pytest.raises(ValueError, match="binding recipe trains in phases"):
        sae.train_many({"b": sae.BindingSAE(16, 32, k=3)}, sparse_data(n=512), steps=5, batch_size=64)
    with pytest.raises(ValueError, match="plain folder names"):
        sae.train_many({"a/b": sae.TopKSAE(16, 32, k=3)}, sparse_data(n=512), steps=5, batch_size=64)


def cli(*args, cwd):
    return subprocess.run([sys.executable, TRAIN_PY, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def layered_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("layers") / "cache"
    write_tensors(path, {f"blocks.{l}.hook_resid_post": sparse_data(n=1024, seed=l) for l in range(3)}
                  | {"blocks.0.hook_mlp_out": sparse_data(n=1024, seed=9)}, shard_rows=400)
    return path


def test_the_command_line_sweeps_hook_patterns_and_option_lists(tmp_path, layered_cache):
    result = cli("--data", str(layered_cache), "--hook", "blocks.*.hook_resid_post", "--k", "2", "4",
                 "--n-latents", "32", "--steps", "6", "--batch-size", "64", "--log-every", "3",
                 "--run-dir", str(tmp_path / "sweep"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "sae").is_dir())
    assert names == [f"blocks.{l}.hook_resid_post-k{k}" for l in range(3) for k in (2, 4)]
    cfg = json.loads((tmp_path / "sweep" / "blocks.2.hook_resid_post-k4" / "sae" / "cfg.json").read_text())
    assert cfg["k"] == 4 and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert "blocks.1.hook_resid_post-k2 fvu" in result.stderr  # every dictionary shows in the progress lines


@pytest.mark.parametrize("args,message", [
    (["--hook", "blocks.*.hook_attn_out"], "--hook blocks.*.hook_attn_out matches no hook of"),
    (["--k", "4", "4"], "--k lists 4 twice"),
    (["--arch", "topk", "relu", "--l1-coeff", "2"], None),  # valid: l1_coeff applies to relu only
    (["--arch", "topk", "jumprelu", "--l1-coeff", "2"], "--l1-coeff applies to none of --arch topk jumprelu"),
    (["--arch", "binding", "topk"], "binding recipe trains in phases"),
    (["--n-latents", "0", "64", "--expansion-factor", "4"], "the options make n0 and n64 the same dictionary"),
])
def test_bad_sets_are_one_line(tmp_path, layered_cache, args, message):
    result = cli("--data", str(layered_cache), "--hook", "blocks.0.hook_resid_post", "--n-latents", "32",
                 "--steps", "4", "--batch-size", "64", "--run-dir", str(tmp_path / "r"), *args, cwd=tmp_path)
    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
