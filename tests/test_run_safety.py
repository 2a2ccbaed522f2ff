"""Training runs meet real processes and signals: pre-emption, a second writer, a kill before the
first checkpoint, bad data, a full disk. Every case runs in a subprocess, as a scheduler would."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.lm.cache import write_tensors

TESTS = os.path.dirname(__file__)
TRAIN_PY = str(Path(TESTS).resolve().parents[0] / "train.py")

# A run that can signal or kill itself at an exact step (a callback runs after every step).
SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch, sae
    sys.path.insert(0, {tests!r})
    from test_trainer import sparse_data
    run_dir, at, action, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    torch.manual_seed(0)
    model = sae.TopKSAE(16, 64, k=3, dead_tokens=300)

    def act(step, logs):
        if step == at:
            for sig in {{"term": [signal.SIGTERM], "int": [signal.SIGINT], "term2": [signal.SIGTERM] * 2,
                        "kill": [signal.SIGKILL], "sleep": []}}[action]:
                os.kill(os.getpid(), sig)
            if action == "sleep":
                import time; time.sleep(60)

    sae.train(model, sparse_data(), steps=40, batch_size=128, lr=3e-3, run_dir=run_dir, checkpoint_every=10,
              log_every=3, resume=resume, callback=act)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(SCRIPT.format(tests=TESTS))
    return path


def run(script, run_dir, at=-1, action="sleep", resume=False, **kw):
    return subprocess.run([sys.executable, str(script), str(run_dir), str(at), action, "1" if resume else "0"],
                          capture_output=True, text=True, timeout=300, **kw)


def assert_same_dictionary(a: Path, b: Path):
    wa, wb = load_file(str(a / "sae" / "sae_weights.safetensors")), load_file(str(b / "sae" / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]
    assert losses(a) == losses(b)


@pytest.mark.parametrize("action,signum", [("term", signal.SIGTERM), ("int", signal.SIGINT)])
def test_a_signal_checkpoints_the_current_step_and_resume_is_bit_identical(tmp_path, script, action, signum):
    straight = run(script, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    stopped = run(script, tmp_path / "stopped", at=17, action=action)
    assert stopped.returncode != 0
    assert f"stopped by {signal.Signals(signum).name} at step 17" in stopped.stderr
    assert (tmp_path / "stopped" / "checkpoints" / "step_000000017" / "trainer.json").is_file()
    assert not (tmp_path / "stopped" / "sae").exists()
    resumed = run(script, tmp_path / "stopped", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_dictionary(tmp_path / "straight", tmp_path / "stopped")


def test_a_second_signal_exits_at_once(tmp_path, script):
    result = run(script, tmp_path / "r", at=17, action="term2")
    assert result.returncode == -signal.SIGTERM  # killed by the signal itself, not a clean exit
    assert not (tmp_path / "r" / "checkpoints" / "step_000000017").exists()


def test_the_command_line_says_how_to_resume_after_sigterm(tmp_path):
    data = tmp_path / "data"
    write_tensors(data, torch.randn(4096, 16))
    args = [sys.executable, TRAIN_PY, "--data", str(data), "--n-latents", "64", "--k", "4", "--steps", "100000",
            "--batch-size", "64", "--run-dir", str(tmp_path / "r")]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    last = err.strip().splitlines()[-1]
    assert last.startswith("SIGTERM at step ") and last.endswith("--resume") and "Traceback" not in err
    step = int(last.split()[3].rstrip(":"))
    assert (tmp_path / "r" / "checkpoints" / f"step_{step:09d}" / "trainer.json").is_file()


def test_a_second_process_is_refused_and_a_sigkilled_run_resumes(tmp_path, script):
    first = subprocess.Popen([sys.executable, str(script), str(tmp_path / "r"), "12", "sleep", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "checkpoints" / "step_000000010" / "trainer.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    write_tensors(tmp_path / "data", torch.randn(1024, 16))
    second = subprocess.run([sys.executable, TRAIN_PY, "--data", str(tmp_path / "data"), "--run-dir",
                             str(tmp_path / "r"), "--resume"], cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [f"error: {tmp_path / 'r'} is in use by another process writing "
                                                  "a training run; wait for it to finish or choose another run_dir"]
    assert first.poll() is None, "the first run must still be training"
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = run(script, tmp_path / "r", resume=True)  # the lock died with the process
    assert resumed.returncode == 0, resumed.stderr
    assert run(script, tmp_path / "straight").returncode == 0
    assert_same_dictionary(tmp_path / "straight", tmp_path / "r")


@pytest.mark.parametrize("resume", [True, False])
def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path, script, resume):
    killed = run(script, tmp_path / "r", at=3, action="kill")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "checkpoints").exists()
    again = run(script, tmp_path / "r", resume=resume)
    assert again.returncode == 0, again.stderr
    assert "starting the run afresh" in again.stderr
    assert run(script, tmp_path / "straight").returncode == 0
    assert_same_dictionary(tmp_path / "straight", tmp_path / "r")


def test_a_run_aborted_by_bad_data_can_be_rerun_and_resumed(tmp_path):
    from test_trainer import sparse_data

    bad = sparse_data(n=2048)
    bad[1500] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sae.train(sae.TopKSAE(16, 64, k=3), bad, steps=40, batch_size=128, run_dir=str(tmp_path / "r"))
    assert (tmp_path / "r" / "config.json").exists()
    for resume in (False, True):  # both the plain rerun and --resume are accepted
        result = sae.train(sae.TopKSAE(16, 64, k=3), sparse_data(n=2048), steps=5, batch_size=128,
                           run_dir=str(tmp_path / "r"), resume=resume)
        assert result.metrics["steps"] == 5


def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a tiny private filesystem")
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()}")
    write_tensors(tmp_path / "data", torch.randn(2048, 64))
    small = tmp_path / "small"
    small.mkdir()
    # One checkpoint of a 64 x 512 TopK (weights + Adam state) is ~790 KB: the second does not fit.
    command = (f"mount -t tmpfs -o size=1200k tmpfs {small} && cd {tmp_path} && {sys.executable} {TRAIN_PY} "
               f"--data {tmp_path / 'data'} --k 8 --steps 20 --batch-size 64 --checkpoint-every 5 "
               f"--keep-checkpoints 5 --run-dir {small / 'r'}; echo rc=$?; cp -r {small / 'r'} {tmp_path / 'kept'}")
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", command],
                            capture_output=True, text=True, timeout=300)
    assert "rc=2" in result.stdout, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("error: cannot write") and "disk full" in last and "step 5 is kept" in last, last
    resumed = subprocess.run([sys.executable, TRAIN_PY, "--data", str(tmp_path / "data"), "--k", "8", "--steps", "20",
                              "--batch-size", "64", "--checkpoint-every", "5", "--keep-checkpoints", "5",
                              "--run-dir", str(tmp_path / "kept"), "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


@pytest.fixture
def shared_tmp():
    """A folder an unprivileged user can reach (pytest's tmp_path sits under a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="sae-perm-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_permission_errors_are_one_line(shared_tmp):
    """As root every folder is writable, so the run drops to an unprivileged user where it can."""
    as_user = []
    if os.geteuid() == 0:
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if shutil.which("setpriv") is None or subprocess.run([*as_user, sys.executable, "-c", "import torch, sae"],
                                                             cwd=shared_tmp, capture_output=True).returncode:
            pytest.skip("running as root and cannot run Python as an unprivileged user (its packages are "
                        "private to root); test_a_read_only_folder_is_one_line covers the write side")
    write_tensors(shared_tmp / "data", torch.randn(512, 16))
    for p in [shared_tmp / "data", *(shared_tmp / "data").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    locked = shared_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)

    def train(data, run_dir):
        result = subprocess.run([*as_user, sys.executable, TRAIN_PY, "--data", str(data), "--steps", "5",
                                 "--batch-size", "64", "--run-dir", str(run_dir)],
                                cwd=shared_tmp, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        return result.stderr.strip().splitlines()[-1]

    assert train(shared_tmp / "data", locked / "r") == f"error: cannot create {locked / 'r'}: permission denied"
    (shared_tmp / "data" / "manifest.json").chmod(0o600)  # a cache the user may not read
    assert train(shared_tmp / "data", shared_tmp / "r") == f"error: {shared_tmp / 'data' / 'manifest.json'}: permission denied"


def test_a_read_only_folder_is_one_line(tmp_path):
    """Root ignores permissions but not a read-only file system: mount one in a private namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a private read-only filesystem")
    write_tensors(tmp_path / "data", torch.randn(512, 16))
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    command = (f"mount -t tmpfs -o ro,size=64k tmpfs {frozen} && {sys.executable} {TRAIN_PY} --data "
               f"{tmp_path / 'data'} --steps 5 --batch-size 64 --run-dir {frozen / 'r'}; echo rc=$?")
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", command], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    if "rc=" not in result.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()[:200]}")
    assert "rc=2" in result.stdout and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot create {frozen / 'r'}: read-only file system"
