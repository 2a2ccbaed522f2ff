"""A training run's folder: what it holds, who may write it, and how a run continues.

    runs/x/
      config.json     the run record: training options, architecture, model options, data identity
      log.jsonl       one JSON line per log step
      checkpoints/    step_000000500/ (tensors.safetensors + trainer.json), the last few kept
      metrics.json    end-of-run metrics
      sae/            the trained dictionary (sae.core.io layout)
      phases/         the binding recipe's phases, each a run folder of its own

A folder is accepted as a run folder when it is new, empty, or an earlier run (its config.json is a
run record, or it holds only a recipe's phases); anything else, such as `--run-dir .` in a source
tree, is refused before anything is written. While a process trains in it the folder is locked
(sae.core.files.DirLock), so a second process is refused at once and a killed one never blocks resume.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from sae.core import files, io
from sae.core.config import OptionError

# Options that may differ between a run and its resumption: they do not change the numbers.
RESUMABLE_DIFFERENCES = {"resume", "run_dir", "checkpoint_every", "keep_checkpoints", "log_every",
                         "eval_tokens", "wandb", "wandb_project", "device", "splice_every", "splice_sequences"}
RECORD_KEYS = ("train", "architecture", "model", "data")


def is_run(path: Path) -> bool:
    """An earlier run this library wrote (a folder it may write into again): one dictionary's, a
    set's, or a binding recipe's that has only reached its phases."""
    try:
        record = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return (path / "phases").is_dir() and files.only_files(path, ("phases",))
    if not isinstance(record, dict) or "train" not in record:
        return False
    return "members" in record or all(k in record for k in RECORD_KEYS)


def describe_data(data, hook: str) -> dict:
    """Enough to tell whether a resumed run reads the same data."""
    if hasattr(data, "describe"):  # a model stream
        return {**data.describe(), "hook": hook}
    if isinstance(data, dict):  # in-memory tensors by hook (a transcoder's input and target)
        return {"hook": hook, **describe_data(data[hook], hook)}
    if torch.is_tensor(data):
        digest = hashlib.sha256(data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        return {"tensor": list(data.shape), "dtype": str(data.dtype), "sha256": digest}
    path = Path(data)
    manifest = path / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {"cache": str(path.resolve()), "hook": hook, "manifest_sha256": digest}


class RunDir:
    """One run folder, locked from `open` to `close`. `dictionaries` are the folders its
    dictionaries are written to (the run folder itself, or one sub-folder per member of a set)."""

    def __init__(self, path: str | Path, dictionaries: list[Path] | None = None):
        self.path = Path(path)
        self.dictionaries = dictionaries or [self.path]
        self.lock = files.DirLock(self.path, "a training run", hint=" or choose another run_dir")

    # ---- opening -----------------------------------------------------------------------------
    def open(self, record: dict, resume: bool) -> Path | None:
        """Lock the folder and get it ready: returns the checkpoint to resume from, or None after
        writing a fresh run record. Refuses (OutputError/OptionError) before writing anything."""
        files.check_output_dir(self.path, "training run", is_run)
        self.lock.acquire()
        try:
            return self._prepare(record, resume)
        except BaseException:
            self.close()
            raise

    def _prepare(self, record: dict, resume: bool) -> Path | None:
        state = files.check_output_dir(self.path, "training run", is_run)  # again, now that we hold it
        for folder in self.dictionaries:
            files.check_output_dir(folder / "sae", "dictionary", io.is_dictionary)
        checkpoint = self.latest_checkpoint() if state == "previous" else None
        if checkpoint is not None:
            if not resume:
                raise OptionError("run_dir", f"{self.path} holds a run with a checkpoint at step "
                                  f"{checkpoint_step(checkpoint)}: continue it with {{resume}} or choose another "
                                  "folder", resume="resume")
            self.check_same_run(record)
            return checkpoint
        if resume or (self.path / "config.json").exists():
            print(f"{self.path}: no checkpoint to resume from; starting the run afresh", file=sys.stderr)
        for folder in self.dictionaries:
            files.make_dirs(folder)
            (folder / "log.jsonl").unlink(missing_ok=True)  # lines of a run that never reached a checkpoint
        io.write_json(self.path / "config.json", record)
        return None

    def close(self):
        self.lock.release()

    def check_same_run(self, record: dict):
        saved = io.read_json(self.path / "config.json")
        if "members" in saved or "members" in record:
            old, new = saved.get("members", {}), record.get("members", {})
            differences = ["dictionaries"] if set(old) != set(new) else [name for name in new if old[name] != new[name]]
        else:
            differences = [section for section in ("architecture", "model", "data") if saved.get(section) != record[section]]
        for key, value in record["train"].items():
            if key not in RESUMABLE_DIFFERENCES and saved.get("train", {}).get(key) != value:
                differences.append(f"{key} ({saved.get('train', {}).get(key)!r} -> {value!r})")
        if differences:
            raise ValueError(f"cannot resume {self.path}: its checkpoint is from another config "
                             f"(differs in {', '.join(differences)})")

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        complete = sorted(p for p in self.checkpoints.glob("step_*") if (p / "trainer.json").is_file())
        return complete[-1] if complete else None

    def save_checkpoint(self, step: int, parts: dict, saved: dict, extras: dict, keep: int):
        """One checkpoint for every dictionary of the run: `parts` is prefix -> (model, optimizer)."""
        target = self.checkpoints / f"step_{step:09d}"
        try:
            files.make_dirs(self.checkpoints)
            io.save_checkpoint(target, parts, saved, extras)
        except files.OutputError as e:
            last = self.latest_checkpoint()
            kept = f"the checkpoint at step {checkpoint_step(last)} is kept" if last else "no checkpoint was kept"
            raise files.OutputError(f"{e}; {kept} in {self.path}: free space and continue with --resume") from None
        finished = sorted(self.checkpoints.glob("step_*"))
        for old in finished[: max(len(finished) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- log ---------------------------------------------------------------------------------
    @staticmethod
    def append_log(path: Path, line: dict):
        try:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            raise files.OutputError(f"cannot write {path}: {files.describe_os_error(e)}") from None

    @staticmethod
    def truncate_log(path: Path, step: int):
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by the kill
        files.write_text(path, "".join(line + "\n" for line in kept))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])
