"""Activations straight from the model, no disk cache needed: `data` for sae.train and train_many.

    stream = ModelStream(StreamConfig(model="scenes", hooks=["blocks.1.hook_resid_post"]))
    sae.train(model, stream, steps=2000, batch_size=512)
    python train.py --model scenes --hook blocks.0.hook_resid_post blocks.1.hook_resid_post --k 8 16

The model runs over the cache writer's token sources with the cache writer's row selection
(sae/lm/cache.py: the same rows a cache of the same config would hold, in the same order), and one
forward pass feeds every hook. Rows are cut into buffers of `buffer_rows` consecutive rows; each
buffer is shuffled by a permutation drawn from (seed, epoch, buffer) and served in that order,
then the next buffer is computed. So the stream is a pure function of the seed, and its position
is (epoch, buffer, offset) plus where the buffer starts in the source (batch, row): resuming
re-runs the model from that batch to rebuild the one buffer, then skips to the offset.

Memory is bounded by the buffers: at most KEEP_BUFFERS per hook are held (the one being read and
the one before, for the readers' rewinds), each buffer_rows x d floats. `write_cache` stores the
first epoch's rows as a cache folder while training reads them (a second run can then read it
from disk); a training run resumed after a kill resumes the cache too.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae.core.config import option
from sae.core.store import CacheError
from sae.lm.cache import CacheConfig, CacheSink, activation_rows, check_tokens, kept_positions, prepare

KEEP_BUFFERS = 2


@dataclass
class StreamConfig:
    model: str = option("scenes", "model to run (as for `train.py cache --model`)")
    hooks: list[str] = option(None, "hooks the stream reads (default: the model's own, as the cache writer's)")
    source: str = option("generator", "'generator' (built-in scenes), or a .txt / .jsonl / .npy / .safetensors file")
    n_sequences: int = option(0, "sequences per epoch: the generator makes this many (0 = 4096); files: the most read")
    split: str = option("train", "generator only: train, test or heldout")
    source_seed: int = option(0, "generator only: its seed (the training seed orders the rows)")
    text_field: str = option("text", ".jsonl only: the field holding the text")
    seq_len: int = option(0, "text files: most tokens per sequence (0 = the model's n_ctx)")
    pack: bool = option(False, "text files only: concatenate documents and cut into seq_len chunks")
    positions: str = option("", "comma-separated token positions to keep, e.g. '12' (empty = all)")
    forward_batch: int = option(64, "sequences per forward pass of the model")
    buffer_rows: int = option(65536, "rows per shuffling buffer (memory: about 2 x buffer_rows x d floats per hook)")
    write_cache: str = option("", "also store the first epoch as a cache in this folder ('' = no)")
    model_processing: str = option("none", "weight processing of a Hub model (see `train.py cache --help`)")
    model_kwargs: str = option("", "JSON keyword arguments for the Hub model's loader")
    device: str = option("cpu", "device the model runs on")

    def __post_init__(self):
        self.hooks = list(self.hooks or [])

    def cache_config(self) -> CacheConfig:
        return CacheConfig(out=self.write_cache or "unused", model=self.model, hooks=self.hooks, source=self.source,
                           n_sequences=self.n_sequences, split=self.split, seed=self.source_seed,
                           text_field=self.text_field, seq_len=self.seq_len, pack=self.pack,
                           positions=self.positions, batch_size=self.forward_batch,
                           model_processing=self.model_processing, model_kwargs=self.model_kwargs,
                           device=self.device)


class ModelStream:
    """The model over a token source, as shuffled buffers of rows (module docstring)."""

    def __init__(self, cfg: StreamConfig, model=None, tokenizer=None):
        if cfg.buffer_rows <= 0 or cfg.forward_batch <= 0:
            raise CacheError("stream: buffer_rows and forward_batch must be positive")
        self.cfg = cfg
        self.plan = prepare(cfg.cache_config(), model, tokenizer)
        self.hooks = list(self.plan.hooks)
        self.sink = CacheSink(self.plan, Path(cfg.write_cache)) if cfg.write_cache else None
        self.buffers: OrderedDict = OrderedDict()  # (epoch, buffer) -> {hook: rows in served order}
        self.starts: dict = {}  # (epoch, buffer) -> (source batch, row in it, global row)
        self.ended: set = set()  # epochs whose last buffer is known

    # ---- what the trainer asks of its data ------------------------------------------------
    def readers(self, hooks: list, batch_size: int, seed: int) -> dict:
        if batch_size > self.cfg.buffer_rows:
            raise CacheError(f"stream: batch_size {batch_size} is larger than buffer_rows {self.cfg.buffer_rows}")
        named = {hook: self._resolve(hook) for hook in hooks}
        return {hook: StreamReader(self, name, batch_size, seed) for hook, name in named.items()}

    def describe(self) -> dict:
        """Enough to tell whether a resumed run reads the same stream."""
        return {"stream": self.plan.identity, "buffer_rows": self.cfg.buffer_rows}

    def metadata(self, hook: str) -> dict:
        load = self.plan.header["model_load"]
        found = {"model_name": self.cfg.model, "hook_name": hook, "model_load": load}
        found.update({k: load[k] for k in ("model_class_name", "model_from_pretrained_kwargs") if k in load})
        return found

    def _resolve(self, hook) -> str:
        if hook in self.hooks:
            return hook
        if not hook and len(self.hooks) == 1:
            return self.hooks[0]
        raise CacheError(f"stream has no hook {hook!r} (it reads {', '.join(self.hooks)})")

    # ---- buffers ---------------------------------------------------------------------------
    def buffer(self, epoch: int, j: int, seed: int) -> dict:
        key = (epoch, j, seed)
        if key not in self.buffers:
            self.buffers[key] = self._build(epoch, j, seed)
            while len(self.buffers) > KEEP_BUFFERS:
                self.buffers.popitem(last=False)
        self.buffers.move_to_end(key)
        return self.buffers[key]

    def start_of(self, epoch: int, j: int) -> tuple[int, int, int]:
        if j == 0:
            return (0, 0, 0)
        if (epoch, j) not in self.starts:  # buffers are built in order, except after a resume
            raise CacheError(f"stream: the start of buffer {j} of epoch {epoch} is unknown (resume from a checkpoint)")
        return self.starts[(epoch, j)]

    def _build(self, epoch: int, j: int, seed: int) -> dict:
        """Buffer j of an epoch: buffer_rows rows from its start in the source, permuted. Empty
        when the previous buffer took the epoch's last rows."""
        b0, r0, g0 = self.start_of(epoch, j)
        plan, bs, want = self.plan, self.cfg.forward_batch, self.cfg.buffer_rows
        parts, have, g, n_seq = [], 0, g0 - r0, None  # g: global row of the current batch's first row
        for b, toks, lengths in plan.source.batches(b0, bs):
            check_tokens(plan, toks, b * bs)
            flat = kept_positions(plan, toks, lengths)
            rows = activation_rows(plan, toks, flat, b)
            if self.sink is not None and epoch == 0:
                self.sink.add(rows, b, g)
            skip = r0 if b == b0 else 0
            take = min(len(flat) - skip, want - have)
            parts.append({h: rows[h][skip: skip + take] for h in self.hooks})
            have += take
            if have == want:  # the next buffer starts inside (or right after) this batch
                inside = skip + take < len(flat)
                self.starts[(epoch, j + 1)] = (b, skip + take, g + skip + take) if inside else (b + 1, 0, g + len(flat))
                break
            g, n_seq = g + len(flat), b * bs + toks.shape[0]
        else:  # the source ran out: this buffer ends the epoch
            self._end_epoch(epoch, g, n_seq)
        if have == 0 and j == 0:
            raise CacheError(f"stream: source {self.cfg.source} yields no rows")
        order = torch.from_numpy(np.random.default_rng([seed, 2, epoch, j]).permutation(have))
        empty = torch.empty(0, 1)
        return {h: (torch.cat([p[h] for p in parts]) if parts else empty)[order].float() for h in self.hooks}

    def _end_epoch(self, epoch: int, g_end: int, n_seq: int | None):
        self.ended.add(epoch)
        if self.sink is not None and epoch == 0:
            self.sink.complete(g_end, n_seq or 0)
            self.sink.close()
            self.sink = None


class StreamReader:
    """One hook of a ModelStream, with the interface of sae.core.store's readers (next_batch,
    state_dict, load_state_dict, d_in, hook; n_rows is None: a stream has no fixed size)."""

    n_rows = None

    def __init__(self, stream: ModelStream, hook: str, batch_size: int, seed: int):
        self.stream, self.hook, self.batch_size, self.seed = stream, hook, batch_size, int(seed)
        self.d_in = stream.plan.d_in[hook]
        self.epoch, self.j, self.offset = 0, 0, 0

    def metadata(self) -> dict:
        return self.stream.metadata(self.hook)

    def next_batch(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            rows = self.stream.buffer(self.epoch, self.j, self.seed)[self.hook]
            take = min(need, len(rows) - self.offset)
            if take:
                parts.append(rows[self.offset: self.offset + take])
            self.offset += take
            need -= take
            if self.offset == len(rows):
                self._next_buffer()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _next_buffer(self):
        last = self.epoch in self.stream.ended and (self.epoch, self.j + 1) not in self.stream.starts
        self.epoch, self.j, self.offset = (self.epoch + 1, 0, 0) if last else (self.epoch, self.j + 1, 0)

    def state_dict(self) -> dict:
        start = self.stream.start_of(self.epoch, self.j)
        return {"kind": "stream", "seed": self.seed, "hook": self.hook, "epoch": self.epoch, "buffer": self.j,
                "offset": self.offset, "start": list(start)}

    def load_state_dict(self, state: dict):
        if state.get("kind") != "stream" or state.get("seed") != self.seed or state.get("hook") != self.hook:
            raise CacheError("stream state was saved from a different stream, seed or hook")
        self.epoch, self.j, self.offset = int(state["epoch"]), int(state["buffer"]), int(state["offset"])
        if self.j:
            self.stream.starts[(self.epoch, self.j)] = tuple(state["start"])
