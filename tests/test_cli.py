"""train.py from the command line: every option listed, bad input refused in one line, resumable."""
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.core.architectures.base import SAE
from sae.lm.cache import CacheConfig, write_tensors
from test_trainer import sparse_data

TRAIN_PY = str(Path(__file__).resolve().parents[1] / "train.py")


def run(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, TRAIN_PY, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def flag(name):
    return "--" + name.replace("_", "-")


def test_help_lists_every_option(tmp_path):
    help_text = run("--help", cwd=tmp_path).stdout
    for f in dataclasses.fields(sae.TrainConfig):
        assert flag(f.name) in help_text, f.name
    for cls in SAE.registry.values():
        for rule in cls.rules:  # every option of every architecture under each of its sparsity rules
            for name in cls.options(rule):
                assert flag(name) in help_text, f"{cls.__name__}({rule}).{name}"
    for arch in SAE.registry:
        assert arch in help_text
    cache_help = run("cache", "--help", cwd=tmp_path).stdout
    for f in dataclasses.fields(CacheConfig):
        assert flag(f.name) in cache_help, f.name


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c"
    write_tensors(path, sparse_data(n=2048), hook="blocks.0.hook_resid_post", shard_rows=700)
    return path


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--k", "0"], "--k must be an integer in [1, 128]"),
    (["--expansion-factor", "0"], "--expansion-factor must be a positive integer"),
    (["--arch", "relu", "--k", "4"], "--k does not apply to --arch relu"),
    (["--arch", "topk", "--l1-coeff", "4"], "--l1-coeff does not apply to --arch topk"),
    (["--arch", "binding", "--sparsity", "relu", "--k", "4"], "--k does not apply to --arch binding"),
    (["--arch", "binding", "--sparsity", "gated"], "--sparsity must be one of topk, topk_per_slot"),
    (["--arch", "topk", "--sparsity", "relu"], "--sparsity does not apply to --arch topk"),
    (["--arch", "binding", "--slot-transform", "rotate"], "--slot-transform must be one of"),
    (["--b-dec-init", "median"], "--b-dec-init must be one of"),
    (["--hook", "blocks.9.hook_resid_post"], "blocks.9.hook_resid_post"),
])
def test_bad_options_fail_in_one_line_without_writing_a_run(tmp_path, cache_dir, args, message):
    result = run("--data", str(cache_dir), "--run-dir", str(tmp_path / "r"), *args, cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr
    assert not (tmp_path / "r" / "sae").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, cache_dir):
    result = run("--data", str(cache_dir), "--device", "cuda", "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda: torch sees no CUDA GPU")


def test_run_dir_dot_in_a_copy_of_the_repo_touches_nothing(tmp_path, cache_dir):
    repo = Path(TRAIN_PY).parent
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git", "runs", "cache", "__pycache__", "*.egg-info"))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, "train.py", "--data", str(cache_dir), "--run-dir", "."], cwd=copy,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: . holds files that are not a training run")
    after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert after == before


def test_metrics_say_how_many_rows_they_were_computed_on(tmp_path, cache_dir):
    result = run("--data", str(cache_dir), "--n-latents", "32", "--k", "3", "--steps", "5", "--batch-size", "64",
                 "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["tokens"] <= metrics["data_rows"] == 2048  # a small cache is not cycled to look larger
    assert f"over {metrics['tokens']} activations of the 2048 in the data" in result.stdout


def test_unknown_architecture_is_an_argument_error(tmp_path):
    result = run("--arch", "gated", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'gated'" in result.stderr


def test_missing_or_corrupt_cache_fails_in_one_line(tmp_path, cache_dir):
    result = run("--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in cache_dir.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = run("--data", str(broken), "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2
    assert shard.name in result.stderr.strip().splitlines()[-1]


def test_cli_training_killed_and_resumed_ends_bit_identical(tmp_path, cache_dir):
    common = ["--data", str(cache_dir), "--arch", "batchtopk", "--k", "3", "--n-latents", "64", "--steps", "400",
              "--batch-size", "64", "--checkpoint-every", "20", "--log-every", "10", "--seed", "3"]
    straight = run(*common, "--run-dir", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert "dictionary saved to" in straight.stdout and "fvu" in straight.stdout

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, TRAIN_PY, *common, "--run-dir", str(killed_dir)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((killed_dir / "checkpoints").glob("step_*/trainer.json")) and time.time() < deadline:
        time.sleep(0.01)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert running, "the run finished before it could be killed"
    assert not (killed_dir / "sae").exists()
    resumed = run(*common, "--run-dir", str(killed_dir), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(str(tmp_path / "straight" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(killed_dir / "sae" / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = lambda d: json.loads((d / "metrics.json").read_text())
    assert metrics(tmp_path / "straight") == metrics(killed_dir)

    other = run(*common[:-2], "--seed", "4", "--run-dir", str(killed_dir), "--resume", cwd=tmp_path)
    assert other.returncode == 2 and "another config (differs in seed (3 -> 4))" in other.stderr
