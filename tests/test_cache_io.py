"""The cache writer against the file system, through real processes: one writer per output
(a second `train.py cache` on the same --out is refused while the first finishes intact),
permissions that follow the umask, a full disk (a real tiny tmpfs) and read-only or forbidden
output folders: one line, exit 2, what was kept said, and a rerun resumes."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sae.lm import models
from sae.lm.cache import CacheConfig, write_cache
from sae.lm.scenes import N_CTX, TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
TINY = dict(d_model=16, d_head=4, n_layers=2, n_heads=4, d_mlp=32, d_vocab=len(TOKENIZER), n_ctx=N_CTX,
            act_fn="gelu", seed=0)
# the built-in scenes model, small enough to run in seconds; 40 sequences make ~300 KB in 200-row shards
CLI = ["--n-sequences", "40", "--batch-size", "8", "--shard-rows", "200", "--threads", "1"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def cache_cmd(out, *extra):
    return [sys.executable, "train.py", "cache", "--out", str(out), *CLI, *extra]


def error_line(r):
    """The one `error:` line a failed command printed last, with no traceback."""
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [l for l in lines if l.startswith("error:")] == lines[-1:], r.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The cache `train.py cache` writes with CLI's options, written once in-process."""
    out = tmp_path_factory.mktemp("ref") / "c"
    write_cache(CacheConfig(out=str(out), n_sequences=40, batch_size=8, shard_rows=200))
    return files(out)


# -----------------------------------------------------------------------------
# one writer per output

HELD = """
import pathlib, sys, time
import sae.lm.cache as c
real = c._write_shard
def held(path, tensors):  # after its first shard, wait until the test has run the second writer
    digest = real(path, tensors)
    pathlib.Path(sys.argv[2]).touch()
    while not pathlib.Path(sys.argv[3]).exists():
        time.sleep(0.05)
    return digest
c._write_shard = held
c.write_cache(c.CacheConfig(out=sys.argv[1], n_sequences=40, batch_size=8, shard_rows=200))
"""


@pytest.mark.parametrize("second", [[], ["--seed", "1"]], ids=["same-config", "other-config"])
def test_second_writer_is_refused_and_first_finishes_intact(tmp_path, reference, second):
    out, wrote, go = tmp_path / "c", tmp_path / "wrote-one", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HELD, str(out), str(wrote), str(go)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not wrote.exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline, "the first writer never wrote a shard"
            time.sleep(0.1)
        r = subprocess.run(cache_cmd(out, *second), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
        assert r.returncode == 2 and "cache written" not in r.stdout
        assert error_line(r) == (f"error: {out} is in use by another process writing an activation cache; "
                                 "wait for it to finish, or choose another --out")
    finally:
        go.touch()
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert files(out) == reference  # nothing of the second writer got in


# -----------------------------------------------------------------------------
# permissions follow the umask

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_permissions_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        out = write_cache(CacheConfig(out=str(tmp_path / "new" / "c"), hooks=[HOOK], n_sequences=40, batch_size=8,
                                      shard_rows=200), model=models.build_model(TINY))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(modes) > 2 and set(modes.values()) == {file_mode}, modes  # safetensors alone would give 0600
    assert {(p.stat().st_mode & 0o777) for p in (out, out.parent)} == {dir_mode}


def test_failed_run_leaves_no_folder_it_created(tmp_path):
    with pytest.raises(ValueError, match="unknown hook name"):
        write_cache(CacheConfig(out=str(tmp_path / "new" / "deeper" / "c"), hooks=["blocks.9.hook_resid_post"]))
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# a full disk and folders that cannot be written: real file systems in a private mount namespace

def unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_ok(), reason="this machine does not permit "
                                   "`unshare --mount --map-root-user` with a tmpfs mount (needed for a tiny disk)")


def in_namespace(script: str, tmp_path: Path):
    """Run a shell script in a private mount namespace, where it may mount tmpfs file systems."""
    r = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-ec", script], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    return {p.name: p.read_text() for p in tmp_path.glob("*.txt")}


@needs_unshare
def test_disk_full_keeps_finished_shards_and_a_rerun_resumes(tmp_path, reference):
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = " ".join(cache_cmd(disk / "c"))
    got = in_namespace(f"""
        mount -t tmpfs -o size=200k tmpfs {disk}
        {cmd} > {tmp_path}/out1.txt 2> {tmp_path}/err1.txt && echo 0 > {tmp_path}/rc1.txt || echo $? > {tmp_path}/rc1.txt
        ls -a {disk}/c > {tmp_path}/kept.txt
        stat -c %i {disk}/c/shard-00000.safetensors > {tmp_path}/inode1.txt
        mount -o remount,size=4m {disk}
        {cmd} > {tmp_path}/out2.txt 2> {tmp_path}/err2.txt && echo 0 > {tmp_path}/rc2.txt || echo $? > {tmp_path}/rc2.txt
        stat -c %i {disk}/c/shard-00000.safetensors > {tmp_path}/inode2.txt
        cp -r {disk}/c {tmp_path}/final
    """, tmp_path)
    first = subprocess.CompletedProcess([], int(got["rc1.txt"]), got["out1.txt"], got["err1.txt"])
    assert first.returncode == 2 and "cache written" not in first.stdout
    kept = [n for n in got["kept.txt"].split() if n.startswith("shard-")]
    rows = 200 * len(kept)
    assert len(kept) >= 1 and error_line(first) == (
        f"error: cannot write {disk}/c/shard-{len(kept):05d}.safetensors: disk full; "
        f"{len(kept)} finished shards ({rows} rows) are kept in {disk}/c: free space (or fix the cause) and rerun "
        "the same command to resume")
    assert "progress.json" in got["kept.txt"] and ".tmp" not in got["kept.txt"]  # no half-written file left
    assert got["rc2.txt"].strip() == "0", got["err2.txt"][-2000:]
    assert got["inode1.txt"] == got["inode2.txt"]  # the finished shards were kept, not rewritten
    assert files(tmp_path / "final") == reference  # and the resumed cache is the uninterrupted one


@needs_unshare
def test_read_only_file_system(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = " ".join(cache_cmd(ro / "sub" / "c"))
    got = in_namespace(f"""
        mount -t tmpfs -o size=1m tmpfs {ro}
        mount -o remount,ro {ro}
        {cmd} > {tmp_path}/out.txt 2> {tmp_path}/err.txt && echo 0 > {tmp_path}/rc.txt || echo $? > {tmp_path}/rc.txt
    """, tmp_path)
    r = subprocess.CompletedProcess([], int(got["rc.txt"]), got["out.txt"], got["err.txt"])
    assert r.returncode == 2 and error_line(r).lower() == f"error: cannot create {ro}/sub/c: read-only file system"


def as_other_user():
    """A command prefix that runs as a user without root's override of file permissions."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, sys.executable, "-c", "import sae"], cwd=ROOT,
                                                     capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot run Python as an unprivileged user (setpriv), "
                    "so a folder's permissions would not stop the writer")
    return prefix


def test_out_under_a_folder_without_write_permission():
    prefix = as_other_user()
    base = Path(tempfile.mkdtemp(prefix="sae-perm-"))  # pytest's tmp_path is private to its owner
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)  # the writer may enter, not write
        r = subprocess.run([*prefix, *cache_cmd(locked / "c")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 2 and error_line(r) == f"error: cannot create {locked}/c: permission denied"
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
