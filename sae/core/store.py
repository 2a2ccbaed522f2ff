"""Reading activations back for training: an activation cache on disk, or a tensor in memory.

    store = make_store("cache/scenes", batch_size=4096, seed=0)    # or make_store(tensor, ...)
    x = store.next_batch()              # float32 (batch_size, d_in), forever, reshuffled each epoch
    s = store.state_dict()              # small JSON: {"epoch": 3, "offset": 12288, ...}
    store.load_state_dict(s)            # the next batches are exactly those the original gave next

Cache layout (written by sae/cache.py): `manifest.json` plus shards `shard-00000.safetensors`, ...
Each shard holds one (rows, d_in) tensor per hook and per-row columns token_ids / seq_index /
position; rows are the same token positions for every hook.

Shuffle with bounded memory. Each shard is cut into blocks of `block_rows` consecutive rows. In
epoch e the blocks of all shards are permuted (rng(seed, e)) and taken `buffer_rows // block_rows`
at a time into a buffer; buffer j's rows are permuted (rng(seed, e, j)) and served in that order.
So the order of epoch e is a pure function of (seed, e), and the position (epoch, offset in rows)
is the whole state: restoring it reloads one buffer and skips to the offset. Rows of a block stay
together in one buffer (they come from neighbouring tokens), but the buffer mixes buffer_rows /
block_rows blocks drawn from the whole cache, and a cache no larger than the buffer is shuffled
exactly (one buffer holds everything).

Why positioned reads rather than mmap: blocks are read with os.preadv straight into one buffer
allocated at start, so the process's anonymous memory is that buffer plus one batch, whatever the
cache size; the file data passes through the page cache, which the kernel can drop at will. An
mmap (numpy memmap, or safetensors' safe_open) would count every page touched as resident
file-backed memory of the process until unmapped, which looks like growth on a large cache, and
safe_open's get_slice returns a fresh tensor per read. Measured streaming a 96 MB cache twice
with a 2 MB buffer (tests/test_store.py): peak RSS +6 MB this way, +92 MB through safe_open.
The safetensors header is tiny JSON, so each shard's header is parsed once at open and reads go
to byte offsets in its data section.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

FORMAT = "sae-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
COLUMNS = {"token_ids": "int32", "seq_index": "int64", "position": "int32"}  # per-row, besides hooks
DTYPES = {  # manifest / safetensors names -> torch dtype
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int32": torch.int32, "int64": torch.int64,
}
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "I64": "int64"}


class CacheError(ValueError):
    """A bad cache, option or input: the message is one line saying what and where."""


# -----------------------------------------------------------------------------
# the cache on disk

def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_header(path: Path) -> tuple[dict, int, int]:
    """(tensors {name: {dtype, shape, data_offsets}}, data section start, expected file size) of a
    safetensors file, checked against the file's actual size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size or n > 100_000_000:
            raise CacheError(f"{path}: not a safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CacheError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    expected = 8 + n + end
    if size < expected:
        raise CacheError(f"{path}: truncated ({size} bytes, header says {expected})")
    if size > expected:
        raise CacheError(f"{path}: {size - expected} unexpected trailing bytes (corrupt)")
    return header, 8 + n, expected


class Cache:
    """A cache directory: its manifest and shard headers, checked at open, and row-range reads of
    any hook or column. verify=False skips the sha256 of every shard (for huge caches) but still
    checks sizes and headers."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise CacheError(f"{self.path}: no such cache directory")
        if not mpath.is_file():
            hint = " (an unfinished write: rerun the same cache command to finish it)" if (
                self.path / "progress.json").exists() else ""
            raise CacheError(f"{self.path}: no {MANIFEST}, not a finished activation cache{hint}")
        try:
            m = json.loads(mpath.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(f"{mpath}: corrupt JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CacheError(f"{mpath}: not an activation-cache manifest")
        if m.get("version") != VERSION:
            raise CacheError(f"{mpath}: format version {m.get('version')}, this reader reads {VERSION}")
        self.manifest = m
        self.hook_names = list(m["hook_names"])
        self.dtype = m["dtype"]
        self.n_rows = sum(s["rows"] for s in m["shards"])
        if self.n_rows != m["n_tokens"]:
            raise CacheError(f"{mpath}: shards hold {self.n_rows} rows but n_tokens is {m['n_tokens']}")
        self.files = [self.path / s["file"] for s in m["shards"]]
        self.rows = [s["rows"] for s in m["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)  # global row of each shard
        shards = enumerate(m["shards"])
        if verify and sum(f.stat().st_size for f in self.files if f.is_file()) > 1 << 30:
        
            shards = tqdm(shards, total=len(self.files), desc=f"verify {self.path.name}", unit="shard")
        self.headers = [self._check_shard(i, s, verify) for i, s in shards]
        self._fds = {}

    def d_in(self, hook: str) -> int:
        return self.manifest["d_in"][hook]

    def _check_shard(self, i, s, verify):
        f = self.files[i]
        if not f.is_file():
            raise CacheError(f"{f}: shard listed in {MANIFEST} is missing")
        header, data_start, _ = read_header(f)
        want = {h: (self.dtype, [s["rows"], self.d_in(h)]) for h in self.hook_names}
        want.update({c: (dt, [s["rows"]]) for c, dt in COLUMNS.items()})
        for name, (dtype, shape) in want.items():
            t = header.get(name)
            if t is None:
                raise CacheError(f"{f}: no tensor {name!r}; the manifest does not match the shard")
            if ST_DTYPES.get(t["dtype"]) != dtype or t["shape"] != shape:
                raise CacheError(f"{f}: {name!r} is {t['dtype']} {t['shape']}, manifest says {dtype} {shape}")
        if verify:
            digest = sha256_file(f)
            if digest != s["sha256"]:
                raise CacheError(f"{f}: sha256 mismatch (corrupt or changed; manifest {s['sha256'][:12]}…, "
                                 f"file {digest[:12]}…)")
        return {name: data_start + t["data_offsets"][0] for name, t in header.items()}

    def _fd(self, i):
        if i not in self._fds:
            if len(self._fds) >= 64:  # bound open files on caches with thousands of shards
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[i] = os.open(self.files[i], os.O_RDONLY)
        return self._fds[i]

    def read_into(self, out: torch.Tensor, name: str, shard: int, r0: int, r1: int):
        """Rows [r0, r1) of tensor `name` in one shard, read into the contiguous tensor `out`."""
        width = out[0].numel() if out.dim() > 1 else 1
        nbytes = width * out.element_size()
        offset = self.headers[shard][name] + r0 * nbytes
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")[: (r1 - r0) * nbytes]
        fd, done = self._fd(shard), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CacheError(f"{self.files[shard]}: truncated while reading (changed after open?)")
            done += n

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Global rows [start, stop) of a hook's activations or a column, as a new tensor."""
        stop = self.n_rows if stop is None else stop
        is_hook = name in self.hook_names
        if not is_hook and name not in COLUMNS:
            raise CacheError(f"{self.path}: no hook or column {name!r} (hooks: {', '.join(self.hook_names)})")
        dtype = DTYPES[self.dtype if is_hook else COLUMNS[name]]
        shape = (stop - start, self.d_in(name)) if is_hook else (stop - start,)
        out = torch.empty(shape, dtype=dtype)
        for i in range(len(self.files)):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a < b:
                self.read_into(out[a - start: b - start], name, i, a - self.starts[i], b - self.starts[i])
        return out

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_cache(path, verify: bool = True) -> Cache:
    return Cache(path, verify)


# -----------------------------------------------------------------------------
# the stores: shuffled, endless, resumable

def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool mask of rows holding NaN/inf. A row sum is NaN/inf whenever the row holds one, and
    costs one pass; only rows it flags (overflow can flag finite ones) get the exact test."""
    bad = ~torch.isfinite(x.sum(dim=1))
    if bad.any():
        bad[bad.clone()] = ~torch.isfinite(x[bad]).all(dim=1)
    return bad


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) % 2**64 for k in key])  # (negative seeds too)


class _Store:
    """Serves the rows of each epoch in an order fixed by (seed, epoch), a buffer at a time.
    Subclasses say how many buffers an epoch has and how to load one."""

    kind = ""

    def __init__(self, batch_size: int, seed: int, device):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise CacheError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > self.n_rows:
            raise CacheError(f"batch_size {batch_size} is larger than the {self.n_rows} rows of {self.where}")
        self.batch_size, self.seed, self.device = batch_size, int(seed), device
        self.epoch, self.offset = 0, 0  # the position: rows already served in this epoch
        self._buf = None  # index of the loaded buffer in the current epoch, when loaded

    # subclass interface
    def _plan(self, epoch) -> np.ndarray: ...  # cumulative row counts of the epoch's buffers
    def _load(self, epoch, j) -> tuple[torch.Tensor, torch.Tensor]: ...  # (rows, order within)
    def _where(self, positions) -> str: ...  # which stored rows, for errors

    def _ensure(self):
        """Load the buffer holding row `offset` of the epoch (moving to the next epoch at its end)."""
        if self.offset >= self.n_rows:
            self.epoch, self.offset, self._buf = self.epoch + 1, 0, None
        if self._buf is None or not (self._cum[self._buf] <= self.offset < self._cum[self._buf + 1]):
            if self._buf is None:
                self._cum = self._plan(self.epoch)
            j = int(np.searchsorted(self._cum, self.offset, side="right") - 1)
            self._data, self._order = self._load(self.epoch, j)
            self._buf = j

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            self._ensure()
            lo = self.offset - int(self._cum[self._buf])
            take = min(need, len(self._order) - lo)
            pos = self._order[lo: lo + take]
            x = self._data[pos].float()
            bad = nonfinite_rows(x)
            if bad.any():
                raise CacheError(f"NaN/inf activations in {self._where(pos[bad][:5])}"
                                 f" ({int(bad.sum())} rows of this batch)")
            parts.append(x)
            self.offset += take
            need -= take
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x.to(self.device)

    def _identity(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "n_rows": self.n_rows}

    def state_dict(self) -> dict:
        epoch, offset = (self.epoch + 1, 0) if self.offset >= self.n_rows else (self.epoch, self.offset)
        return {**self._identity(), "epoch": epoch, "offset": offset}

    def load_state_dict(self, state: dict):
        for k, v in self._identity().items():
            if state.get(k) != v:
                raise CacheError(f"store state has {k}={state.get(k)!r} but this store has {k}={v!r}: "
                                 "it was saved from different data or options")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.n_rows:
            raise CacheError(f"store state position (epoch {epoch}, offset {offset}) is out of range")
        self.epoch, self.offset, self._buf = epoch, offset, None


class ActivationStore(_Store):
    """Shuffled batches from a cache directory with bounded memory (see the module docstring)."""

    kind = "cache"

    def __init__(self, path, batch_size: int, seed: int = 0, hook: str | None = None,
                 block_rows: int = 1024, buffer_rows: int = 65536, verify: bool = True, device="cpu"):
        for name, v in (("block_rows", block_rows), ("buffer_rows", buffer_rows)):
            if not isinstance(v, int) or v <= 0:
                raise CacheError(f"{name} must be a positive integer, got {v!r}")
        self.cache = Cache(path, verify)
        self.where = str(self.cache.path)
        if hook is None or hook == "":
            if len(self.cache.hook_names) > 1:
                raise CacheError(f"{path} holds several hooks ({', '.join(self.cache.hook_names)}): choose one")
            hook = self.cache.hook_names[0]
        elif hook not in self.cache.hook_names:
            raise CacheError(f"{path} has no hook {hook!r} (it holds {', '.join(self.cache.hook_names)})")
        self.hook, self.d_in, self.n_rows = hook, self.cache.d_in(hook), self.cache.n_rows
        self.block_rows = block_rows
        self.buffer_blocks = max(1, buffer_rows // block_rows)
        # blocks: (shard, first row, last row + 1), over all shards
        self.blocks = np.array([(i, r, min(r + block_rows, n)) for i, n in enumerate(self.cache.rows)
                                for r in range(0, n, block_rows)], dtype=np.int64).reshape(-1, 3)
        cap = min(self.buffer_blocks * block_rows, self.n_rows)
        # the one big allocation: a buffer in the storage dtype, reused for every load
        self._space = torch.empty(cap, self.d_in, dtype=DTYPES[self.cache.dtype])
        super().__init__(batch_size, seed, device)

    def _identity(self):
        return {**super()._identity(), "hook": self.hook, "block_rows": self.block_rows,
                "buffer_blocks": self.buffer_blocks}

    def _epoch_blocks(self, epoch):
        return _rng(self.seed, 0, epoch).permutation(len(self.blocks))

    def _plan(self, epoch):
        perm = self._epoch_blocks(epoch)
        sizes = self.blocks[perm, 2] - self.blocks[perm, 1]
        per_buffer = np.add.reduceat(sizes, np.arange(0, len(sizes), self.buffer_blocks))
        return np.concatenate([[0], np.cumsum(per_buffer)])

    def _load(self, epoch, j):
        ids = self._epoch_blocks(epoch)[j * self.buffer_blocks: (j + 1) * self.buffer_blocks]
        ids = np.sort(ids)  # read in file order; the row permutation below does the mixing
        at, self._loaded = 0, []  # (buffer position, shard, first row) per block, for errors
        for i, r0, r1 in self.blocks[ids]:
            self.cache.read_into(self._space[at: at + r1 - r0], self.hook, int(i), int(r0), int(r1))
            self._loaded.append((at, int(i), int(r0)))
            at += int(r1 - r0)
        order = torch.from_numpy(_rng(self.seed, 1, epoch, j).permutation(at))
        return self._space[:at], order

    def _where(self, positions):
        starts = np.array([a for a, _, _ in self._loaded])
        out = {}
        for p in positions.tolist():
            at, i, r0 = self._loaded[int(np.searchsorted(starts, p, side="right") - 1)]
            out.setdefault(self.cache.files[i].name, []).append(r0 + p - at)
        rows = "; ".join(f"{f} rows {', '.join(map(str, sorted(r)))}" for f, r in out.items())
        return f"{self.where} hook {self.hook}: {rows}"


class TensorStore(_Store):
    """The same interface over an in-memory (N, d_in) tensor: a full permutation per epoch."""

    kind = "tensor"

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0, device="cpu"):
        if data.dim() != 2 or not data.is_floating_point():
            raise CacheError(f"data must be a (N, d_in) float tensor, got {data.dtype} {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise CacheError("data is empty (0 rows)")
        self.data, self.where = data, "data"
        self.n_rows, self.d_in = data.shape
        super().__init__(batch_size, seed, device)

    def _plan(self, epoch):
        return np.array([0, self.n_rows])

    def _load(self, epoch, j):
        order = torch.from_numpy(_rng(self.seed, 1, epoch, 0).permutation(self.n_rows))
        return self.data, order.to(self.data.device)

    def _where(self, positions):
        return f"data rows {', '.join(map(str, sorted(positions.tolist())))}"


def make_store(data, batch_size: int, seed: int = 0, hook: str | None = None, d_in: int | None = None,
               device="cpu", **kw):
    """A store over a (N, d_in) tensor/array or a cache directory (kw: block_rows, buffer_rows,
    verify). With d_in given, a mismatch with the data is an error."""
    if isinstance(data, _Store):
        store = data
    elif torch.is_tensor(data) or isinstance(data, np.ndarray):
        store = TensorStore(torch.as_tensor(data), batch_size, seed, device)
    elif isinstance(data, (str, os.PathLike)):
        store = ActivationStore(data, batch_size, seed, hook, device=device, **kw)
    else:
        raise CacheError(f"data must be a tensor or a cache directory, got {type(data).__name__}")
    if d_in is not None and store.d_in != d_in:
        what = f"cache {store.where} (hook {store.hook})" if isinstance(store, ActivationStore) else "data"
        raise CacheError(f"{what} has d_in={store.d_in} but the SAE expects d_in={d_in}")
    return store
