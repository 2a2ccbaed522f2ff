"""Scale-out under torchrun (gloo, 2 processes, tiny sizes): every mode against its single-process
equal, a job killed with SIGKILL resumes bit-identically, one rank killed stops the job with one
clear line and the run resumes from its last checkpoint, SIGTERM to one rank stops both at one
step. Each job is distributed_worker.py."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_trainer import sparse_data

from sae.lm.cache import write_tensors

HERE = Path(__file__).resolve().parent
TRAIN_PY = str(HERE.parent / "train.py")
# float32 sums in another order (the all-reduced gradient; partial decodes): measured <= 6e-7 on
# these runs' weights (|w| ~ 1), so 1e-5 leaves room while still catching a wrong step (~1e-3).
TOLERANCE = 1e-5
LONG = ["steps=160", "checkpoint_every=20"]  # long enough to be killed part-way

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                                reason="torchrun is not installed")


def torchrun(*args, wait=True, **kw):
    torchrun_bin = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun_bin, "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    if not wait:
        return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=240, check=False, **kw)


def worker(mode, kind, out, run_dir="", *extra, wait=True):
    return torchrun("distributed_worker.py", mode, kind, str(out), str(run_dir), *extra, wait=wait)


def weights(out: Path) -> dict[str, dict]:
    return {f.name.split(".rank")[0] + f".r{f.name.split('.rank')[1][0]}": load_file(str(f))
            for f in sorted(out.glob("*.safetensors"))}


def aux_of(path: Path) -> float:
    with safe_open(str(path), "pt") as f:
        return float(f.metadata()["aux"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process runs every mode is compared with (in this process)."""
    root = tmp_path_factory.mktemp("single")
    for kind in ("tk", "all"):
        distributed_worker.main("single", kind, str(root / kind))
    return root


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("mode,kind", [("data", "tk"), ("data", "all"), ("latents", "tk")])
def test_each_mode_equals_one_process(tmp_path, single, mode, kind):
    result = worker(mode, kind, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = weights(single / kind)
    got = weights(tmp_path)
    for name in {k.split(".r")[0] for k in alone}:
        r0, r1 = got[f"{name}.r0"], got[f"{name}.r1"]
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{name}: the ranks' dictionaries differ"
        assert max_difference(alone[f"{name}.r0"], r0) <= TOLERANCE, name
    if mode == "latents":  # each rank held 1/R of every latent-indexed parameter (and so of its Adam state)
        for name, model in distributed_worker.models(kind).items():
            whole = {k: p.numel() for k, p in model.named_parameters()}
            replicated = sum(n for k, n in whole.items() if k in ("b_dec", "transform_param"))
            with safe_open(str(tmp_path / f"{name}.rank0.safetensors"), "pt") as f:
                held = int(f.metadata()["held"])
            assert held - replicated == (sum(whole.values()) - replicated) // 2, name
    if kind == "tk":  # AuxK took part (latents died: dead_tokens is one batch)
        assert all(aux_of(tmp_path / f"{name}.rank0.safetensors") > 0 for name in ("topk", "bt", "bind"))


def test_a_set_dealt_out_to_the_ranks_is_bit_identical_and_each_rank_trains_its_share(tmp_path, single):
    result = worker("sets", "tk", tmp_path, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    got, alone = weights(tmp_path), weights(single / "tk")
    names = [key.split(".r")[0] for key in got]
    assert sorted(names) == ["bind", "bt", "topk"]  # each dictionary trained once, on one rank
    assert {key.split(".r")[1] for key in got} == {"0", "1"}  # and both ranks got a share
    for key, w in got.items():
        name = key.split(".r")[0]
        assert all(torch.equal(w[k], alone[f"{name}.r0"][k]) for k in w), name
        rank = key.split(".r")[1]
        assert (tmp_path / "run" / f"rank{rank}" / name / "sae" / "cfg.json").is_file()


def wait_for(path: Path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted data-parallel run with checkpoints: what killed runs must end equal to."""
    root = tmp_path_factory.mktemp("straight")
    result = worker("data", "one", root / "out", root / "run", *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def same_as_straight(straight: Path, out: Path, run: Path):
    a, b = weights(straight / "out"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    assert (straight / "run" / "log.jsonl").read_text().count("\n") == (run / "log.jsonl").read_text().count("\n")
    line = lambda p: [l.split('"loss": ')[1].split(",")[0] for l in p.read_text().splitlines()]
    assert line(straight / "run" / "log.jsonl") == line(run / "log.jsonl")


def test_the_job_killed_with_sigkill_resumes_bit_identically(tmp_path, straight):
    proc = worker("data", "one", tmp_path / "out", tmp_path / "run", *LONG, wait=False)
    wait_for(tmp_path / "run" / "checkpoints" / "step_000000040" / "trainer.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "dict.rank0.safetensors").exists()  # it was stopped part-way
    result = worker("data", "one", tmp_path / "out", tmp_path / "run", *LONG, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    same_as_straight(straight, tmp_path / "out", tmp_path / "run")


def test_one_rank_killed_stops_the_job_with_one_line_and_the_run_resumes(tmp_path, straight):
    proc = worker("data", "one", tmp_path / "out", tmp_path / "run", *LONG, wait=False)
    wait_for(tmp_path / "run" / "checkpoints" / "step_000000040" / "trainer.json", proc)
    os.kill(int((tmp_path / "out" / "pid.rank1").read_text()), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if "lost a peer" in line]
    assert lines and "rank 0 of 2 lost a peer at step" in lines[0] and "rerun the same command with --resume" in lines[0]
    result = worker("data", "one", tmp_path / "out", tmp_path / "run", *LONG, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    same_as_straight(straight, tmp_path / "out", tmp_path / "run")


def test_the_command_line_under_torchrun(tmp_path):
    cache = tmp_path / "cache"
    write_tensors(cache, {"blocks.0.hook_resid_post": sparse_data(n=1024)}, shard_rows=400)
    common = ["--data", str(cache), "--n-latents", "32", "--k", "3", "--steps", "6", "--log-every", "3",
              "--eval-tokens", "128"]
    ok = torchrun(TRAIN_PY, *common, "--batch-size", "64", "--run-dir", str(tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "run" / "sae" / "cfg.json").is_file() and ok.stdout.count("dictionary saved to") == 1
    bad = torchrun(TRAIN_PY, *common, "--batch-size", "63", "--run-dir", str(tmp_path / "bad"))
    assert bad.returncode != 0
    assert "error: --batch-size must be a multiple of the 2 ranks, got 63" in bad.stderr


def test_latent_shards_checkpoint_whole_dictionaries_and_resume_after_a_rank_dies(tmp_path, single):
    run = tmp_path / "run"
    first = worker("latents", "tk", tmp_path / "a", run, "checkpoint_every=8", "die_at=13")
    assert first.returncode != 0
    assert "rank 0 of 2 lost a peer at step 13" in first.stderr and "checkpoint at step 8" in first.stderr
    again = worker("latents", "tk", tmp_path / "b", run, "checkpoint_every=8", "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    alone, got = weights(single / "tk"), weights(tmp_path / "b")
    for name in ("topk", "bt", "bind"):
        assert max_difference(alone[f"{name}.r0"], got[f"{name}.r0"]) <= TOLERANCE, name
    # The checkpoint holds whole dictionaries (n = 64 rows), not a shard's.
    with safe_open(str(run / "checkpoints" / "step_000000024" / "tensors.safetensors"), "pt") as f:
        assert f.get_slice("topk/model.W_dec").get_shape() == [64, 16]


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, straight):
    proc = worker("data", "one", tmp_path / "out", tmp_path / "run", *LONG, wait=False)
    wait_for(tmp_path / "run" / "checkpoints" / "step_000000040" / "trainer.json", proc)
    os.kill(int((tmp_path / "out" / "pid.rank1").read_text()), signal.SIGTERM)  # a pre-emption reaching one rank
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if "TrainingStopped: stopped by SIGTERM" in line]
    assert len(lines) == 2 and len({line.split("TrainingStopped: ")[1] for line in lines}) == 1  # both, one step
    step = int(stderr.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:09d}" / "trainer.json").is_file()
    result = worker("data", "one", tmp_path / "out", tmp_path / "run", *LONG, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    same_as_straight(straight, tmp_path / "out", tmp_path / "run")


def test_the_resume_hint_names_the_launcher(monkeypatch):
    # A run stopped by a signal says how to continue it: under torchrun that is torchrun, not python.
    spec = importlib.util.spec_from_file_location("train_cli", TRAIN_PY)
    train_cli = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_cli", train_cli)  # dataclasses look their module up there
    spec.loader.exec_module(train_cli)
    argv = ["--data", "my cache", "--resume", "--steps", "9"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_cli.resume_command(argv) == "python train.py --data 'my cache' --steps 9 --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train_cli.resume_command(argv) == ("torchrun --standalone --nproc_per_node=2 train.py --data 'my cache' "
                                              "--steps 9 --resume")
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes of two: each node reruns its own launcher
    assert "every node" in train_cli.resume_command(argv)
