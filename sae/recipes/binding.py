"""How `sae.train` trains a binding SAE by default: standard, find, rebind (or fall back).

A binding SAE trained plainly (gradient descent from random D and M_s) does not find the binding
on a superposed world: which slot-2 direction is the echo M d_a of which atom d_a is a
combinatorial registration problem, and gradient descent on M stalls in one of its many local
optima (RESULTS.md). Graph matching solves it, because an orthogonal M preserves the Gram matrix.
Of the step budget T:

  1. standard (STANDARD_SHARE) a standard SAE of the model's sparsity rule over all its
              n_slots * n_latents codes, from a fresh start: the TopK SAE of the same budget.
              Trained on matrix-bound data it learns every effective atom M_s d_a as its own row
              ("echo features").
  2. find     the evidence search of sae.recipes.matching on its live rows (less the rarely
              used, RARE_USAGE), with the slot partition unknown (`match_within`, the echo
              detector's search, trying first the seeds of rows that never fire together): one map
              between two slots and its pairs; the sources are one slot's rows, and every further
              slot is matched against them as a block (`match_blocks`). Then every live row is
              placed: rows of one atom in different slots become one atom of D, and rows with no
              partner become atoms of their own, so the tied model starts where the standard one
              is. D's frame is the slot those unpartnered rows are exclusive in (one value per
              attribute per object), judged on a sample four times the verdicts' (COFIRE_ROWS): of
              two slots the likelier, of more the one that clearly is (`extras_slot`), else the
              search's first.
  3. rebind   (the rest) the caller's model starts from that D, the fitted M_s and the standard
              SAE's encoder columns, and is trained.

The verdict is truth-free. Where no map is found (fewer than MIN_PAIRS, or than a cross-validated
map needs, ~2d/3), or the rebound model reconstructs worse than the standard one by more than
TIE_MARGIN (`tie_cost`), there is no matrix binding to report: the standard SAE is the result
(trained for the rest of the budget when no map was found), `result.model` and `run_dir/sae` are
that standard SAE, the metrics say `rebind_fallback` = 1, and a warning names it. The caller's
BindingSAE is left holding the standard SAE's most-used rows as a bag (M_s = I, slot 1 only).
The search takes the MATCH_ROWS most-used live rows; where a map could not be validated among so few
(d above ~1,500), the recipe trains the standard SAE for the whole budget (`rebind_skipped` = 1).

Verdicts in the metrics: `rebind_pairs` (smallest count of rows matched to an atom over the free
slots), `rebind_atoms` (atoms placed in D), `tie_cost` (FVU of the tied model minus that of the
standard one on the same sample: large means the data is not matrix-bound), `slot_usage` (share of
active latents in slots >= 2: near 0 means a bag), `rebind_fallback`, `rebind_skipped`,
`rebind_rare_rows` (live rows left out of the first search). With a run_dir the standard phase is
its own resumable run under run_dir/phases/1-standard and the final model is saved in run_dir like
any other run's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from sae.core import files, io
from sae.core.architectures.base import SAE, SAEConfig
from sae.core.architectures.binding import BindingSAE
from sae.recipes.matching import MatchConfig, chance_cos, fit_map, match_blocks, match_within
from sae.core.metrics import batch_metrics
from sae.core.config import OptionError
from sae.core.run_dir import RunDir, is_run
from sae.core.store import make_store
from sae.core.trainer import TrainResult, train_loop

STANDARD_SHARE = 0.75  # of the steps; the rebind (or, without a map, more of the standard SAE) gets the rest
MIN_PAIRS = 8  # fewer matched pairs than this and the match is not trusted
SEEDS = 4000  # seeds the search tries at most (the echo detector's budget)
MIN_USAGE = 1e-3  # latents firing on fewer tokens are dead: their rows only add chance structure
MATCH_ROWS = 1024  # the search costs ~rows² per step (~20 s at 1,024 rows): wider dictionaries are not searched
# live rows firing less than this share of the median live row's rate stay out of the *first* search
# (placement takes them back). At 8,000 steps such rows are mostly half-formed copies of a used row
# (cos 0.6-0.85 with it, off every atom), and their extreme Gram entries fill the seed budget: on w23
# 764 of 794 seeds held one (RESULTS.md §1)
RARE_USAGE = 0.2
EXTEND_COS = 0.7  # once the maps are known, rows are placed where cos(M a, b) reaches this (or chance's level)
TIE_MARGIN = (0.01, 0.1)  # rebound model kept if its FVU <= standard FVU + 0.01 + 10% of it
SAMPLE_ROWS = 16384  # activations for usage, tie cost, slot usage and the first search's co-firing
# activations for the extras' slot. Its evidence is row pairs that never fire together where
# independence expects >= 2 co-activations, and rows on ~0.5% of tokens reach that only on a large
# sample: w21 (8,000 steps) had 713 such extra-row pairs at 16,384 activations and picked the wrong
# frame; at 65,536 it has 10,958 and picks the right one (RESULTS.md §1)
COFIRE_ROWS = 65536
EXCLUSIVE = 0.1  # a row pair co-firing at most this share of its independent expectation never co-fires
# with 3+ slots the extras' slot must out-score every other slot by this factor to become D's frame.
# Measured on the random sample (RESULTS.md §1), so those worlds do not test it independently: on the
# 3-slot w18, extras spread 16/19/17 over its slots, 1.10-1.26-fold, and a forced reframe hurt there
REFRAME_MARGIN = 1.3
PLACE_ROUNDS = 8  # refit-and-place rounds at most; each places the rows the refitted maps now reach
PHASE = "1-standard"


def train_binding(model: BindingSAE, data, **options) -> TrainResult:
    """Train `model` by standard/find/rebind (`options` are sae.train's); returns the final phase's
    TrainResult with the recipe's verdicts in its metrics. Without a map, result.model is the
    standard SAE (see the module docstring)."""
    steps = options["steps"]
    if min(int(STANDARD_SHARE * steps), steps - int(STANDARD_SHARE * steps)) < 1:
        raise ValueError(f"the binding recipe needs at least 3 steps, got {steps} (or use binding_recipe='plain')")
    run_dir, resume = options.get("run_dir", ""), options.get("resume", False)
    if not run_dir:
        return _train_phases(model, data, options)
    files.check_output_dir(run_dir, "training run", is_run)  # refuse before the first phase trains
    with RunDir(run_dir).lock:  # held across phases; each phase's own train() re-enters it
        phases = Path(run_dir) / "phases"
        if not resume and _has_progress(phases):
            raise OptionError("run_dir", f"{run_dir} holds a binding run with finished or checkpointed phases: "
                              "continue it with {resume} or choose another folder", resume="resume")
        return _train_phases(model, data, options)


def _has_progress(phases: Path) -> bool:
    return any(phases.glob("*/metrics.json")) or any(phases.glob("*/checkpoints/step_*/trainer.json"))


def _train_phases(model: BindingSAE, data, options) -> TrainResult:
    options = dict(options)
    steps, seed = options.pop("steps"), options.pop("seed")
    run_dir, resume = options.pop("run_dir", ""), options.pop("resume", False)
    S = model.cfg.n_slots
    first = int(STANDARD_SHARE * steps)
    phases = Path(run_dir) / "phases" if run_dir else None

    def final_phase(m, n_steps, phase_seed):
        return train_loop(m, data, **dict(options, steps=n_steps, seed=phase_seed, binding_recipe="plain",
                                          start="continue", run_dir=run_dir,
                                          resume=resume and (Path(run_dir) / "config.json").exists()))

    # 1. a standard SAE of the model's rule over all S·n codes
    # a map must be cross-validated on ~2d/3 pairs, two rows each, among at most MATCH_ROWS rows
    skipped = 2 * (int(2 * model.d_in / 3) + 1) > MATCH_ROWS
    if skipped:
        warnings.warn(f"binding recipe skipped: in d={model.d_in} a map needs ~{int(2 * model.d_in / 3) + 1} "
                      f"validated pairs but at most {MATCH_ROWS} rows are searched; training a standard SAE",
                      stacklevel=4)
        first = steps
    std = _standard_phase(model, data, dict(options, steps=first, seed=seed, binding_recipe="plain"),
                          run_dir if skipped else "", resume and skipped, None if skipped else phases)
    flat = std.model
    x = _sample(data, options, seed).to(flat.b_dec.device)
    with torch.no_grad():
        active = (flat.encode(x) > 0).cpu()
    usage = active.float().mean(0)
    info = {"rebind_skipped": int(skipped)}
    found = None if skipped else find_slots(flat, usage, active, S, seed, info)
    result = None
    if found is not None:
        cofiring = _cofiring(flat, _batches(data, options, seed, COFIRE_ROWS), found)
        result = _rebind(model, flat, found, cofiring, usage, x, info,
                         lambda: final_phase(model, steps - first, seed + 2))
        if info.get("rebind_fallback") == 0:
            return _finish(result, info, run_dir)
        if result is not None:  # trained, but the tied model does not reconstruct like the standard one
            result = TrainResult(flat, {**std.metrics, **info, "steps": steps}, Path(run_dir) if run_dir else None)
            if run_dir:
                io.save(flat, Path(run_dir) / "sae")
    if result is None:  # no map (or the tied start rejected): the standard SAE gets the rest of the budget
        result = std if skipped else final_phase(flat, steps - first, seed + 2)
    return _fall_back(model, result, info, None if skipped else usage, x, run_dir)


def _rebind(model: BindingSAE, flat: SAE, found: Slots, cofiring: tuple[torch.Tensor, Slots],
            usage: torch.Tensor, x: torch.Tensor, info: dict, final_phase) -> TrainResult | None:
    """Phases 2-3 once a map is found: D's frame (from `cofiring`, see `_cofiring`), the tied start
    from the placed rows, its training (`final_phase()`). Returns the final phase's result, kept
    where the tied model reconstructs like the standard one (info["rebind_fallback"] = 0, else
    info["rebind_rejected"] = 2), or None where the tied start already does not
    (info["rebind_rejected"] = 1)."""
    found = reframe(found, extras_slot(*cofiring))
    info["rebind_atoms"] = found.n_atoms
    carried = init_from_slots_(model, flat, found, usage)
    untied = _fvu(flat, x)
    # the tied start, its carried latents silent, reproduces the standard SAE where the map is real
    info["tie_cost_start"] = _fvu(model, x, silent=carried) - untied
    if not _close(untied + info["tie_cost_start"], untied):
        info["rebind_rejected"] = 1
        return None
    result = final_phase()
    tied = _fvu(model, x)
    info["tie_cost"] = tied - untied
    info["slot_usage"] = _slot_usage(model, x)
    if _close(tied, untied):
        info["rebind_fallback"] = 0
    else:  # no binding to report
        info["rebind_rejected"] = 2
    return result


def _fall_back(model: BindingSAE, result: TrainResult, info: dict, usage: torch.Tensor | None,
               x: torch.Tensor, run_dir: str) -> TrainResult:
    """No matrix binding to report: `result` (a standard SAE) is the answer, the metrics and a
    warning say so, and `model` holds its most-used rows as a bag."""
    info.update(rebind_fallback=1, tie_cost=info.get("tie_cost", 0.0))
    info.setdefault("rebind_pairs", 0)
    info["slot_usage"] = 0.0
    _finish(result, info, run_dir)
    bag_(model, result.model, usage, x)
    warnings.warn(f"binding recipe: no matrix binding found ({_why(info)}); the result (result.model"
                  f"{', run_dir/sae' if run_dir else ''}) is a standard {type(result.model).__name__} with "
                  f"{model.cfg.n_total} latents, and the BindingSAE passed in holds its {model.n_latents} "
                  "most-used rows as a bag", stacklevel=5)
    return result


def _finish(result: TrainResult, info: dict, run_dir: str) -> TrainResult:
    """The recipe's verdicts into the result's metrics (and run_dir/metrics.json)."""
    result.metrics.update(info)
    if run_dir:
        io.write_json(Path(run_dir) / "metrics.json", result.metrics)
    return result


def _standard_phase(model: BindingSAE, data, opts: dict, run_dir: str, resume: bool,
                    phases: Path | None) -> TrainResult:
    """Phase 1: the standard SAE over all n_slots * n_latents codes, trained with `opts`; with
    `phases` as its own resumable run under phases/PHASE (reloaded if it finished before an
    interruption), else in `run_dir` ('' for none)."""
    torch.manual_seed(opts["seed"])
    flat = standard_sae(model)
    if phases is None:
        return train_loop(flat, data, **dict(opts, run_dir=run_dir, resume=resume))
    where = phases / PHASE
    if (where / "metrics.json").exists():
        return TrainResult(io.load(where / "sae"), io.read_json(where / "metrics.json"), where)
    return train_loop(flat, data, **dict(opts, run_dir=str(where), resume=(where / "config.json").exists()))


def _why(info: dict) -> str:
    if info.get("rebind_skipped"):
        return "too many latents to search"
    if info.get("rebind_rejected") == 1:
        return f"the tied start reconstructs worse: tie_cost_start {info['tie_cost_start']:.3f}"
    if info.get("rebind_rejected") == 2:
        return f"the tied model reconstructs worse: tie_cost {info['tie_cost']:.3f}"
    return f"{info.get('rebind_pairs', 0)} pairs matched"


def _close(tied: float, untied: float) -> bool:
    return tied <= untied + TIE_MARGIN[0] + TIE_MARGIN[1] * untied


@torch.no_grad()
def _fvu(m: SAE, x: torch.Tensor, silent: torch.Tensor | None = None) -> float:
    """FVU of m on x; latents in `silent` (bool mask) kept from firing."""
    if silent is not None:
        keep = m.b_enc.detach().clone()
        m.b_enc[silent.to(keep.device)] = -1e4
    out = m(x)
    if silent is not None:
        m.b_enc.copy_(keep)
    return batch_metrics(x, out.x_hat, out.code.l0())["fvu"]


def _slot_usage(m: BindingSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        active = m(x).codes > 0
    return (active[:, m.n_latents:].sum() / active.sum().clamp_min(1)).item()


# -- 2. find the slots ----------------------------------------------------------------------------
@dataclass
class Slots:
    """Where the standard dictionary's live rows sit in a binding model.
    rows (K, S): flat row of (atom, slot), -1 where that slot has none; maps (S, d, d): M_s from the
    frame of slot 1 (maps[0] = I); extras: live rows that are no atom's echo (one slot each)."""
    rows: torch.Tensor
    maps: torch.Tensor
    extras: torch.Tensor

    @property
    def n_atoms(self) -> int:
        return len(self.rows)


def search_config(m: int, seed: int) -> MatchConfig:
    """The echo detector's settings (sae/eval/echo.py, EchoConfig) for a search over m rows, but at
    most SEEDS seeds: without a map every seed is tried (78 s for 300 random rows at 1,639 seeds)."""
    n_seeds = min(SEEDS, int(0.45 * m * (m - 1)) + 1, int(4000 * 192**2 / m**2) + 1)
    return MatchConfig(n_seeds=n_seeds, seed_batch=256, min_cos=0.85, seed=seed)


def search_rows(usage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(live, searched): the MATCH_ROWS most-used rows above MIN_USAGE, and those of them the first
    search takes (usage at least RARE_USAGE times the median live row's), both sorted."""
    live = (usage > MIN_USAGE).nonzero().squeeze(1)
    live = live[usage[live].argsort(descending=True)[:MATCH_ROWS]].sort().values
    if not len(live):
        return live, live
    return live, live[usage[live] >= RARE_USAGE * usage[live].median()]


def never_together(active: torch.Tensor, rows_a: torch.Tensor, rows_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which row pairs (len(rows_a), len(rows_b)) never fire together, and how often independent
    rows would have. One object holds one value of each attribute, so two values of one attribute
    in one slot never co-fire, and rows of other attributes or slots only by chance. 'Never' is at
    most EXCLUSIVE times the independent expectation, where that is at least 2 co-activations
    (fewer is no evidence). `active` (samples, latents) bool."""
    A = active.float()
    f = A.mean(0)
    together = A[:, rows_a].T @ A[:, rows_b]
    expected = len(A) * f[rows_a, None] * f[None, rows_b]
    return (together <= EXCLUSIVE * expected) & (expected >= 2), expected


@torch.no_grad()
def find_slots(flat: SAE, usage: torch.Tensor, active: torch.Tensor, n_slots: int, seed: int,
               info: dict) -> Slots | None:
    """Search the standard SAE's live rows for n_slots slots related by orthogonal maps; None (and
    the reason in `info`) where there are none to trust. `active` (samples, latents): which rows
    fired on a sample, so that the first search tries first the seeds whose two sources and two
    targets never fire together (two values of one attribute in one slot)."""
    W = flat.decoder_rows().detach().float().cpu()
    U = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = U.shape[1]
    live, searched = search_rows(usage)
    info["rebind_rare_rows"] = len(live) - len(searched)
    # as the echo detector: with the partition unknown, fewer than d pairs are within chance's reach
    # (15-16 pairs in random 150- and 300-row dictionaries in d = 22 pass cross-validation). With three
    # or more slots the first map may have fewer, down to what cross-validation needs (~2d/3): every
    # further slot must then be found as a block against its sources, which chance does not do, and
    # between two of four slots a world often has only ~d atoms to pair
    validated = max(MIN_PAIRS, int(2 * d / 3) + 1)
    need = max(MIN_PAIRS, d) if n_slots == 2 else validated
    info["rebind_pairs"] = 0
    if len(searched) < 2 * need:
        return None
    g = torch.Generator().manual_seed(seed)
    exclusive = never_together(active, searched, searched)[0]
    first = match_within(U[searched], search_config(len(searched), seed), min_pairs=need, enough=d,
                         exclusive=exclusive)
    if len(first.pairs) < need:
        info["rebind_pairs"] = len(first.pairs)
        return None
    # slot 1 = the sources' slot, slot 2 = the targets'; rows[a, s] = a global flat row or -1
    rows = torch.full((len(first.pairs), n_slots), -1, dtype=torch.long)
    rows[:, 0], rows[:, 1] = searched[first.pairs[:, 0]], searched[first.pairs[:, 1]]
    maps = [torch.eye(d), first.transform]
    thr = chance_cos(U[live], g, EXTEND_COS)
    rows = _place(U, live, rows, maps, thr)
    counts = [int((rows[:, 1] >= 0).sum())]
    for s in range(2, n_slots):  # every further slot against slot 1's rows, as a block
        free = live[~torch.isin(live, rows[rows >= 0])]
        anchor = rows[rows[:, 0] >= 0, 0]
        # the partition is known here (slot 1's rows against the rest): a cross-validated map suffices
        res = match_blocks(U[anchor], U[free], MatchConfig(seed=seed)) if len(free) >= validated else None
        if res is None or len(res.pairs) < validated:
            info["rebind_pairs"] = 0 if res is None else len(res.pairs)
            return None
        atom = (rows[:, 0][:, None] == anchor[res.pairs[:, 0]][None, :]).float().argmax(0)
        rows[atom, s] = free[res.pairs[:, 1]]
        maps.append(res.transform)
        rows = _place(U, live, rows, maps, thr)
        counts.append(int((rows[:, s] >= 0).sum()))
    # Each map was fitted on the rows of atoms it shares with slot 1: with several slots fewer than d,
    # so it is pinned only on their span and misplaces the other atoms' rows. Refit every map on all
    # atoms with a row in its slot and another (generalised Procrustes), place again, and repeat
    # while rows are placed: each round's atoms widen the span the maps are fitted on
    M = torch.stack(maps)
    for _ in range(PLACE_ROUNDS):
        M = refit_maps(U, rows, M, validated)
        placed = int((rows >= 0).sum())
        rows = _place(U, live, rows, list(M), thr)
        if int((rows >= 0).sum()) == placed:
            break
    extras = live[~torch.isin(live, rows[rows >= 0])]
    info["rebind_pairs"] = min(counts)
    return Slots(rows, M, extras)


def refit_maps(U: torch.Tensor, rows: torch.Tensor, M: torch.Tensor, min_rows: int) -> torch.Tensor:
    """M_s (s >= 2) refitted on the atoms with a row in slot s and in another slot, each atom seen
    through its *other* slots' rows (so a map is not fitted to itself); slot 1 stays D's frame."""
    M = M.clone()
    for s in range(1, len(M)):
        others = rows.clone()
        others[:, s] = -1
        has = (rows[:, s] >= 0) & (others >= 0).any(1)
        if has.sum() >= min_rows:
            M[s] = fit_map(_atoms(U, others[has], M), U[rows[has, s]])
    return M


def extras_slot(active: torch.Tensor, slots: Slots) -> int:
    """The slot that the rows with no partner (`slots.extras`) most likely come from, from which
    rows they never fire with. One object holds one value of each attribute, so a latent is
    exclusive with the other values of its attribute in its own slot, and only by chance in the
    others: per slot, the co-activations expected under independence (E >= 2) that did not happen
    (count <= EXCLUSIVE * E), summed over the extras and over the atoms with a row in every slot.
    Without it the extras enter D in the search's source frame, which is arbitrary: on a world with
    atoms held out of slot 2 they then sit in the wrong frame and M maps them astray (RESULTS.md §1).
    With three or more slots, where no slot out-scores the others by REFRAME_MARGIN (extras spread
    over slots, where one frame cannot suit them all), slot 1 stays: 0 is returned."""
    complete = (slots.rows >= 0).all(1)
    if not len(slots.extras) or not complete.any():
        return 0
    score = []
    for s in range(slots.rows.shape[1]):  # co-activations with this slot's rows only
        missing, expected = never_together(active, slots.extras, slots.rows[complete, s])
        score.append((missing * expected).sum())
    score = torch.stack(score)
    if len(score) == 2:
        # the search's source slot is a coin flip, so the better-scoring slot wins however narrowly
        # (w22: 1.11- and 1.26-fold for the slot holding 26 of 39 and 31 of 44 extras, RESULTS.md §1)
        return int(score.argmax())
    best, second = score.topk(2).values
    return int(score.argmax()) if best >= REFRAME_MARGIN * second else 0


def reframe(slots: Slots, t: int) -> Slots:
    """The same placement with slot t as D's frame (slot 1): a' = M_t a, so M'_s = M_s M_t^T."""
    if t == 0:
        return slots
    order = [t] + [s for s in range(slots.rows.shape[1]) if s != t]
    return Slots(slots.rows[:, order], slots.maps[order] @ slots.maps[t].T, slots.extras)


def _place(U, live, rows, maps, thr) -> torch.Tensor:
    """Grow `rows` (K, S) with the known maps: each atom missing a slot takes the free live row best
    aligned with M_s d_a (Hungarian, cos >= thr); then free rows that are each other's image under
    M_t M_s^T (for slots s < t) become new atoms."""
    S_known = len(maps)
    M = torch.stack(maps)
    for _ in range(2):
        D = _atoms(U, rows, M)
        for s in range(S_known):
            free = live[~torch.isin(live, rows[rows >= 0])]
            missing = (rows[:, s] < 0).nonzero().squeeze(1)
            if not len(free) or not len(missing):
                continue
            C = (D[missing] @ M[s].T) @ U[free].T
            r, c = linear_sum_assignment(C.numpy(), maximize=True)
            ok = C[r, c].numpy() >= thr
            rows[missing[r[ok]], s] = free[c[ok]]
        for s in range(S_known):
            for t in range(S_known):
                if s == t:
                    continue
                free = live[~torch.isin(live, rows[rows >= 0])]
                if len(free) < 2:
                    break
                C = (U[free] @ (M[t] @ M[s].T).T) @ U[free].T
                C.fill_diagonal_(-1)
                r, c = linear_sum_assignment(C.numpy(), maximize=True)
                ok = C[r, c].numpy() >= thr
                # a row is a source or a target: keep the best of two pairs that share a row
                taken, new = set(), []
                for i in torch.argsort(torch.from_numpy(C[r, c].numpy()), descending=True).tolist():
                    if ok[i] and r[i] not in taken and c[i] not in taken:
                        taken.update((r[i], c[i]))
                        new.append((free[r[i]], free[c[i]]))
                if new:
                    add = torch.full((len(new), rows.shape[1]), -1, dtype=torch.long)
                    add[:, s] = torch.tensor([a for a, _ in new])
                    add[:, t] = torch.tensor([b for _, b in new])
                    rows = torch.cat([rows, add])
    return rows


def _atoms(U, rows, M) -> torch.Tensor:
    """(K, d) unit atoms in slot 1's frame: the mean of each atom's rows pulled back through M_s."""
    K, d = rows.shape[0], U.shape[1]
    acc = torch.zeros(K, d)
    for s in range(len(M)):
        has = rows[:, s] >= 0
        acc[has] += U[rows[has, s]] @ M[s]  # rows of U are M_s d_a: d_a = M_s^T u, row form u M_s
    return acc / acc.norm(dim=1, keepdim=True).clamp_min(1e-12)


# -- 3. the tied model from the placed rows ------------------------------------------------------
@torch.no_grad()
def init_from_slots_(model: BindingSAE, flat: SAE, slots: Slots, usage: torch.Tensor) -> torch.Tensor:
    """D = [atoms; extras; unused rows], M_s = the maps, encoder columns from the standard SAE's
    (carried through M_s where an atom has no row in a slot), b_dec as the standard SAE's. Returns
    the (n_slots * n_latents,) mask of latents whose encoder was carried (no row of their own)."""
    n, S, d = model.n_latents, model.cfg.n_slots, model.d_in
    W = flat.decoder_rows().detach().float().cpu()
    norm = W.norm(dim=1).mean()
    U = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    enc, b_enc = flat.W_enc.detach().float().cpu(), flat.b_enc.detach().float().cpu()
    M = slots.maps
    atoms_u = (usage[slots.rows.clamp_min(0)] * (slots.rows >= 0)).sum(1)
    order = atoms_u.argsort(descending=True)
    rows = slots.rows[order][:n]
    extras = slots.extras[usage[slots.extras].argsort(descending=True)][: n - len(rows)]
    taken = torch.cat([rows[rows >= 0], extras])
    rest = torch.ones(len(W), dtype=torch.bool)
    rest[taken] = False
    unused = rest.nonzero().squeeze(1)[: n - len(rows) - len(extras)]  # dead rows fill the dictionary
    K = len(rows)

    D = torch.cat([_atoms(U, rows, M), U[extras], U[unused]]) * norm
    W_enc = torch.zeros(d, S * n)
    b = torch.zeros(S * n)
    carried = torch.ones(S * n, dtype=torch.bool)
    # the source of each latent's encoder column: a row of (atom, slot), else the atom's first row
    # carried through M_s M_t^T
    for s in range(S):
        for i in range(K):
            if rows[i, s] >= 0:
                W_enc[:, s * n + i], b[s * n + i] = enc[:, rows[i, s]], b_enc[rows[i, s]]
                carried[s * n + i] = False
            else:
                t = int((rows[i] >= 0).nonzero()[0])
                W_enc[:, s * n + i] = M[s] @ (M[t].T @ enc[:, rows[i, t]])
                b[s * n + i] = b_enc[rows[i, t]]
        single = torch.cat([extras, unused])
        cols = enc[:, single]
        W_enc[:, s * n + K: (s + 1) * n] = cols if s == 0 else M[s] @ cols
        b[s * n + K: (s + 1) * n] = b_enc[single]
    carried[K: K + len(extras)] = False                 # extras are slot 1's rows
    model.dictionary.copy_(D)
    _set_transforms(model, M[1:])
    model.W_enc.copy_(W_enc)
    model.b_enc.copy_(b)
    model.b_dec.copy_(flat.b_dec.detach().float().cpu())
    return carried


def _set_transforms(model: BindingSAE, maps: torch.Tensor):
    kind = model.cfg.slot_transform
    if kind == "full":
        model.transform_param.copy_(maps)
    elif kind == "orthogonal":  # M = base * exp(0): the nearest orthogonal matrix becomes the base
        u, _, vh = torch.linalg.svd(maps)
        model.transform_base.copy_(u @ vh)
        model.transform_param.zero_()


@torch.no_grad()
def bag_(model: BindingSAE, flat: SAE, usage: torch.Tensor | None, x: torch.Tensor) -> None:
    """Without a map: the caller's BindingSAE holds the standard SAE's n most-used rows in slot 1
    with M_s = I and silent slots >= 2 (a bag of concepts, half the standard SAE or less)."""
    n, S, d = model.n_latents, model.cfg.n_slots, model.d_in
    if usage is None:
        usage = (flat.encode(x) > 0).float().mean(0).cpu()
    top = usage.argsort(descending=True)[:n]
    model.dictionary.copy_(flat.decoder_rows().detach().float().cpu()[top])
    _set_transforms(model, torch.eye(d).expand(S - 1, d, d))
    model.W_enc.zero_()
    model.b_enc.fill_(-1e4)  # slots >= 2 never fire
    model.W_enc[:, :n].copy_(flat.W_enc.detach().float().cpu()[:, top])
    model.b_enc[:n].copy_(flat.b_enc.detach().float().cpu()[top])
    model.b_dec.copy_(flat.b_dec.detach().float().cpu())


def standard_sae(model: BindingSAE) -> SAE:
    """A fresh flat SAE of `model`'s sparsity rule over all its n_slots * n_latents codes (per-slot
    TopK becomes TopK with k per slot times n_slots), with its SAE-level options."""
    rule = model.sparsity.flat(model)
    return SAE.registry[rule.name](**{**_options(model.cfg), "n_latents": model.n_total}, sparsity=rule)


def _options(cfg: SAEConfig) -> dict:
    """The options every SAE has (d_in, n_latents, decoder handling, dead_tokens), from `cfg`."""
    return {f.name: getattr(cfg, f.name) for f in fields(SAEConfig) if f.name != "rule"}


def _sample(data, options: dict, seed: int) -> torch.Tensor:
    """Up to SAMPLE_ROWS activations (raw units) for usage and the verdicts."""
    return torch.cat(list(_batches(data, options, seed, SAMPLE_ROWS)))


def _batches(data, options: dict, seed: int, n: int):
    """Up to n activations (raw units) in batches of up to 4,096; the first SAMPLE_ROWS are `_sample`'s."""
    hook = options.get("hook") or None
    n_rows = make_store(data, batch_size=1, hook=hook).n_rows
    batch = min(4096, n_rows)
    store = make_store(data, batch_size=batch, seed=seed + 7, hook=hook)
    for _ in range(max(1, min(n, n_rows) // batch)):
        yield store.next_batch().float()


@torch.no_grad()
def _cofiring(flat: SAE, batches, slots: Slots) -> tuple[torch.Tensor, Slots]:
    """(active, slots renumbered) for `extras_slot`: which of the placed and extra rows fire on each
    activation of `batches` (only those columns, so a large sample stays small), and `slots` with its
    rows numbered as those columns."""
    rows = torch.cat([slots.rows[slots.rows >= 0], slots.extras]).unique()
    active = torch.cat([(flat.encode(b.to(flat.b_dec.device)) > 0)[:, rows.to(flat.b_dec.device)].cpu()
                        for b in batches])
    column = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)
    column[rows] = torch.arange(len(rows))
    renumbered = torch.where(slots.rows >= 0, column[slots.rows.clamp_min(0)], slots.rows)
    return active, Slots(renumbered, slots.maps, column[slots.extras])
