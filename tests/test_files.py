"""sae.core.files: the one write policy (atomic, never destroying, umask, one writer per folder)."""
import os
import subprocess
import sys
import textwrap

import pytest

from sae.core import files


def test_write_file_is_atomic_and_leaves_no_temporary_on_failure(tmp_path):
    target = tmp_path / "a.json"
    files.write_json(target, {"v": 1})

    def half_then_fail(tmp):
        tmp.write_text("{\"v\": 2, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(files.OutputError, match=r"cannot write .*a\.json: disk full"):
        files.write_file(target, half_then_fail)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_dir_lock_refuses_a_second_process_and_dies_with_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sae.core.files import DirLock
        DirLock({str(tmp_path / 'out')!r}, "a test").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(files.BusyError, match="in use by another process writing a test"):
        files.DirLock(tmp_path / "out", "a test").acquire()
    holder.kill()
    holder.wait()
    lock = files.DirLock(tmp_path / "out", "a test").acquire()
    with files.DirLock(tmp_path / "out", "a test"):  # re-entrant within one process
        pass
    lock.release()
    assert os.listdir(tmp_path / "out") == []  # no lock file left behind


def test_replacing_dir_refuses_before_writing_and_keeps_the_old_output_on_failure(tmp_path):
    ours = lambda p: (p / "mine.txt").exists()
    with files.replacing_dir(tmp_path / "o", "thing", ours) as tmp:
        (tmp / "mine.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with files.replacing_dir(tmp_path / "o", "thing", ours) as tmp:
            (tmp / "mine.txt").write_text("2")
            raise RuntimeError("crash while writing")
    assert (tmp_path / "o" / "mine.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the temporary is gone
