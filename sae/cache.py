"""Activation cache writer: run a transformer-lens model over tokens and store hook activations.

    cfg = CacheConfig(model="scenes", hooks=["blocks.1.hook_resid_post"], out="cache/scenes")
    path = write_cache(cfg)                       # python train.py cache --model scenes ...
    store = sae.store.make_store(path, batch_size=4096)        # read it back (sae/store.py)

Token sources (`source`): "generator" (the built-in scenes generator, sae.scenes.generate_tokens),
a .txt file (one document per non-empty line) or .jsonl file (one JSON object per line, text in
`text_field`), tokenised with the model's tokenizer (BOS prepended to each document; a document
longer than seq_len is cut, unless `pack` runs documents on), or pre-tokenised integer arrays
(n_sequences, seq_len) in .npy or .safetensors. Every token position becomes one row, except BOS
positions (drop_bos; also the other special tokens a tokenizer lists in `drop_token_ids`, e.g.
BERT's [SEP]), the padding added to short documents, PAD tokens of the built-in model, and
positions not listed in `positions` when it is given.

Output, in `out`: shard-00000.safetensors, ... each with one (rows, d_in) tensor per hook and the
per-row columns token_ids, seq_index (index of the sequence in the source) and position, so rows
map back to tokens; then manifest.json, written last: a directory without it is not a cache.

Atomic and resumable. Shard i always holds global rows [i * shard_rows, (i + 1) * shard_rows) of
the same deterministic row stream. A shard is written as *.tmp, fsynced and renamed, then
progress.json (also written atomically) records it together with where to pick up: the batch it
ended in and that batch's first row. Rerunning the same config after an interruption (Ctrl-C,
SIGKILL, a crash) re-runs the model from that batch, skips the rows already stored and carries
on; batches keep the same composition, so the finished cache is byte-identical to an
uninterrupted one. A directory holding a cache of a different config, model weights or source
file is refused before anything in it is touched.
"""

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from .store import COLUMNS, DTYPES, FORMAT, MANIFEST, VERSION, CacheError, nonfinite_rows, sha256_file

PROGRESS = "progress.json"
SHARD = "shard-{:05d}.safetensors"
SHARD_BYTES = 256 << 20  # target shard size when shard_rows is 0


@dataclass
class CacheConfig:
    out: str = field(default="cache/scenes", metadata={"help": "output directory (created; resumed if it holds an unfinished cache of the same config)"})
    model: str = field(default="scenes", metadata={"help": "transformer-lens model id; 'scenes' is the built-in toy model, others must be in the local HF cache"})
    # the scenes model's bottleneck: queries see the scene only through this residual (sae/scenes_model.py)
    hooks: list[str] = field(default_factory=lambda: ["blocks.1.hook_resid_post"], metadata={"help": "hook points to cache, e.g. blocks.1.hook_resid_post (several share one set of shards)"})
    source: str = field(default="generator", metadata={"help": "'generator' (built-in scenes), or a .txt / .jsonl / .npy / .safetensors file"})
    n_sequences: int = field(default=4096, metadata={"help": "sequences to generate; for files, the most to read (0 = all)"})
    split: str = field(default="train", metadata={"help": "generator split: train, test or heldout"})
    seed: int = field(default=0, metadata={"help": "generator seed"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in a .jsonl source"})
    seq_len: int = field(default=0, metadata={"help": "tokens per sequence for text sources, or columns kept of token arrays (0 = model n_ctx / all)"})
    pack: bool = field(default=False, metadata={"help": "text sources: concatenate documents and cut into seq_len chunks instead of one padded document per sequence"})
    drop_bos: bool = field(default=True, metadata={"help": "drop BOS positions (their activations are outliers), and other special tokens the tokenizer lists (BERT's [SEP])"})
    positions: str = field(default="", metadata={"help": "comma-separated token positions to keep, e.g. '12' (empty = all)"})
    batch_size: int = field(default=256, metadata={"help": "sequences per forward pass (lower it for long contexts)"})
    shard_rows: int = field(default=0, metadata={"help": "rows per shard (0 = about 256 MB per shard)"})
    dtype: str = field(default="float32", metadata={"help": "stored dtype: float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "device the model runs on"})


# -----------------------------------------------------------------------------
# checks

def check_config(cfg: CacheConfig):
    """Raise CacheError for option values that cannot work; touches nothing."""
    def bad(msg):
        raise CacheError(f"invalid cache option: {msg}")

    if not cfg.out:
        bad("out is empty")
    if not cfg.hooks or not all(isinstance(h, str) and h for h in cfg.hooks):
        bad(f"hooks must be a non-empty list of hook names, got {cfg.hooks!r}")
    if len(set(cfg.hooks)) != len(cfg.hooks):
        bad(f"hooks has duplicates: {cfg.hooks}")
    for name in ("n_sequences", "seq_len", "shard_rows"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            bad(f"{name} must be an integer >= 0, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0:
        bad(f"batch_size must be a positive integer, got {cfg.batch_size!r}")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        bad(f"dtype must be float32, float16 or bfloat16, got {cfg.dtype!r}")
    if cfg.source == "generator":
        if cfg.model != "scenes":
            bad(f"the built-in generator makes scenes tokens; model {cfg.model!r} needs a text or token file source")
        if cfg.n_sequences <= 0:
            bad("n_sequences must be > 0 for the generator")
        if cfg.split not in ("train", "test", "heldout"):
            bad(f"split must be train, test or heldout, got {cfg.split!r}")
    else:
        if Path(cfg.source).suffix not in (".txt", ".jsonl", ".npy", ".safetensors"):
            bad(f"source must be 'generator' or a .txt/.jsonl/.npy/.safetensors file, got {cfg.source!r}")
        if not Path(cfg.source).is_file():
            raise CacheError(f"source {cfg.source}: no such file")
    _positions(cfg)


def _positions(cfg) -> list[int]:
    try:
        pos = [int(p) for p in cfg.positions.split(",") if p.strip()]
    except ValueError:
        raise CacheError(f"invalid cache option: positions must be comma-separated integers, got {cfg.positions!r}") from None
    if any(p < 0 for p in pos):
        raise CacheError(f"invalid cache option: positions must be >= 0, got {cfg.positions!r}")
    return pos


# -----------------------------------------------------------------------------
# token sources: each yields batches (batch index, tokens (B, T) long, lengths (B,) long)

class _Source:
    desc: dict  # recorded in the manifest
    n_sequences: int | None  # when known, for the progress bar
    width: int  # T

    def batches(self, start: int, bs: int):
        """Batches from batch index `start` on (for resume)."""
        raise NotImplementedError


class _Generated(_Source):
    def __init__(self, cfg):
        from sae.scenes import generate_tokens

        self.tokens = generate_tokens(cfg.n_sequences, cfg.seed, cfg.split)
        self.n_sequences, self.width = self.tokens.shape
        self.desc = {"kind": "generator", "function": "sae.scenes.generate_tokens",
                     "n_sequences": cfg.n_sequences, "seed": cfg.seed, "split": cfg.split}

    def batches(self, start, bs):
        for b in range(start, -(-self.n_sequences // bs)):
            t = self.tokens[b * bs: (b + 1) * bs]
            yield b, t, torch.full((len(t),), self.width)


class _Array(_Source):
    """Pre-tokenised (n_sequences, seq_len) integers, read a batch at a time (memory-mapped)."""

    def __init__(self, cfg, path: Path):
        if path.suffix == ".npy":
            try:
                self.arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise CacheError(f"source {path}: cannot read as a .npy array ({e})") from None
            dtype, shape = self.arr.dtype, self.arr.shape
            integer = np.issubdtype(dtype, np.integer)
            key = None
        else:
            from safetensors import safe_open

            try:
                self.f = safe_open(str(path), framework="pt")
            except Exception as e:
                raise CacheError(f"source {path}: cannot read as safetensors ({e})") from None
            keys = list(self.f.keys())
            key = next((k for k in ("tokens", "input_ids") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise CacheError(f"source {path}: holds {keys}; expected a 'tokens' or 'input_ids' tensor")
            self.arr = self.f.get_slice(key)
            dtype, shape = self.arr.get_dtype(), self.arr.get_shape()
            integer = dtype in ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
        if not integer or len(shape) != 2:
            raise CacheError(f"source {path}: expected a 2-D integer array (n_sequences, seq_len), got {dtype} {list(shape)}")
        n = shape[0] if cfg.n_sequences == 0 else min(shape[0], cfg.n_sequences)
        if n == 0 or shape[1] == 0:
            raise CacheError(f"source {path}: empty dataset (shape {list(shape)})")
        self.n_sequences, self.width = n, shape[1] if cfg.seq_len == 0 else min(cfg.seq_len, shape[1])
        self.desc = {"kind": path.suffix[1:], "path": str(path.resolve()), "key": key, "bytes": path.stat().st_size,
                     "sha256": sha256_file(path), "n_sequences": n}

    def batches(self, start, bs):
        for b in range(start, -(-self.n_sequences // bs)):
            t = self.arr[b * bs: min((b + 1) * bs, self.n_sequences)]
            t = torch.as_tensor(np.array(t)) if isinstance(t, np.ndarray) else t
            t = t[:, : self.width].long()
            yield b, t, torch.full((len(t),), self.width)


class _Text(_Source):
    """Documents tokenised with the model's tokenizer: one padded sequence per document, or packed."""

    def __init__(self, cfg, path: Path, tokenizer, n_ctx: int):
        if tokenizer is None:
            raise CacheError(f"source {path}: model {cfg.model!r} has no tokenizer; use a .npy/.safetensors token file")
        self.path, self.kind, self.field, self.tok = path, path.suffix[1:], cfg.text_field, tokenizer
        self.width, self.pack, self.limit = cfg.seq_len or n_ctx, cfg.pack, cfg.n_sequences
        if self.width > n_ctx:
            raise CacheError(f"invalid cache option: seq_len {self.width} exceeds the model's n_ctx {n_ctx}")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked by length anyway
        self.n_sequences = None
        if not self.pack:  # one sequence per document: count them for the progress bar
            n = sum(1 for _ in self._texts())
            self.n_sequences = n if self.limit == 0 else min(n, self.limit)
        if next(self._texts(), None) is None:
            raise CacheError(f"source {path}: empty dataset (no non-empty documents)")
        self.desc = {"kind": self.kind, "path": str(path.resolve()), "bytes": path.stat().st_size,
                     "sha256": sha256_file(path), "text_field": self.field if self.kind == "jsonl" else None,
                     "seq_len": self.width, "pack": self.pack, "n_sequences_limit": self.limit}

    def _texts(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if self.kind == "jsonl":
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise CacheError(f"source {self.path} line {i}: invalid JSON ({e.msg})") from None
                        if not isinstance(rec, dict) or not isinstance(rec.get(self.field), str):
                            raise CacheError(f"source {self.path} line {i}: no string field {self.field!r}")
                        line = rec[self.field]
                    if line.strip():
                        yield i, line.strip()
        except UnicodeDecodeError:
            raise CacheError(f"source {self.path}: not UTF-8 text") from None

    def _sequences(self):
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        stream = []
        for i, text in self._texts():
            try:
                ids = bos + list(self.tok.encode(text))
            except Exception as e:
                raise CacheError(f"source {self.path} line {i}: cannot tokenise ({e})") from None
            if not self.pack:
                yield ids[: self.width]
                continue
            stream += ids
            while len(stream) >= self.width:
                yield stream[: self.width]
                stream = stream[self.width:]
        if stream:
            yield stream

    def batches(self, start, bs):
        seqs = self._sequences()
        if self.limit:
            seqs = islice(seqs, self.limit)
        seqs = islice(seqs, start * bs, None)
        b = start
        while chunk := list(islice(seqs, bs)):
            t = torch.full((len(chunk), self.width), self.pad, dtype=torch.long)
            for r, ids in enumerate(chunk):
                t[r, : len(ids)] = torch.tensor(ids)
            yield b, t, torch.tensor([len(ids) for ids in chunk])
            b += 1


def open_source(cfg: CacheConfig, tokenizer, n_ctx: int) -> _Source:
    if cfg.source == "generator":
        return _Generated(cfg)
    path = Path(cfg.source)
    if path.suffix in (".npy", ".safetensors"):
        return _Array(cfg, path)
    return _Text(cfg, path, tokenizer, n_ctx)


# -----------------------------------------------------------------------------
# files: everything reaches its final name by rename, after an fsync

def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_shard(path: Path, tensors: dict) -> str:
    """Write a shard atomically; returns its sha256."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    _fsync(tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
    return digest


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable ({e})") from None


def _prior(out: Path, config: dict):
    """What `out` already holds: ("new", None), ("done", manifest) or ("resume", progress). Refuses
    a directory holding something else, or a cache of another config; touches nothing."""
    if not out.exists():
        return "new", None
    if not out.is_dir():
        raise CacheError(f"{out} exists and is not a directory")
    for name, state in ((MANIFEST, "done"), (PROGRESS, "resume")):
        if (out / name).exists():
            prior = _read_json(out / name)
            if not isinstance(prior, dict) or not isinstance(prior.get("identity"), dict):
                raise CacheError(f"{out / name}: not written by this cache writer; choose another out directory")
            old = prior["identity"].get("config", {})
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise CacheError(f"{out} holds a cache of a different config ({', '.join(diff)} differ); "
                                 "choose another out directory or delete it")
            return state, prior
    if any(out.iterdir()):
        raise CacheError(f"{out} is not empty and holds no cache; choose an empty or new directory")
    return "new", None


# -----------------------------------------------------------------------------
# the writer

def write_cache(cfg: CacheConfig, model=None, tokenizer=None) -> Path:
    """Write (or finish, or confirm) the cache described by cfg; returns its directory. A model
    (and tokenizer) may be passed in instead of loading cfg.model, which then only labels it."""
    from tqdm import tqdm

    from . import model as tl

    check_config(cfg)
    out = Path(cfg.out)
    config = {k: v for k, v in asdict(cfg).items() if k != "out"}
    state, prior = _prior(out, config)  # refuse early, before the slow model load

    model = model if model is not None else tl.load_model(cfg.model, cfg.device)
    if tokenizer is None:
        try:
            tokenizer = tl.get_tokenizer(cfg.model, model)
        except (ValueError, ImportError):
            tokenizer = None  # fine for token-array sources; _Text says so otherwise
    tl.check_hook_names(model, cfg.hooks, cfg.model)
    n_ctx, d_vocab = model.cfg.n_ctx, model.cfg.d_vocab
    source = open_source(cfg, tokenizer, n_ctx)
    T = source.width
    if T > n_ctx:
        raise CacheError(f"source {cfg.source}: sequences of {T} tokens exceed the model's n_ctx {n_ctx}")
    keep_pos = _positions(cfg)
    if keep_pos and max(keep_pos) >= T:
        raise CacheError(f"invalid cache option: position {max(keep_pos)} is beyond the sequence length {T}")
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    pad = tokenizer.pad_token_id if (tokenizer is not None and cfg.model == tl.BUILTIN) else None
    special = sorted(getattr(tokenizer, "drop_token_ids", ())) if (tokenizer is not None and cfg.drop_bos) else []

    def check_tokens(toks, first_seq):
        if toks.numel() and (toks.min() < 0 or toks.max() >= d_vocab):
            r = int(((toks < 0) | (toks >= d_vocab)).any(1).nonzero()[0])
            raise CacheError(f"source {cfg.source}: sequence {first_seq + r} has a token id outside "
                             f"the model's vocabulary [0, {d_vocab})")

    # one sequence through the model gives each hook's width (and proves the hooks run)
    first = next(source.batches(0, 1))[1]
    check_tokens(first, 0)
    d_in = {h: a.shape[-1] for h, a in tl.hook_activations(model, first, cfg.hooks).items()}
    identity = {"config": config, "model_sha256": tl.model_fingerprint(model), "source": source.desc}
    if prior is not None and prior["identity"] != identity:
        what = "model weights" if prior["identity"]["model_sha256"] != identity["model_sha256"] else "source data"
        raise CacheError(f"{out} holds a cache of the same config but different {what}; "
                         "choose another out directory or delete it")
    if state == "done":
        print(f"{out}: cache already complete ({prior['n_tokens']} rows)", file=sys.stderr)
        return out

    dtype = DTYPES[cfg.dtype]
    row_bytes = sum(d_in.values()) * dtype.itemsize + sum(DTYPES[c].itemsize for c in COLUMNS.values())
    shard_rows = cfg.shard_rows or max(1, SHARD_BYTES // row_bytes)
    header = {
        "format": FORMAT, "version": VERSION, "model": cfg.model, "hook_names": list(cfg.hooks), "d_in": d_in,
        "dtype": cfg.dtype, "seq_len": T, "drop_bos": cfg.drop_bos, "bos_token_id": bos, "pad_token_id": pad,
        "dropped_token_ids": special or None, "positions": keep_pos or None, "columns": COLUMNS, "shard_rows": shard_rows,
        "transformer_lens": tl.tl_version(), "source": source.desc, "identity": identity,
    }

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):  # half-written files of an interrupted run
        stale.unlink()
    shards = []
    for s in prior["shards"] if state == "resume" else []:  # keep the recorded shards still intact
        if not (out / s["file"]).is_file() or sha256_file(out / s["file"]) != s["sha256"]:
            print(f"{out / s['file']} is missing or changed: rewriting from there", file=sys.stderr)
            break
        shards.append(s)
    if state == "new":
        _write_json(out / PROGRESS, {"identity": identity, "shards": []})
    committed = sum(s["rows"] for s in shards)  # rows already in finished shards
    start, g = (shards[-1]["resume_batch"], shards[-1]["batch_first_row"]) if shards else (0, 0)

    # the shard being filled: preallocated, written when full
    buf = {h: torch.empty(shard_rows, d, dtype=dtype) for h, d in d_in.items()}
    buf.update({c: torch.empty(shard_rows, dtype=DTYPES[dt]) for c, dt in COLUMNS.items()})
    fill, n_seq, b = 0, start * cfg.batch_size, start

    def flush(b, g):
        nonlocal fill
        name = SHARD.format(len(shards))
        digest = _write_shard(out / name, {k: v[:fill] for k, v in buf.items()})
        shards.append({"file": name, "rows": fill, "sha256": digest, "resume_batch": b, "batch_first_row": g})
        _write_json(out / PROGRESS, {"identity": identity, "shards": shards})
        fill = 0

    bar = tqdm(total=source.n_sequences, initial=n_seq, unit="seq", desc=f"cache {cfg.model}", dynamic_ncols=True)
    try:
        for b, toks, lengths in source.batches(start, cfg.batch_size):
            check_tokens(toks, b * cfg.batch_size)
            B = toks.shape[0]
            pos = torch.arange(T)
            keep = pos < lengths[:, None]
            if pad is not None:
                keep &= toks != pad
            if cfg.drop_bos and bos is not None:
                keep &= toks != bos
            elif cfg.drop_bos and isinstance(source, _Array):  # no tokenizer: BOS by convention at 0
                keep &= pos != 0
            if special:
                keep &= ~torch.isin(toks, torch.tensor(special))
            if keep_pos:
                keep &= torch.isin(pos, torch.tensor(keep_pos))
            flat = keep.reshape(-1).nonzero().squeeze(1)
            n = flat.numel()
            skip = min(n, max(0, committed - g))  # on resume: rows of this batch already stored
            if skip < n:
                acts = tl.hook_activations(model, toks, cfg.hooks)
                rows = {h: a.reshape(B * T, -1)[flat[skip:]].cpu() for h, a in acts.items()}
                for h, a in rows.items():
                    bad = nonfinite_rows(a)
                    if bad.any():
                        seqs = sorted(set((b * cfg.batch_size + flat[skip:][bad] // T).tolist()))
                        raise CacheError(f"NaN/inf activations from hook {h} in source sequences "
                                         f"{', '.join(map(str, seqs[:5]))}; finished shards are kept")
                sel = flat[skip:]
                cols = {"token_ids": toks.reshape(-1)[sel], "seq_index": b * cfg.batch_size + sel // T,
                        "position": sel % T}
                i = 0
                while i < n - skip:
                    k = min(n - skip - i, shard_rows - fill)
                    for h in d_in:
                        buf[h][fill: fill + k] = rows[h][i: i + k]
                    for c in COLUMNS:
                        buf[c][fill: fill + k] = cols[c][i: i + k]
                    fill, i = fill + k, i + k
                    if fill == shard_rows:
                        flush(b, g)
            g += n
            n_seq += B
            bar.update(B)
        if fill:
            flush(b, g - n)
    except BaseException as e:
        bar.close()
        if state == "new" and not shards:  # nothing worth keeping: leave no trace
            for f in [out / PROGRESS, *out.glob("*.tmp")]:
                f.unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        elif isinstance(e, KeyboardInterrupt):
            print(f"\ninterrupted: {len(shards)} finished shards kept in {out}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    bar.close()

    n_tokens = sum(s["rows"] for s in shards)
    if n_tokens == 0:
        (out / PROGRESS).unlink()
        if created:
            out.rmdir()
        raise CacheError(f"source {cfg.source}: no rows to cache (every position was dropped: BOS/PAD/positions)")
    manifest = {**header, "n_tokens": n_tokens, "n_sequences": n_seq,
                "shards": [{k: s[k] for k in ("file", "rows", "sha256")} for s in shards]}
    _write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    keep_files = {s["file"] for s in shards}
    for f in out.glob("shard-*.safetensors"):  # written by a run killed before it recorded them
        if f.name not in keep_files:
            f.unlink()
    return out


def write_tensors(out, data, hook: str = "activations", shard_rows: int = 65536, dtype: str = "float32",
                  source: str = "tensors") -> Path:
    """Store in-memory activations as a cache (same format, so the same reader): `data` is a
    (N, d_in) tensor, stored under `hook`, or {hook: (N, d) tensor}. For synthetic data and tests;
    there are no tokens, so token_ids is -1, seq_index the row and position 0."""
    out = Path(out)
    data = {hook: data} if torch.is_tensor(data) else dict(data)
    n = {a.shape[0] for a in data.values()}
    if len(n) != 1 or any(a.dim() != 2 for a in data.values()):
        raise CacheError(f"write_tensors: expected (N, d) tensors with one N, got {[tuple(a.shape) for a in data.values()]}")
    n = n.pop()
    if n == 0:
        raise CacheError("write_tensors: empty dataset (0 rows)")
    if dtype not in ("float32", "float16", "bfloat16") or shard_rows <= 0:
        raise CacheError(f"write_tensors: invalid dtype {dtype!r} or shard_rows {shard_rows}")
    for h, a in data.items():
        if not torch.isfinite(a).all():
            raise CacheError(f"write_tensors: NaN/inf in {h} rows {torch.nonzero(~torch.isfinite(a).all(1))[:5, 0].tolist()}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CacheError(f"{out} exists and is not empty; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, r0 in enumerate(range(0, n, shard_rows)):
        r1 = min(n, r0 + shard_rows)
        t = {h: a[r0:r1].detach().cpu().to(DTYPES[dtype]).contiguous() for h, a in data.items()}
        t["token_ids"] = torch.full((r1 - r0,), -1, dtype=torch.int32)
        t["seq_index"] = torch.arange(r0, r1, dtype=torch.int64)
        t["position"] = torch.zeros(r1 - r0, dtype=torch.int32)
        name = SHARD.format(i)
        shards.append({"file": name, "rows": r1 - r0, "sha256": _write_shard(out / name, t)})
    _write_json(out / MANIFEST, {
        "format": FORMAT, "version": VERSION, "model": None, "hook_names": list(data),
        "d_in": {h: a.shape[1] for h, a in data.items()}, "dtype": dtype, "columns": COLUMNS,
        "shard_rows": shard_rows, "source": {"kind": source}, "identity": {"config": None},
        "n_tokens": n, "n_sequences": n, "shards": shards})
    return out
