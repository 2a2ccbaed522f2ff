"""How `sae.train` trains a binding SAE by default: bind, split, match, rebind.

A binding SAE trained plainly (gradient descent from random D and M_s) does not find the binding
on a superposed world: which slot-2 direction is the echo M d_a of which atom d_a is a
combinatorial registration problem, and gradient descent on M stalls in one of its many local
optima (RESULTS.md). Graph matching solves that problem once the slot *partition* is known,
because an orthogonal M preserves the Gram matrix. So, of the step budget T:

  1. bind    (25%) a binding SAE with free ("full") transforms from a random orthogonal start.
             It rarely finds the correspondence, but its shared D settles on one slot's atoms.
  2. split   (45%) untie: a standard SAE of the same sparsity rule whose decoder starts as
             [D; M_2 D; ...] (and the same encoder). Its free blocks settle on the other slots.
  3. match   graph matching (sae.recipes.matching.match_blocks) of block 1 against the live rows of the
             other blocks gives, per slot, a correspondence and M_s (Procrustes); slot-s latents
             are reordered by it, encoder columns moved with them.
  4. rebind  (30%) the caller's model starts from D = block 1 and the fitted M_s, and is trained.

If matching finds fewer than MIN_PAIRS pairs for a slot, step 4 starts from the step-1 model
instead (`rebind_fallback` = 1). With more atoms than dimensions the matched pairs must be
cross-validated, which needs about 2d/3 of them; the matching sees at most MATCH_ROWS rows per
block, so above d ≈ 1500 it can never succeed: the recipe then trains plainly for the whole budget
(`rebind_skipped` = 1) instead of wasting the split phase.

Truth-free verdicts land in the metrics: `rebind_pairs` (smallest matched count over slots),
`tie_cost` (FVU of the tied model minus that of the untied one: large means the data is not
matrix-bound) and `slot_usage` (share of active latents in slots >= 2: near 0 means a bag). With a run_dir each phase is its own resumable run under run_dir/phases/ and the
final model is saved in run_dir like any other run's.
"""
from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from sae.core import files, io
from sae.core.architectures.base import SAE, SAEConfig
from sae.core.architectures.binding import BindingSAE
from sae.recipes.matching import MatchConfig, fit_map, match_blocks
from sae.core.metrics import batch_metrics
from sae.core.config import OptionError
from sae.core.run_dir import RunDir, is_run
from sae.core.store import make_store
from sae.core.trainer import TrainResult, train_loop

BIND_SHARE, SPLIT_SHARE = 0.25, 0.45  # of the steps; rebind gets the rest
MIN_PAIRS = 8  # fewer matched pairs than this and the match is not trusted
MIN_USAGE = 1e-3  # latents firing on fewer tokens are dead: their rows only add chance structure
MATCH_ROWS = 1024  # matching costs ~rows² per step (50 s at 1024 rows): larger blocks match their most-used rows
EXTEND_COS = 0.7  # after the map is found, other rows pair up where cos(M a, b) reaches this
SAMPLE_ROWS = 16384  # activations for usage, tie cost and slot usage


def train_binding(model: BindingSAE, data, **options) -> TrainResult:
    """Train `model` in place by bind/split/match/rebind (`options` are sae.train's); returns the
    final phase's TrainResult with the recipe's verdicts added to its metrics."""
    cfg = model.cfg
    steps, seed = options.pop("steps"), options.pop("seed")
    run_dir, resume = options.pop("run_dir", ""), options.pop("resume", False)
    bind_steps, split_steps = int(BIND_SHARE * steps), int(SPLIT_SHARE * steps)
    if min(bind_steps, split_steps) < 1:
        raise ValueError(f"the binding recipe needs at least 4 steps, got {steps} (or use binding_recipe='plain')")
    if cfg.n_latents > model.d_in and MATCH_ROWS < 2 * model.d_in / 3 + 1:
        return _train_plain(model, data, steps, seed, run_dir, resume, options)
    if not run_dir:
        return _train_phases(model, data, steps, seed, None, False, options)
    files.check_output_dir(run_dir, "training run", is_run)  # refuse before the first phase trains
    with RunDir(run_dir).lock:  # held across phases; each phase's own train() re-enters it
        phases = Path(run_dir) / "phases"
        if not resume and _has_progress(phases):
            raise OptionError("run_dir", f"{run_dir} holds a binding run with finished or checkpointed phases: "
                              "continue it with {resume} or choose another folder", resume="resume")
        return _train_phases(model, data, steps, seed, run_dir, resume, options)


def _has_progress(phases: Path) -> bool:
    return any(phases.glob("*/metrics.json")) or any(phases.glob("*/checkpoints/step_*/trainer.json"))


def _train_phases(model: BindingSAE, data, steps, seed, run_dir, resume, options) -> TrainResult:
    cfg = model.cfg
    bind_steps, split_steps = int(BIND_SHARE * steps), int(SPLIT_SHARE * steps)
    phases = Path(run_dir) / "phases" if run_dir else None

    def run_phase(name, m, n_steps, phase_seed, continue_training):
        opts = dict(options, steps=n_steps, seed=phase_seed, binding_recipe="plain")
        if continue_training:
            opts["start"] = "continue"
        if phases is None:
            return train_loop(m, data, **opts)
        where = phases / name
        if (where / "metrics.json").exists():  # finished before an interruption
            return TrainResult(io.load(where / "sae"), io.read_json(where / "metrics.json"), where)
        return train_loop(m, data, run_dir=str(where), resume=(where / "config.json").exists(), **opts)

    # 1. bind: free transforms from a random orthogonal start find the slot partition
    torch.manual_seed(seed)
    bind_cfg = {**model.config_dict(), "slot_transform": "full", "transform_init": "random_orthogonal"}
    bound = run_phase("1-bind", BindingSAE(**bind_cfg), bind_steps, seed, continue_training=False).model

    # 2. split: a standard SAE of the same rule, starting from the bound decoder and encoder
    split = run_phase("2-split", split_sae(bound), split_steps, seed + 1, continue_training=True).model

    # 3. match every free block to block 1, and start the caller's model there
    x = _sample(data, options, seed).to(model.b_dec.device)
    usage = (split.encode(x) > 0).float().mean(0).cpu()
    info = rebind_(model, bound, split, usage, seed)

    # 4. rebind
    result = train_loop(model, data, **dict(options, steps=steps - bind_steps - split_steps, seed=seed + 2,
                                          binding_recipe="plain", start="continue", run_dir=run_dir,
                                          resume=resume and (Path(run_dir) / "config.json").exists()))
    with torch.no_grad():
        tied, untied = model(x), split(x)
        active = tied.codes > 0
        info["slot_usage"] = (active[:, cfg.n_latents:].sum() / active.sum().clamp_min(1)).item()
        info["tie_cost"] = (batch_metrics(x, tied.x_hat, tied.code.l0())["fvu"]
                            - batch_metrics(x, untied.x_hat, untied.code.l0())["fvu"])
    result.metrics.update(info)
    if run_dir:
        io.write_json(Path(run_dir) / "metrics.json", result.metrics)
    return result


def _train_plain(model: BindingSAE, data, steps, seed, run_dir, resume, options) -> TrainResult:
    """The recipe cannot validate a match at this width: train plainly, and say so in the metrics."""
    warnings.warn(f"binding recipe skipped: with {model.cfg.n_latents} atoms in d={model.d_in} a match needs "
                  f"~{int(2 * model.d_in / 3) + 1} validated pairs but at most {MATCH_ROWS} rows are matched; "
                  "training plainly", stacklevel=3)
    result = train_loop(model, data, **dict(options, steps=steps, seed=seed, binding_recipe="plain",
                                          run_dir=run_dir, resume=resume))
    with torch.no_grad():
        active = model(_sample(data, options, seed).to(model.b_dec.device)).codes > 0
    result.metrics.update(rebind_pairs=0, rebind_fallback=1, rebind_skipped=1,
                          slot_usage=(active[:, model.cfg.n_latents:].sum() / active.sum().clamp_min(1)).item())
    if run_dir:
        io.write_json(Path(run_dir) / "metrics.json", result.metrics)
    return result


@torch.no_grad()
def rebind_(model: BindingSAE, bound: BindingSAE, split, usage: torch.Tensor, seed: int) -> dict:
    """Set `model` to D = the split SAE's first block and, per free slot, M_s and the slot's latents
    from matching its rows to block 1; fall back to `bound` where matching fails."""
    n, S, d = model.n_latents, model.cfg.n_slots, model.d_in
    W = split.decoder_rows().detach().float().cpu()
    U = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    live = usage > MIN_USAGE
    atoms = _most_used(live[:n].nonzero().squeeze(1), usage)
    pool = n + live[n:].nonzero().squeeze(1)
    # with more atoms than dimensions a true map is pinned down: demand cross-validated pairs
    match_cfg = MatchConfig(seed=seed, allow_unpinned=n <= d)
    maps, sources, counts = [], [], []
    for _ in range(1, S):
        subset = _most_used(pool, usage)
        res = match_blocks(U[atoms], U[subset], match_cfg) if min(len(atoms), len(subset)) >= MIN_PAIRS else None
        if res is None or len(res.pairs) < MIN_PAIRS:
            counts.append(0 if res is None else len(res.pairs))
            break
        # the map is pinned down by the validated pairs; every atom then takes its best free row
        cos = (U[:n] @ res.transform.T) @ U[pool].T
        r, c = linear_sum_assignment(cos.numpy(), maximize=True)
        ok = cos[r, c].numpy() >= EXTEND_COS
        r, c = torch.from_numpy(r[ok]), pool[torch.from_numpy(c[ok])]
        counts.append(len(r))
        maps.append(fit_map(U[r], U[c]) if len(r) >= MIN_PAIRS else res.transform)
        src = torch.full((n,), -1, dtype=torch.long)
        src[r] = c
        sources.append(src)
        pool = pool[~torch.isin(pool, c)]

    fallback = len(maps) < S - 1
    if fallback:
        _copy_from_bound(model, bound)
    else:
        model.dictionary.copy_(W[:n])
        _set_transforms(model, torch.stack(maps))
        enc, b_enc = split.W_enc.detach().cpu(), split.b_enc.detach().cpu()
        model.W_enc[:, :n].copy_(enc[:, :n])
        model.b_enc[:n].copy_(b_enc[:n])
        for s, (M, src) in enumerate(zip(maps, sources), start=1):
            matched = src >= 0
            # an atom never seen in slot s keeps its slot-1 detector carried through M
            carried = M @ enc[:, :n]
            model.W_enc[:, s * n : (s + 1) * n].copy_(torch.where(matched, enc[:, src.clamp_min(0)], carried))
            model.b_enc[s * n : (s + 1) * n].copy_(torch.where(matched, b_enc[src.clamp_min(0)], b_enc[:n]))
        model.b_dec.copy_(split.b_dec)
    return {"rebind_pairs": min(counts) if counts else 0, "rebind_fallback": int(fallback)}


def _most_used(rows: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    if len(rows) <= MATCH_ROWS:
        return rows
    return rows[usage[rows].argsort(descending=True)[:MATCH_ROWS]].sort().values


def _set_transforms(model: BindingSAE, maps: torch.Tensor):
    kind = model.cfg.slot_transform
    if kind == "full":
        model.transform_param.copy_(maps)
    elif kind == "orthogonal":  # M = base * exp(0): the nearest orthogonal matrix becomes the base
        u, _, vh = torch.linalg.svd(maps)
        model.transform_base.copy_(u @ vh)
        model.transform_param.zero_()


def _copy_from_bound(model: BindingSAE, bound: BindingSAE):
    model.dictionary.copy_(bound.dictionary)
    _set_transforms(model, bound.free_transforms().detach())
    for name in ("W_enc", "b_enc", "b_dec"):
        getattr(model, name).copy_(getattr(bound, name))


def split_sae(bound: BindingSAE) -> SAE:
    """The flat SAE of `bound`'s sparsity rule over all its n_slots * n_latents codes (per-slot TopK
    becomes TopK with k per slot times n_slots), with its SAE-level options, decoder and encoder."""
    rule = bound.sparsity.flat(bound)
    split = SAE.registry[rule.name](**{**_options(bound.cfg), "n_latents": bound.n_total}, sparsity=rule)
    with torch.no_grad():
        split.load_decoder(bound.flat_decoder(), None)
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(split, name).copy_(getattr(bound, name))
    return split


def _options(cfg: SAEConfig) -> dict:
    """The options every SAE has (d_in, n_latents, decoder handling, dead_tokens), from `cfg`."""
    return {f.name: getattr(cfg, f.name) for f in fields(SAEConfig) if f.name != "rule"}


def _sample(data, options: dict, seed: int) -> torch.Tensor:
    """Up to SAMPLE_ROWS activations (raw units) for usage and the verdicts."""
    hook = options.get("hook") or None
    n_rows = make_store(data, batch_size=1, hook=hook).n_rows
    batch = min(4096, n_rows)
    store = make_store(data, batch_size=batch, seed=seed + 7, hook=hook)
    return torch.cat([store.next_batch() for _ in range(max(1, min(SAMPLE_ROWS, n_rows) // batch))]).float()
