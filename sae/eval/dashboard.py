"""Feature dashboards: a static site per dictionary that opens from disk (HTML, JS and JSON data; no
server, no network, no CDN).

    python train.py dashboard RUN_DIR                      # writes RUN_DIR/dashboard/; open index.html
    python train.py dashboard RUN_DIR --latents 0-99 --out dash/
    python train.py dashboard RUN_DIR --source generator   # run the model over tokens instead of a cache
    python -m sae.eval.dashboard DICT_DIR --cache cache/x --out dash/

For each latent: how often it fires (density) and a histogram of its activations; its top-activating
contexts, each token shaded by the latent's activation on it (rebuilt from the cache's token ids,
sequence index and position, +-`context` tokens around the peak); contexts drawn at random from
the tokens it fires on, grouped by activation percentile; the output tokens its decoder row
promotes and suppresses through the model's unembedding (where the model has one); the latents
nearest to it by decoder cosine; for a binding SAE the atom's latent in every slot, how often each
fires, and where each M_s sends the atom. The index page sorts by density and maximum activation
and searches latents by token.

Data: the run's activation cache (config.json names it), read in blocks of whole sequences with
positioned reads; or, with --source or for a run trained on a model stream (sae.lm.stream; its
config.json names the source), the model run over that token source (sae.lm.splice.iter_batches,
the cache's row selection) with the dictionary's codes taken by sae.lm.attach.run_codes. One
streaming pass either way (sae/eval/latent_stats.py); memory stays bounded whatever the data size:
the per-latent state (latent_stats.py gives the formula; printed as `state` at the end) plus one
block of codes (--block-rows; by default the rows whose codes fit in 16 MB).

The site: index.html, dashboard.js, dashboard.css (from sae/eval/dashboard_assets/), data/index.js
and data/latents-NNNN.js (64 latents each; a page loads only the file of the latent it shows).
The data files are JSON wrapped in one function call, because a page opened from disk may not
fetch() JSON but may load scripts; dashboard.json holds the index as plain JSON for other tools.
The output folder follows the dictionaries' rule (sae.core.files): it must be new, empty or an
earlier dashboard (recognised by its own files), and is replaced in one rename once complete.
Bad input (a run whose cache is gone or lacks the hook, a latent out of range, a bad option) is one
line on stderr and exit status 2, with nothing written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.core import files
from sae.core.config import HelpFormatter, OptionError, add_options, from_args, option
from sae.core.hub import parse_hub_path
from sae.core.io import load, locate, read_json
from sae.core.store import DTYPES, Cache, CacheError
from sae.eval.latent_stats import Block, LatentStats
from sae.lm import models
from sae.lm.attach import run_codes
from sae.lm.splice import iter_batches, resolve_sae_dir

ASSETS = Path(__file__).resolve().parent / "dashboard_assets"
ASSET_FILES = ("index.html", "dashboard.js", "dashboard.css")
FORMAT, VERSION = "sae-dashboard", 1
SHARD = 64                    # latents per data file
CODES_BUDGET = 16 << 20       # bytes of codes per block when --block-rows is 0 (encoding needs ~4x)


@dataclass
class DashboardConfig:
    out: str = option("", "output folder ('' = RUN_DIR/dashboard); new, empty or an earlier dashboard")
    cache: str = option("", "activation cache to read ('' = the one the run was trained on)")
    source: str = option("", "instead of a cache, run the model over this token source: 'generator' (scenes) or a "
                             ".txt/.jsonl/.npy/.safetensors file (for dictionaries trained on a stream)")
    sae_id: str = option("", "PATH is a SAELens release and this the SAE's id in it (needs sae-lens)")
    revision: str = option("", "PATH is a Hub repo: its branch, tag or commit ('' = main)")
    model: str = option("", "model id ('' = the dictionary's metadata.model_name)")
    hook: str = option("", "hook name ('' = the dictionary's metadata.hook_name)")
    n_sequences: int = option(0, "--source: sequences to run (0 = the generator's 4096, or the whole file)")
    split: str = option("train", "--source generator: its split")
    seed: int = option(0, "--source generator: its seed (0, train: the rows of the default cache)")
    seq_len: int = option(0, "--source text file: tokens per sequence (0 = the model's n_ctx)")
    batch_size: int = option(0, "--source: sequences per forward pass (0 = as many as keep a block of codes in 16 MB)")
    latents: str = option("", "latents to build pages for, e.g. '0-99,512' ('' = all); a binding SAE adds the "
                              "atom's latent in every slot")
    top_k: int = option(16, "top-activating contexts kept per latent")
    samples: int = option(16, "contexts drawn at random from the tokens a latent fires on (shown by percentile)")
    context: int = option(8, "tokens shown either side of the peak")
    bins: int = option(32, "histogram bins (a power of two)")
    n_tokens: int = option(10, "promoted and suppressed output tokens shown")
    n_neighbours: int = option(8, "nearest latents by decoder cosine shown")
    block_rows: int = option(0, "cache rows encoded at a time (0 = as many as keep their codes in 16 MB)")
    sample_seed: int = option(0, "seed of the random contexts")
    device: str = option("cpu", "device for the model and the dictionary")
    threads: int = option(1, "CPU threads for torch (0 = torch's default); small ops gain nothing from more and "
                             "stall when another process holds a core")


class DashboardError(ValueError):
    """Bad input: one line saying what and where."""


# ---- what to show, and from where ---------------------------------------------------------------
@dataclass
class Inputs:
    sae: object
    sae_dir: Path
    run_dir: Path | None
    model_id: str
    hook: str
    latents: torch.Tensor           # the latents that get pages (sorted, unique)
    out: Path
    cfg: DashboardConfig            # the options in effect (a stream-trained run supplies --source)
    cache: Cache | None = None      # None: stream the model over --source
    data_note: str = ""             # where the rows come from, for the page header
    metrics: dict = field(default_factory=dict)


def check_options(cfg: DashboardConfig):
    for name in ("top_k", "context", "samples", "n_tokens", "n_neighbours", "block_rows", "batch_size", "n_sequences"):
        least = 1 if name == "top_k" else 0
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < least:
            raise OptionError(name, f"must be an integer >= {least}, got {getattr(cfg, name)!r}")
    if cfg.bins < 2 or cfg.bins & (cfg.bins - 1):
        raise OptionError("bins", f"must be a power of two >= 2, got {cfg.bins}")
    if cfg.cache and cfg.source:
        raise OptionError("cache", "and {source} both name the data: give one", source="source")


def resolve(path: str, cfg: DashboardConfig) -> Inputs:
    """The dictionary, its model and hook, the latents, the output folder and the data, checked
    before anything heavy runs or anything is written."""
    check_options(cfg)
    sae, sae_dir, run_dir, saved = open_dictionary(path, cfg)
    cfg = stream_source(cfg, run_dir)
    meta = saved.get("metadata") or {}
    model_id = cfg.model or meta.get("model_name") or saved.get("model_name") or ""
    inputs = Inputs(sae, sae_dir, run_dir, model_id, "", parse_latents(cfg.latents, sae),
                    output_folder(cfg, sae_dir, run_dir), cfg)
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        inputs.metrics = read_json(run_dir / "metrics.json")
    # SAELens 6 keeps the hook in metadata; older SAELens cfg.json files at the top level
    hook = cfg.hook or meta.get("hook_name") or saved.get("hook_name") or saved.get("hook_point") or ""
    if cfg.source:
        if not inputs.model_id:
            raise DashboardError(f"{sae_dir}/cfg.json names no model (metadata.model_name): pass --model to run --source")
        if not hook:
            raise DashboardError(f"{sae_dir}/cfg.json names no hook (metadata.hook_name): pass --hook to run --source")
        inputs.hook, inputs.data_note = hook, f"{inputs.model_id} run over {cfg.source}"
    else:
        inputs.cache, inputs.hook = open_data(cfg, run_dir, sae_dir, hook)
        inputs.data_note = f"cache {inputs.cache.path}"
        inputs.model_id = inputs.model_id or inputs.cache.manifest.get("model") or ""
        if inputs.cache.d_in(inputs.hook) != sae.d_in:
            raise DashboardError(f"cache {inputs.cache.path} hook {inputs.hook} has d_in={inputs.cache.d_in(inputs.hook)} "
                                 f"but the dictionary has d_in={sae.d_in}")
    return inputs


def open_dictionary(path: str, cfg: DashboardConfig):
    """(sae, its folder, the run folder or None, its cfg.json) for a run or dictionary folder, a
    Hub repo id (owner/repo/sub/folder) or, with --sae-id, a SAELens release."""
    local = Path(path)
    if local.is_dir() and not cfg.sae_id:
        try:
            sae_dir = resolve_sae_dir(local)
        except ValueError as e:
            raise DashboardError(str(e)) from None
        run_dir = sae_dir.parent if sae_dir.name == "sae" and (sae_dir.parent / "config.json").is_file() else None
        return load(sae_dir, device=cfg.device), sae_dir, run_dir, read_json(sae_dir / "cfg.json")
    if not cfg.sae_id and parse_hub_path(path) is None:
        raise DashboardError(f"{path}: no such run or dictionary directory")
    where = dict(revision=cfg.revision or None, sae_id=cfg.sae_id or None)
    folder, overrides = locate(path, **where)
    return load(path, device=cfg.device, **where), folder, None, {**read_json(folder / "cfg.json"), **overrides}


def stream_source(cfg: DashboardConfig, run_dir: Path | None) -> DashboardConfig:
    """A run trained on a model stream (sae.lm.stream) has no cache: unless --cache or --source
    says otherwise, the model runs over the stream's own source (config.json: data.stream.config)."""
    if cfg.cache or cfg.source or run_dir is None:
        return cfg
    stream = (read_json(run_dir / "config.json").get("data") or {}).get("stream") or {}
    source = stream.get("config") or {}
    if not source.get("source"):
        return cfg
    return dataclasses.replace(cfg, source=source["source"], model=cfg.model or source.get("model") or "",
                               n_sequences=cfg.n_sequences or int(source.get("n_sequences") or 0),
                               split=source.get("split") or cfg.split, seed=int(source.get("seed", cfg.seed)),
                               seq_len=cfg.seq_len or int(source.get("seq_len") or 0))


def output_folder(cfg: DashboardConfig, sae_dir: Path, run_dir: Path | None) -> Path:
    if cfg.out:
        out = Path(cfg.out)
    elif run_dir is not None:
        out = run_dir / "dashboard"
    else:  # inside a dictionary folder it would stop being one (and a Hub download is a cache)
        raise DashboardError(f"{sae_dir} is a dictionary, not a run folder: pass --out for the dashboard")
    files.check_output_dir(out, "dashboard", is_dashboard)  # refuse a foreign folder before the pass
    return out


def open_data(cfg: DashboardConfig, run_dir: Path | None, sae_dir: Path, hook: str) -> tuple[Cache, str]:
    """The cache to read (--cache, or the run's) and the hook in it, with one-line refusals."""
    if cfg.cache:
        where = cfg.cache
    else:
        data = read_json(run_dir / "config.json").get("data", {}) if run_dir is not None else {}
        where = data.get("cache")
        if not where:
            what = (f"{run_dir} was not trained on a cache" if run_dir is not None
                    else f"{sae_dir} is a dictionary without a run")
            raise DashboardError(f"{what}: pass --cache DIR, or --source generator|FILE to run the model over tokens")
        hook = hook or data.get("hook") or ""
    try:
        cache = Cache(where, verify=False)  # sizes and headers are checked; hashing a huge cache is not needed here
    except CacheError as e:
        whose = "" if cfg.cache else f"the cache {run_dir} was trained on is unusable: "
        raise DashboardError(f"{whose}{e}; pass --cache DIR, or --source generator|FILE to run the model over "
                             "tokens") from None
    hook = hook or (cache.hook_names[0] if len(cache.hook_names) == 1 else "")
    if hook not in cache.hook_names:
        raise DashboardError(f"cache {cache.path} does not hold hook {hook!r} (it holds {', '.join(cache.hook_names)}); "
                             "pass --hook, --cache or --source")
    return cache, hook


def parse_latents(spec: str, sae) -> torch.Tensor:
    """'0-99,512' -> sorted unique latent ids; for a binding SAE also the atom's latent in every slot."""
    n = sae.n_total
    if not spec.strip():
        return torch.arange(n)
    ids = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise OptionError("latents", f"must be latent ids and ranges such as '0-99,512', got {spec!r}") from None
        for v in (a, b):
            if not 0 <= v < n:
                raise OptionError("latents", f"names latent {v}, out of range: the dictionary has {n} latents (0-{n - 1})")
        ids.extend(range(a, b + 1))
    ids = torch.tensor(sorted(set(ids)), dtype=torch.long)
    if hasattr(sae, "slot_transforms"):
        atoms = ids % sae.n_latents
        ids = (atoms[None] + sae.n_latents * torch.arange(sae.cfg.n_slots)[:, None]).flatten().unique()
    return ids


# ---- the pass -----------------------------------------------------------------------------------
def block_rows(cfg: DashboardConfig, n_total: int, seq_len: int) -> int:
    """Rows per block: --block-rows, or the rows whose codes fit the budget; at least two sequences,
    so each block ends on a sequence boundary and moves on by at least one sequence."""
    rows = cfg.block_rows or max(256, min(65536, CODES_BUDGET // (4 * n_total)))
    return max(rows, 2 * seq_len)


def read_rows(cache: Cache, name: str, start: int, stop: int, out: torch.Tensor):
    """Global rows [start, stop) of `name` into the preallocated `out`, across shards."""
    for i in range(len(cache.files)):
        a, b = max(start, int(cache.starts[i])), min(stop, int(cache.starts[i + 1]))
        if a < b:
            cache.read_into(out[a - start: b - start], name, i, a - int(cache.starts[i]), b - int(cache.starts[i]))


def cache_blocks(cache: Cache, hook: str, rows: int):
    """(first row, activations, token ids, sequence index, position) blocks of whole sequences,
    read into buffers allocated once (the consumer is done with a block before the next read)."""
    bufs = {hook: torch.empty(rows, cache.d_in(hook), dtype=DTYPES[cache.dtype]),
            "token_ids": torch.empty(rows, dtype=torch.int32), "position": torch.empty(rows, dtype=torch.int32)}
    seq = torch.empty(rows + 1, dtype=torch.int64)  # one row more: does the last sequence go on?
    start = 0
    while start < cache.n_rows:
        stop = min(start + rows, cache.n_rows)
        read_rows(cache, "seq_index", start, min(stop + 1, cache.n_rows), seq)
        n = stop - start
        if stop < cache.n_rows and seq[n] == seq[n - 1]:  # a sequence runs on: it starts the next block
            cuts = (seq[1:n] != seq[: n - 1]).nonzero()
            n = int(cuts[-1]) + 1 if len(cuts) else n  # one sequence longer than the block: cut it
        for name, buf in bufs.items():
            read_rows(cache, name, start, start + n, buf)
        yield start, bufs[hook][:n], bufs["token_ids"][:n], seq[:n], bufs["position"][:n]
        start += n


def encoded_cache_blocks(inputs: Inputs, cfg: DashboardConfig):
    """Blocks of the cache with the tracked latents' codes."""
    cache, sae = inputs.cache, inputs.sae
    rows = block_rows(cfg, sae.n_total, int(cache.manifest.get("seq_len") or 1))
    dev = next(sae.parameters()).device
    for first, acts, tok, seq, pos in cache_blocks(cache, inputs.hook, rows):
        codes = tracked(sae.encode(acts.to(dev, torch.float32)), inputs)
        yield Block(codes.cpu(), tok, seq, pos, first)


def tracked(codes: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """The tracked latents' columns (no copy when every latent is tracked)."""
    return codes if len(inputs.latents) == codes.shape[1] else codes[:, inputs.latents.to(codes.device)]


def streamed_blocks(inputs: Inputs, cfg: DashboardConfig, model):
    """The model run over --source, a batch of whole sequences at a time, with the rows a cache
    of that source would hold (no BOS, padding or special tokens); codes by attach.run_codes."""
    width = cfg.seq_len or model.cfg.n_ctx  # the longest a sequence of the source can be
    batch = cfg.batch_size or max(1, CODES_BUDGET // (4 * inputs.sae.n_total * width))
    first = 0
    for b, tb in enumerate(iter_batches(inputs.model_id, model, cfg.source, cfg.n_sequences, batch, cfg.split,
                                        cfg.seed, cfg.seq_len)):
        codes = run_codes(model, {inputs.hook: inputs.sae}, tb.tokens, positions=tb.splice)[inputs.hook]
        B, T = tb.tokens.shape
        seq = (b * batch + torch.arange(B))[:, None].expand(B, T)
        pos = torch.arange(T, dtype=torch.int32)[None].expand(B, T)
        mask = tb.splice
        yield Block(tracked(codes, inputs).cpu(), tb.tokens[mask].int(), seq[mask], pos[mask], first)
        first += len(codes)


@torch.no_grad()
def collect(inputs: Inputs, cfg: DashboardConfig, model) -> LatentStats:
    """The one streaming pass."""
    stats = LatentStats(len(inputs.latents), cfg.top_k, cfg.samples, cfg.context, cfg.bins, cfg.sample_seed)
    inputs.sae.eval()
    blocks = encoded_cache_blocks(inputs, cfg) if inputs.cache is not None else streamed_blocks(inputs, cfg, model)
    total = inputs.cache.n_rows if inputs.cache is not None else None
    with tqdm(total=total, unit="row", desc="dashboard", dynamic_ncols=True, file=sys.stderr) as bar:
        for block in blocks:
            stats.update(block)
            bar.update(len(block.codes))
    if stats.rows == 0:
        raise DashboardError(f"no rows to read from {inputs.data_note}")
    return stats


# ---- what the model and the decoder say ---------------------------------------------------------
def load_model_for(inputs: Inputs, cfg: DashboardConfig):
    """The model (for --source, token text and the unembedding), or None with a one-line note when
    a cache's model cannot be loaded: the pages then show token ids and no output tokens."""
    if not inputs.model_id:
        return None
    try:
        model = models.load_model(inputs.model_id, cfg.device)
    except (ValueError, ImportError, OSError) as e:
        if cfg.source:
            raise DashboardError(str(e)) from None
        print(f"dashboard: {e}; token ids shown instead of text, no output tokens", file=sys.stderr)
        return None
    if cfg.source:
        try:
            models.check_hook_names(model, [inputs.hook], inputs.model_id)
        except ValueError as e:
            raise DashboardError(str(e)) from None
    return model


def unembedding(model, model_id: str) -> torch.Tensor | None:
    """(d_model, d_vocab) map from the residual stream to logits along the direct path, the final
    LayerNorm's gain folded in (its centring and scale depend on the token and are left out), or
    None for a model without one (MiniLM ships no masked-LM head)."""
    if model is None or model_id in models.MINILM:
        return None
    W_U = getattr(model, "W_U", None)
    if not torch.is_tensor(W_U):
        return None
    ln = getattr(getattr(model, "ln_final", None), "w", None)
    return (W_U * ln[:, None] if torch.is_tensor(ln) else W_U).detach().float().cpu()


@torch.no_grad()
def output_tokens(decoder: torch.Tensor, W_U: torch.Tensor, n: int, chunk: int = 256):
    """(up ids, up values, down ids, down values), each (latents, n): the tokens each decoder row
    raises and lowers most on the direct path (computed `chunk` rows at a time)."""
    parts = []
    for i in range(0, len(decoder), chunk):
        logits = decoder[i: i + chunk].float() @ W_U
        k = min(n, logits.shape[1])
        up, down = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
        parts.append((up.indices, up.values, down.indices, -down.values))
    return tuple(torch.cat(p) for p in zip(*parts))


@torch.no_grad()
def nearest_latents(decoder_all: torch.Tensor, latents: torch.Tensor, n: int, chunk: int = 512):
    """(ids, cosines), each (len(latents), n): the other latents whose decoder rows point closest."""
    unit = F.normalize(decoder_all.float(), dim=1)
    n = min(n, len(unit) - 1)
    ids, cos = [], []
    for i in range(0, len(latents), chunk):
        rows = latents[i: i + chunk]
        sims = unit[rows] @ unit.T
        sims[torch.arange(len(rows)), rows] = -math.inf
        best = sims.topk(n, dim=1)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(ids), torch.cat(cos)


@torch.no_grad()
def slot_maps(sae, atoms: torch.Tensor, n: int = 3, chunk: int = 256):
    """For a binding SAE, where each M_s sends each atom: (self cos (S, m), nearest atom ids
    (S, m, n), their cosines (S, m, n)), cosines of M_s d_a against the dictionary D's rows."""
    D = F.normalize(sae.dictionary.float(), dim=1)
    Ms = sae.slot_transforms.float()
    selfs, ids, cos = [], [], []
    for i in range(0, len(atoms), chunk):
        a = atoms[i: i + chunk]
        moved = F.normalize(torch.einsum("sij,aj->sai", Ms, sae.dictionary[a].float()), dim=-1)
        sims = moved @ D.T                                  # (S, m, n_latents)
        selfs.append(sims.gather(2, a.view(1, -1, 1).expand(len(Ms), -1, 1))[..., 0])
        best = sims.topk(min(n, D.shape[0]), dim=2)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(selfs, 1), torch.cat(ids, 1), torch.cat(cos, 1)


@dataclass
class Features:
    """Per tracked latent, what the decoder says (row k belongs to inputs.latents[k])."""
    near: torch.Tensor
    near_cos: torch.Tensor
    tokens: tuple | None = None     # output_tokens(...) or None without an unembedding
    slots: tuple | None = None      # slot_maps(...) of each latent's atom, binding SAEs only


def features(inputs: Inputs, cfg: DashboardConfig, model) -> Features:
    sae = inputs.sae
    decoder = sae.flat_decoder().detach().float().cpu()
    near, cos = nearest_latents(decoder, inputs.latents, cfg.n_neighbours)
    feats = Features(near, cos)
    W_U = unembedding(model, inputs.model_id)
    if W_U is not None and cfg.n_tokens and W_U.shape[0] == decoder.shape[1]:
        feats.tokens = output_tokens(decoder[inputs.latents], W_U, cfg.n_tokens)
    if hasattr(sae, "slot_transforms"):
        feats.slots = slot_maps(sae.cpu(), inputs.latents % sae.n_latents)
    return feats


# ---- the site's data ----------------------------------------------------------------------------
class Vocab:
    """Token id -> text, decoded one id at a time (and remembered); ids only without a tokenizer."""

    def __init__(self, model_id: str, model):
        try:
            self.tok = models.get_tokenizer(model_id, model) if model_id else None
        except (ValueError, ImportError):
            self.tok = None
        self.known: dict[int, str] = {}

    def separator(self, ids: list[int]) -> str:
        """" " when the tokenizer joins tokens with spaces (word-level, like the scenes model's),
        else "" (byte-pair tokens carry their own spaces): decoding a pair tells."""
        ids = [i for i in ids if i >= 0][:2]
        if self.tok is None or len(ids) < 2:
            return " "
        try:
            pair = self.tok.decode(ids)
        except (ValueError, IndexError, TypeError, KeyError):
            return " "
        return " " if pair == f"{self.text(ids[0])} {self.text(ids[1])}" else ""

    def text(self, i: int) -> str:
        if i not in self.known:
            try:
                self.known[i] = self.tok.decode([i]) if self.tok is not None and i >= 0 else f"#{i}"
            except (ValueError, IndexError, TypeError, KeyError):
                self.known[i] = f"#{i}"
        return self.known[i]


def sig(v: float) -> float:
    """Four significant digits: enough to read, a third of the bytes."""
    return float(f"{v:.4g}") if math.isfinite(v) else 0.0


def contexts(kept, k: int, peak_max: float, stats: LatentStats, with_pct: bool) -> list[dict]:
    """The kept contexts of tracked latent k (best first for the top list, by activation for samples):
    tokens, positions and the latent's activation on each in thousandths of its maximum."""
    score, act, seq = kept.score[k].tolist(), kept.act[k].tolist(), kept.seq[k].tolist()
    toks, poss, ctxs = kept.tok[k].tolist(), kept.pos[k].tolist(), kept.ctx[k].tolist()
    out = []
    rows = kept.row[k].tolist()
    for e in sorted((e for e in range(kept.k) if score[e] > -math.inf), key=lambda e: (-act[e], rows[e])):
        valid = [w for w, p in enumerate(poss[e]) if p >= 0]
        lo, hi = valid[0], valid[-1] + 1
        scale = 1000 / peak_max if peak_max > 0 else 0
        c = {"act": sig(act[e]), "seq": seq[e], "peak": stats.context - lo, "tok": toks[e][lo:hi],
             "pos": poss[e][lo:hi], "a": [min(1000, max(0, round(v * scale))) for v in ctxs[e][lo:hi]]}
        if with_pct:
            c["pct"] = round(100 * stats.hist.percentile(k, act[e]), 1)
        out.append(c)
    return out


def latent_json(k: int, inputs: Inputs, stats: LatentStats, feats: Features, tracked: dict) -> dict:
    """Everything one latent's page shows (k: its row among the tracked latents)."""
    i, count, peak_max = int(inputs.latents[k]), int(stats.count[k]), float(stats.max[k])
    entry = {"i": i, "count": count, "density": count / stats.rows, "max": sig(peak_max),
             "mean": sig(float(stats.sum[k]) / count) if count else 0.0,
             "hist": {"hi": float(stats.hist.hi[k]), "counts": stats.hist.counts[k].tolist()},
             "top": contexts(stats.top, k, peak_max, stats, False),
             "samples": contexts(stats.samples, k, peak_max, stats, True) if stats.samples else [],
             "near": [[int(a), sig(float(c))] for a, c in zip(feats.near[k], feats.near_cos[k])]}
    if feats.tokens is not None:
        up, up_v, down, down_v = (t[k].tolist() for t in feats.tokens)
        entry["logits"] = {"up": [[a, sig(v)] for a, v in zip(up, up_v)],
                           "down": [[a, sig(v)] for a, v in zip(down, down_v)]}
    if feats.slots is not None:
        entry["binding"] = binding_json(k, i, inputs.sae, stats, feats, tracked)
    return entry


def binding_json(k: int, i: int, sae, stats: LatentStats, feats: Features, tracked: dict) -> dict:
    """The atom behind latent i in every slot: its latent there, how often that fires, and where
    M_s sends the atom (cosine with itself, nearest atoms of D)."""
    n = sae.n_latents
    selfs, ids, cos = feats.slots
    slots = []
    for s in range(sae.cfg.n_slots):
        latent = s * n + i % n
        t = tracked[latent]  # parse_latents tracks every slot's latent of each atom
        slots.append({"slot": s, "latent": latent, "count": int(stats.count[t]), "density": int(stats.count[t]) / stats.rows,
                      "max": sig(float(stats.max[t])), "self_cos": sig(float(selfs[s, k])),
                      "near": [[int(a), sig(float(c))] for a, c in zip(ids[s, k], cos[s, k])]})
    return {"atom": i % n, "slot": i // n, "slots": slots}


def used_tokens(entry: dict) -> set[int]:
    ids = {t for key in ("top", "samples") for c in entry[key] for t in c["tok"]}
    return ids | {t for key in ("up", "down") for t, _ in entry.get("logits", {}).get(key, [])}


def index_row(entry: dict, shard: int, vocab: Vocab) -> list:
    """[latent, count, density, max, mean, peak tokens, promoted tokens, data file]: the index
    table, and what its token search looks through."""
    peaks = list(dict.fromkeys(vocab.text(c["tok"][c["peak"]]) for c in entry["top"]))[:5]
    promoted = [vocab.text(t) for t, _ in entry.get("logits", {}).get("up", [])[:3]]
    return [entry["i"], entry["count"], entry["density"], entry["max"], entry["mean"], peaks, promoted, shard]


INDEX_COLUMNS = ["latent", "count", "density", "max", "mean", "peak_tokens", "promoted_tokens", "shard"]


def meta_json(inputs: Inputs, cfg: DashboardConfig, stats: LatentStats, feats: Features, vocab: Vocab) -> dict:
    sae = inputs.sae
    keep = ("fvu", "explained_variance", "l0", "dead_share", "dense_share", "tokens")
    return {"dictionary": str(inputs.sae_dir.resolve()), "architecture": sae.architecture, "d_in": sae.d_in,
            "n_total": sae.n_total, "n_latents": sae.n_latents, "n_slots": getattr(sae.cfg, "n_slots", 1),
            "model": inputs.model_id or None, "hook": inputs.hook, "data": inputs.data_note, "rows": stats.rows,
            "tracked": len(inputs.latents), "top_k": cfg.top_k, "samples": cfg.samples, "context": cfg.context,
            "bins": cfg.bins, "output_tokens": feats.tokens is not None, "shard_size": SHARD,
            "token_sep": vocab.separator(distinct_tokens(stats)),
            "metrics": {k: v for k, v in inputs.metrics.items() if k in keep and isinstance(v, (int, float))
                        and math.isfinite(v)},
            "built": time.strftime("%Y-%m-%d %H:%M:%S")}


def distinct_tokens(stats: LatentStats, n: int = 2) -> list[int]:
    """A few different token ids from the kept contexts (to probe the tokenizer with)."""
    return stats.top.tok[stats.top.tok >= 0].unique()[:n].tolist()


# ---- writing ------------------------------------------------------------------------------------
def is_dashboard(path: Path) -> bool:
    """An earlier dashboard (a folder this module wrote, holding nothing else): safe to replace."""
    try:
        marker = json.loads((path / "dashboard.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("format") == FORMAT
            and files.only_files(path, {*ASSET_FILES, "data", "dashboard.json"}))


def js_call(fn: str, *args) -> str:
    """A data file: JSON inside one call, which a page opened from disk can load as a script."""
    body = ", ".join(json.dumps(a, separators=(",", ":"), allow_nan=False) for a in args)
    return f"SAE_DASHBOARD.{fn}({body});\n"


def write_site(inputs: Inputs, cfg: DashboardConfig, stats: LatentStats, feats: Features, vocab: Vocab) -> Path:
    """Build the folder under a temporary name, a data file at a time, and move it into place."""
    meta = meta_json(inputs, cfg, stats, feats, vocab)
    tracked = {int(latent): k for k, latent in enumerate(inputs.latents)}
    with files.replacing_dir(inputs.out, "dashboard", is_dashboard) as tmp:
        for name in ASSET_FILES:
            files.write_text(tmp / name, (ASSETS / name).read_text(encoding="utf-8"))
        files.make_dirs(tmp / "data")
        index = []
        for shard, start in enumerate(range(0, len(inputs.latents), SHARD)):
            entries = [latent_json(k, inputs, stats, feats, tracked)
                       for k in range(start, min(start + SHARD, len(inputs.latents)))]
            ids = set().union(*(used_tokens(e) for e in entries))
            payload = {"vocab": {str(t): vocab.text(t) for t in sorted(ids)}, "latents": entries}
            files.write_text(tmp / "data" / f"latents-{shard:04d}.js", js_call("shard", shard, payload))
            index += [index_row(e, shard, vocab) for e in entries]
        files.write_text(tmp / "data" / "index.js", js_call("index", {"meta": meta, "columns": INDEX_COLUMNS,
                                                                       "latents": index}))
        files.write_json(tmp / "dashboard.json", {"format": FORMAT, "version": VERSION, "meta": meta,
                                                  "columns": INDEX_COLUMNS, "latents": index}, indent=None)
    return inputs.out


# ---- the command --------------------------------------------------------------------------------
def build(path: str, cfg: DashboardConfig) -> tuple[Path, dict]:
    """Check everything, make one pass, write the site; returns (folder, what it took)."""
    clock = [time.time()]

    def lap() -> float:
        clock.append(time.time())
        return clock[-1] - clock[-2]

    inputs = resolve(path, cfg)
    cfg = inputs.cfg
    model = load_model_for(inputs, cfg)
    info = {"load_s": lap()}
    stats = collect(inputs, cfg, model)
    info["pass_s"] = lap()
    out = write_site(inputs, cfg, stats, features(inputs, cfg, model), Vocab(inputs.model_id, model))
    info.update(write_s=lap(), latents=len(inputs.latents), rows=stats.rows, state_mb=stats.state_bytes() / 2**20)
    return out, info


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python train.py dashboard", formatter_class=HelpFormatter,
                                description="Write a static feature dashboard (open index.html from disk).")
    p.add_argument("path", help="run directory (config.json + sae/), dictionary directory (cfg.json), Hub repo "
                                "(owner/repo/sub/folder) or, with --sae-id, a SAELens release")
    add_options(p, DashboardConfig)
    args = p.parse_args(argv)
    return args.path, from_args(DashboardConfig, args)


def main(argv=None) -> int:
    path, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if cfg.threads < 0:
            raise OptionError("threads", f"must be >= 0, got {cfg.threads}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # the command's process only; build() leaves torch as it finds it
        out, info = build(path, cfg)
    except OptionError as e:
        print(f"dashboard: error: {e.cli_message()}", file=sys.stderr)
        return 2
    except (ValueError, ImportError) as e:  # DashboardError, LoadError, CacheError, OutputError
        print(f"dashboard: error: {files.first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dashboard: error: {e.filename or path}: {files.describe_os_error(e)}", file=sys.stderr)
        return 2
    print(f"{out / 'index.html'}: {info['latents']} latents, {info['rows']} rows; loading {info['load_s']:.1f} s, "
          f"pass {info['pass_s']:.1f} s, pages {info['write_s']:.1f} s; per-latent state {info['state_mb']:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
