"""A one-file HTML report of a training run: curves, densities, decoder norms, binding structure.

    python -m sae.eval.report RUN_DIR                      # writes RUN_DIR/report.html
    python -m sae.eval.report RUN_DIR --out r.html --labels world_labels.safetensors

RUN_DIR is what `sae.train(..., run_dir=...)` writes (config.json, log.jsonl, metrics.json, sae/).
The report is ONE self-contained HTML file (PNGs embedded as base64), written atomically. Sections:

    run               metrics.json and the config as tables
    training curves   loss parts, FVU, L0, dead share, LR (and the L0 controller's multiplier); for a
                      binding SAE trained by the binding recipe (sae/recipes/binding.py) the standard
                      phase's log (RUN_DIR/phases/1-standard/log.jsonl) comes first, phases marked
    feature density   histogram of log10 firing rates from sae/sparsity.safetensors, per slot
    decoder norms     rows of W_dec; for a BindingSAE D's rows and the flat [D; M_2 D; ...] rows
    slot transforms   BindingSAE: singular values of each M_s and of M_s - I
    latent x label    how well each SAE slot's latents pick out each (object, attribute=value)

The latent x label heatmap. A label is "object j has attribute value v" (e.g. object 1 colour=red),
true or false on each row. For a latent i, firing means z_i > 0. The cell for (SAE slot s, label) is

    max over latents i of SAE slot s   of   corr(1[z_i > 0], 1[label])      (phi / Matthews coefficient)

0 = no latent of slot s fires in step with the label, 1 = one latent fires on exactly those rows.
Unlike F1 it does not grow with the label's base rate, so rare and common values compare. A binding
SAE that keeps objects apart shows, for each SAE slot, one bright object row (up to relabelling of
slots); a bag-of-features code lights every object row of every slot equally.

Labels come from (a) a scenes activation cache (source "generator"): the scenes are regenerated
from the manifest's (n_sequences, seed, split) with sae/scenes.py and matched by seq_index, using
the rows at the separator position, where the scenes model holds the whole scene; or (b) a labels
file (--labels), for synthetic worlds or anything else:

    labels.safetensors   "labels": (N, G) integer, value index per group, -1 = absent
                         "x" (optional): (N, d_in) activations; without it, rows 0..N-1 of the
                         run's activation cache
    labels.json          {"groups": [{"slot": 0, "family": "colour", "values": ["red", ...]}, ...],
                          "slot_names": ["object 1", ...] (optional)}   -- one group per column

For an eval/worlds.py world:

    test = world.sample(4096, seed=1, split="all")
    write_labels("w.safetensors", *world_labels(world, test), x=test.x)   # + w.json, the legend

Missing pieces (no log.jsonl, no dictionary, not a binding SAE, no labels) skip their section with
a note; a directory that is not a run directory, or a --labels file that cannot be used, is an
error: one line on stderr, exit status 2, nothing written.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sae.core import files
from sae.core.config import argument, option, parse_config
from sae.core import io as sae_io
from sae.core.io import LoadError, read_safetensors
from sae.core.store import CacheError, open_cache
from sae.lm import scenes


@dataclass
class ReportConfig:
    run_dir: str = argument("directory written by sae.train(run_dir=...) / train.py --run-dir")
    out: str = option("", "output HTML file ('' = RUN_DIR/report.html)")
    labels: str = option("", "per-row labels .safetensors for the latent x label heatmap (see the module docstring)")
    legend: str = option("", "legend JSON for --labels ('' = the labels file with a .json suffix)")
    max_rows: int = option(8192, "rows used for the latent x label heatmap")
    batch_size: int = option(1024, "rows encoded at a time")


def parse_args(argv=None) -> ReportConfig:
    return parse_config(ReportConfig, argv, "python -m sae.eval.report",
                        "Write a self-contained HTML report of a training run directory.", positional=("run_dir",))


class ReportError(Exception):
    """Bad input: the message is one line saying what and where."""


@dataclass
class Section:
    title: str
    caption: str = ""                          # what the figure shows (HTML-escaped on output)
    pngs: list[bytes] = field(default_factory=list)
    table_html: str = ""
    skipped: str = ""                          # why there is nothing to show


# ---- reading the run ----------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: dict
    log: list[dict] | None = None
    log_note: str = ""
    metrics: dict | None = None
    metrics_note: str = "no metrics.json (the run has not finished)"
    model: object = None                       # sae.SAE, or None with model_note saying why
    model_note: str = ""
    log_density: torch.Tensor | None = None
    # earlier phases of a recipe-trained run (sae/recipes/binding.py): (name, steps, log rows or None), in order
    phases: list[tuple[str, int, list[dict] | None]] = field(default_factory=list)


def read_log(log_file: Path) -> tuple[list[dict] | None, str]:
    """(rows with a step, note): a run killed mid-write leaves a torn last line, skipped."""
    if not log_file.is_file():
        return None, f"no {log_file.name} in the run directory"
    rows, bad = [], 0
    for line in log_file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    rows = [r for r in rows if isinstance(r, dict) and "step" in r] or None
    if rows is None:
        return None, f"{log_file.name} holds no log steps"
    return rows, f"{bad} unreadable line(s) skipped" if bad else ""


def read_phases(path: Path) -> list[tuple[str, int, list[dict] | None]]:
    """The phases the binding recipe trained before the final one, each a run directory under phases/."""
    out = []
    for d in sorted(p for p in (path / "phases").glob("*") if p.is_dir()) if (path / "phases").is_dir() else []:
        log, _ = read_log(d / "log.jsonl")
        steps = None
        for name, key in (("metrics.json", ("steps",)), ("config.json", ("train", "steps"))):
            try:
                value = json.loads((d / name).read_text())
                for k in key:
                    value = value[k]
                steps = int(value)
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if steps is None:
            steps = int(log[-1]["step"]) if log else 0
        out.append((d.name, steps, log))
    return out


def read_run(path: Path) -> Run:
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        hint = " (it looks like a dictionary directory; pass the run directory above it)" if (
            path / "cfg.json").is_file() else ""
        raise ReportError(f"{path}: not a run directory (no config.json, which sae.train writes first){hint}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise ReportError(f"{path / 'config.json'}: not a run config (no 'architecture')")
    run = Run(path, config)

    run.log, run.log_note = read_log(path / "log.jsonl")
    run.phases = read_phases(path)

    if (path / "metrics.json").is_file():
        try:
            run.metrics = json.loads((path / "metrics.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            run.metrics_note = f"metrics.json is not valid JSON ({e})"

    if not (path / "sae").is_dir():
        run.model_note = "no sae/ dictionary (the run has not finished)"
    else:
        try:
            run.model = sae_io.load(path / "sae")
            run.log_density = sae_io.load_sparsity(path / "sae")
        except sae_io.LoadError as e:
            run.model_note = f"the dictionary did not load: {e}"
    return run


def is_binding(model) -> bool:
    return model is not None and hasattr(model, "slot_transforms")


# ---- labels -------------------------------------------------------------------------------------
@dataclass
class Labels:
    x: torch.Tensor            # (N, d_in) activations
    labels: torch.Tensor       # (N, G) long, -1 = absent
    groups: list[dict]         # G of {"slot": int, "family": str, "values": [str, ...]}
    slot_names: list[str]
    source: str                # one line for the caption


def read_legend(path: Path, n_groups: int) -> tuple[list[dict], list[str]]:
    try:
        legend = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: legend file not found (pass --legend)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    groups = legend.get("groups") if isinstance(legend, dict) else None
    if not isinstance(groups, list) or len(groups) != n_groups:
        raise ReportError(f"{path}: needs 'groups', a list of {n_groups} entries (one per labels column)")
    for i, g in enumerate(groups):
        if not (isinstance(g, dict) and isinstance(g.get("slot"), int) and g["slot"] >= 0
                and isinstance(g.get("family"), str) and isinstance(g.get("values"), list) and g["values"]):
            raise ReportError(f"{path}: group {i} needs an integer 'slot' >= 0, a 'family' name and a list of 'values'")
    n_slots = max(g["slot"] for g in groups) + 1
    names = legend.get("slot_names") or [f"object {j + 1}" for j in range(n_slots)]
    if not isinstance(names, list) or len(names) < n_slots:
        raise ReportError(f"{path}: 'slot_names' must list a name for each of the {n_slots} slots the groups use")
    return groups, [str(n) for n in names]


def labels_from_file(cfg: ReportConfig, run: Run) -> Labels:
    path = Path(cfg.labels)
    try:
        tensors = read_safetensors(path)
    except LoadError as e:
        raise ReportError(str(e)) from None
    labels = tensors.get("labels")
    if (labels is None or labels.dim() != 2 or labels.dtype.is_floating_point or labels.dtype == torch.bool
            or 0 in labels.shape):
        raise ReportError(f"{path}: needs a non-empty integer tensor 'labels' of shape (rows, groups)")
    groups, slot_names = read_legend(Path(cfg.legend) if cfg.legend else path.with_suffix(".json"), labels.shape[1])
    for i, g in enumerate(groups):
        col = labels[:, i]
        if col.numel() and (col.min() < -1 or col.max() >= len(g["values"])):
            raise ReportError(f"{path}: column {i} ({g['family']}) holds values outside -1..{len(g['values']) - 1}")
    n = min(labels.shape[0], cfg.max_rows)
    if "x" in tensors:
        x = tensors["x"]
        if x.dim() != 2 or x.shape[0] != labels.shape[0]:
            raise ReportError(f"{path}: 'x' must be (rows, d_in) with as many rows as 'labels' ({labels.shape[0]})")
        x, source = x[:n], f"{path.name} ('x' and 'labels', {n} rows)"
    else:
        data = run.config.get("data", {})
        if "cache" not in data:
            raise ReportError(f"{path}: no 'x' tensor, and the run was trained on an in-memory tensor; "
                              "store the activations as 'x' in the labels file")
        cache = open_run_cache(run)
        if cache.n_rows < n:
            raise ReportError(f"{path}: {n} label rows but the run's cache has only {cache.n_rows}")
        x, source = cache.read(run_hook(run, cache), 0, n), f"{path.name} with rows 0..{n - 1} of {cache.path}"
    if x.shape[1] != run.model.d_in:
        raise ReportError(f"{path}: activations have d_in={x.shape[1]}, the dictionary expects {run.model.d_in}")
    return Labels(x.float(), labels[:n].long(), groups, slot_names, source)


def open_run_cache(run: Run):
    try:
        return open_cache(run.config["data"]["cache"], verify=False)
    except CacheError as e:
        raise ReportError(f"the run's activation cache: {e}") from None


def run_hook(run: Run, cache) -> str:
    hook = run.config.get("data", {}).get("hook") or run.config.get("train", {}).get("hook")
    return hook or cache.hook_names[0]


def regenerate_scenes(source: dict, n: int):
    """The first n scenes of a scenes cache's source (generation is sequential, so a prefix suffices)."""
    if n > int(source["n_sequences"]):
        raise ReportError(f"cache rows name sequence {n - 1}, the source has {source['n_sequences']}")
    return scenes.sample_batch(n, int(source["seed"]), source["split"])


def check_scene_tokens(batch, seq_index: torch.Tensor, position: torch.Tensor, token_ids: torch.Tensor):
    """Raise ReportError unless the cached tokens are those of the regenerated scenes."""
    same = batch.tokens[seq_index.long(), position.long()] == token_ids.long()
    if not same.all():
        r = int((~same).nonzero()[0])
        raise ReportError(f"cached token ids differ from the regenerated scenes (sequence {int(seq_index[r])}, "
                          f"position {int(position[r])}): sae/scenes.py changed since the cache was written?")


def scene_labels(batch, seq_index: torch.Tensor) -> tuple[torch.Tensor, list[dict], list[str]]:
    """(object, attribute) labels of the scenes `seq_index` of `batch`: one group per (object, family)."""
    labels = batch.attributes[seq_index.long()].reshape(len(seq_index), -1)  # -1 where there is no object
    groups = [{"slot": j, "family": a, "values": list(scenes.FAMILIES[a])}
              for j in range(scenes.MAX_OBJECTS) for a in scenes.ATTRIBUTES]
    return labels, groups, [f"object {j + 1}" for j in range(scenes.MAX_OBJECTS)]


def labels_from_scenes_cache(cfg: ReportConfig, run: Run) -> Labels | str:
    """Labels for a run trained on a scenes cache, or a note saying why there are none."""
    if "cache" not in run.config.get("data", {}):
        return "the run was trained on an in-memory tensor; pass --labels to draw this heatmap"
    try:
        cache = open_run_cache(run)
    except ReportError as e:  # moved or deleted since training: the rest of the report still stands
        return str(e)
    source = cache.manifest.get("source", {})
    if source.get("kind") != "generator" or "scenes.generate_tokens" not in str(source.get("function", "")):
        return f"the run's cache ({cache.path}) is not a scenes cache; pass --labels to draw this heatmap"
    seq_index, position, token_ids = (cache.read(c) for c in ("seq_index", "position", "token_ids"))
    rows = (position == scenes.SEP_POS).nonzero().squeeze(1)[: cfg.max_rows]
    if len(rows) == 0:
        return f"the scenes cache holds no rows at the separator position {scenes.SEP_POS}"
    # Check the regenerated scenes against the cached tokens of the same sequences (the separator
    # rows alone would not do: their token is always ".").
    check = torch.isin(seq_index, seq_index[rows])
    try:
        batch = regenerate_scenes(source, int(seq_index[rows].max()) + 1)
        check_scene_tokens(batch, seq_index[check], position[check], token_ids[check])
    except ReportError as e:
        return f"labels could not be recovered from the scenes cache: {e}"
    checked = int((check & (position != scenes.SEP_POS)).sum())
    # Rows at one position are spread through the cache: read in contiguous chunks, keep ours.
    hook, chunk, parts = run_hook(run, cache), 65536, []
    for start in range(0, int(rows[-1]) + 1, chunk):
        sel = rows[(rows >= start) & (rows < start + chunk)] - start
        if len(sel):
            parts.append(cache.read(hook, start, min(start + chunk, cache.n_rows))[sel])
    labels, groups, names = scene_labels(batch, seq_index[rows])
    where = (f"{len(rows)} rows of {cache.path} at the separator position {scenes.SEP_POS} ({source['split']} split); "
             + (f"labels regenerated with sae/scenes.py and checked against {checked} cached scene tokens"
                if checked else "labels regenerated with sae/scenes.py (not checkable: the cache holds no other "
                "positions of these scenes)"))
    return Labels(torch.cat(parts).float(), labels, groups, names, where)


def world_labels(world, samples) -> tuple[torch.Tensor, dict]:
    """(labels (N, S*F), legend) for eval/worlds.py samples: group (slot s, family f) holds the index
    within family f of the atom present in slot s, -1 where that slot carries no member of f."""
    coefs = samples.coefs                                  # (N, S, n_atoms)
    columns, groups = [], []
    for s in range(coefs.shape[1]):
        for f in range(int(world.family.max()) + 1):
            members = (world.family == f).nonzero().squeeze(1)
            present = coefs[:, s, members] > 0            # at most one member per (slot, family)
            columns.append(torch.where(present.any(1), present.float().argmax(1), torch.tensor(-1)))
            groups.append({"slot": s, "family": f"family {f + 1}", "values": [str(i) for i in range(len(members))]})
    legend = {"groups": groups, "slot_names": [f"world slot {s + 1}" for s in range(coefs.shape[1])]}
    return torch.stack(columns, 1).long(), legend


def write_labels(path, labels: torch.Tensor, legend: dict, x: torch.Tensor | None = None) -> Path:
    """Write a labels file (and its legend beside it, same name with .json) for --labels."""
    path = Path(path)
    tensors = {"labels": labels.long().contiguous()}
    if x is not None:
        tensors["x"] = x.float().contiguous()
    files.save_safetensors(path, tensors)
    files.write_json(path.with_suffix(".json"), legend, indent=1)
    return path


# ---- measures -----------------------------------------------------------------------------------
@torch.no_grad()
def firing_counts(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(co, nf): co[l, i] = rows where latent i fires and label l holds, nf[i] = rows where latent i
    fires. Accumulated a batch at a time, so rows x latents is never held (float32 counts are exact
    below 2^24 rows)."""
    co, nf = 0, 0
    for i in range(0, len(x), batch_size):
        fires = (model.encode(x[i: i + batch_size]) > 0).float()
        co = co + y[i: i + batch_size].T.float() @ fires
        nf = nf + fires.sum(0)
    return co.double(), nf.double()


def label_indicators(lab: Labels) -> tuple[torch.Tensor, list[tuple[int, str, str]]]:
    """(N, L) 0/1 matrix, one column per (group, value), and (slot, family, value) per column."""
    cols, keys = [], []
    for g, group in enumerate(lab.groups):
        for v, name in enumerate(group["values"]):
            cols.append(lab.labels[:, g] == v)
            keys.append((group["slot"], group["family"], str(name)))
    return torch.stack(cols, 1).double(), keys


def best_latent_correlation(co: torch.Tensor, ny: torch.Tensor, nf: torch.Tensor, n: int,
                            n_slots: int) -> torch.Tensor:
    """(n_slots, L): max over each slot's latents of the phi coefficient between firing and label,
    from counts over n rows: co (L, latents) both, ny (L,) label, nf (latents,) firing.

    phi = (n co - ny nf) / sqrt(ny (n - ny) nf (n - nf)), Pearson's correlation of two 0/1 variables.
    A latent that never (or always) fires scores 0; a label that is never (or always) true gives NaN."""
    ny, nf = ny.double()[:, None], nf.double()[None, :]
    denom = (ny * (n - ny) * nf * (n - nf)).sqrt()
    phi = torch.where(denom > 0, (n * co - ny * nf) / denom.clamp_min(1e-300), torch.zeros_like(co))
    best = phi.reshape(len(co), n_slots, -1).amax(2).T
    constant = (ny[:, 0] == 0) | (ny[:, 0] == n)          # a label on no row (or every row) says nothing
    return best.masked_fill(constant[None, :], float("nan"))


# ---- figures (matplotlib's object API: no pyplot state, no display needed) ------------------------
def new_figure(w: float, h: float):
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


SLOT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
LOSS_KEYS_SKIP = {"step", "fvu", "l0", "dead_share", "lr", "sparsity_coeff_mult", "time"}


def log_axis_if_wide(ax, values: np.ndarray) -> str:
    """Log y when the positive values span more than a decade (with plain-number ticks at 1, 2, 5 x
    10^k), else linear: a log axis over less than a decade labels one tick or none. Returns the title
    suffix saying which."""
    from matplotlib import ticker  # noqa: PLC0415

    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0 or v.max() < 10 * v.min():
        return ""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    return " (log)"


def training_curves(log: list[dict], boundaries: list[tuple[int, str]] = ()) -> bytes:
    """`boundaries`: (first step, name) of each phase of a multi-phase run, drawn as dotted lines
    and named in the loss panel. (The caller joins the phases' logs with a row holding only a step
    between them, so every curve breaks at a phase change instead of running into the next.)"""
    steps = np.array([r["step"] for r in log], dtype=float)

    def series(key):
        return np.array([r.get(key, np.nan) for r in log], dtype=float)

    # keys of every row, not only the last: phases of a recipe-trained run log different parts
    loss_keys = list(dict.fromkeys(k for r in log for k in r
                                   if k not in LOSS_KEYS_SKIP and isinstance(r[k], (int, float))))
    mult = series("sparsity_coeff_mult")
    show_mult = np.nanmax(mult) != np.nanmin(mult) if np.isfinite(mult).any() else False
    panels = ["loss", "fvu", "l0", "dead_share", "lr"] + (["mult"] if show_mult else [])
    fig = new_figure(12, 6.5)
    axes = fig.subplots(2, 3).ravel()
    for ax, panel in zip(axes, panels):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel == "loss":
            loss_panel(ax, steps, {k: series(k) for k in loss_keys})
        elif panel == "fvu":
            v = series("fvu")
            ax.plot(steps, v, color="tab:red")
            ax.set_title("FVU, training batch" + log_axis_if_wide(ax, v))
        elif panel == "l0":
            ax.plot(steps, series("l0"), color="tab:green")
            ax.set_title("L0: active latents per token")
            ax.set_ylim(bottom=0)
        elif panel == "dead_share":
            ax.plot(steps, 100 * series("dead_share"), color="tab:purple")
            ax.set_title("dead latents (% of all)")
            ax.set_ylabel("%")
            ax.set_ylim(-2, 102)
        elif panel == "lr":
            ax.plot(steps, series("lr"), color="tab:gray")
            ax.set_title("learning rate")
            ax.set_ylim(bottom=0)
        else:
            ax.plot(steps, mult, color="tab:brown")
            ax.set_title("sparsity-coefficient multiplier (L0 control)" + log_axis_if_wide(ax, mult))
    mark_phases(axes[: len(panels)], boundaries)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return png(fig)


def loss_panel(ax, steps: np.ndarray, parts: dict[str, np.ndarray]) -> None:
    # Total dashed and on top, so a part equal to it (mse without a penalty) still shows.
    # On a log axis parts that are 0 drop out.
    scale = log_axis_if_wide(ax, np.concatenate(list(parts.values())))
    for k, v in parts.items():
        style = dict(color="black", linestyle="--", linewidth=1.2, zorder=3) if k == "loss" else {}
        ax.plot(steps, np.where(v > 0, v, np.nan) if scale else v, label=k, **style)
    ax.set_title("loss and its parts" + scale)
    ax.legend(fontsize=8)


def mark_phases(axes, boundaries: list[tuple[int, str]]) -> None:
    """Dotted lines where each phase starts, named in the first panel."""
    if not boundaries:
        return
    from matplotlib.transforms import blended_transform_factory  # noqa: PLC0415

    for ax in axes:
        for start, _ in boundaries:
            if start > 0:
                ax.axvline(start, color="0.35", linestyle=":", linewidth=1)
    where = blended_transform_factory(axes[0].transData, axes[0].transAxes)
    for start, name in boundaries:
        axes[0].text(start, 0.02, f" {name}", transform=where, fontsize=7, color="0.25", rotation=90,
                     ha="left", va="bottom")


def density_histogram(log_density: torch.Tensor, n_slots: int, eval_tokens: int | None) -> bytes:
    """log10 firing rates; latents that never fired in the end-of-run eval (stored as -10) are
    counted in the legend, not drawn at -10 (that would stretch the axis to meaningless decades)."""
    ld = log_density.float().numpy().reshape(n_slots, -1)
    alive = ld > -10
    finite = ld[alive]
    lo = min(float(finite.min()) if finite.size else -6.0, math.log10(1 / eval_tokens) if eval_tokens else -6.0)
    bins = np.linspace(math.floor(lo * 2) / 2, 0, 41)
    fig = new_figure(8, 4)
    ax = fig.subplots()
    for s in range(n_slots):
        dead = int((~alive[s]).sum())
        name = f"slot {s + 1}: " if n_slots > 1 else ""
        # expected active latents per token from this slot = sum of its firing rates
        l0 = float((10.0 ** ld[s][alive[s]]).sum())
        ax.hist(ld[s][alive[s]], bins=bins, histtype="stepfilled" if n_slots == 1 else "step", linewidth=1.5,
                color=SLOT_COLOURS[s % len(SLOT_COLOURS)], alpha=0.8 if n_slots == 1 else 1.0,
                label=f"{name}{ld.shape[1] - dead} firing (L0 {l0:.1f}), {dead} never fired")
    if eval_tokens:
        ax.axvline(math.log10(1 / eval_tokens), color="k", linestyle=":", linewidth=1,
                   label=f"fired once in the {eval_tokens} eval tokens")
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title("feature density, end-of-run eval")
    ax.legend(fontsize=8, loc="best")
    return png(fig)


def norm_bins(values: np.ndarray, n: int = 41) -> np.ndarray:
    """Bin edges that stay readable when every norm is (nearly) the same: the range is at least
    +-2% of the mean, and with an odd bin count the mean sits mid-bin, so a unit-norm decoder shows
    one spike at its value instead of float noise split over two bins."""
    lo, hi, mid = float(values.min()), float(values.max()), float(values.mean())
    if hi - lo <= 1e-4 * abs(mid):
        half = max(0.02 * abs(mid), 1e-12)
        return np.linspace(mid - half, mid + half, n + 1)
    pad = 0.05 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n + 1)


def norm_title(title: str, values: np.ndarray) -> str:
    mid = float(values.mean())
    if float(values.max() - values.min()) <= 1e-4 * abs(mid):
        return f"{title}: all {mid:.4g}"
    return title


@torch.no_grad()
def decoder_norms(model) -> bytes:
    binding = is_binding(model)
    fig = new_figure(11 if binding else 6, 3.8)
    axes = fig.subplots(1, 2 if binding else 1, squeeze=False)[0]
    flat = model.flat_decoder().float().norm(dim=1).numpy()
    if binding:
        rows = model.dictionary.float().norm(dim=1).numpy()
        axes[0].hist(rows, bins=norm_bins(rows), color="tab:blue")
        axes[0].set_title(norm_title(f"rows of the shared dictionary D ({model.cfg.n_latents})", rows))
        per = flat.reshape(model.cfg.n_slots, -1)
        for s in range(model.cfg.n_slots):
            # later slots thinner and dashed: equal histograms (orthogonal M_s) stay visible on top of each other
            axes[1].hist(per[s], bins=norm_bins(flat), histtype="step", color=SLOT_COLOURS[s % 6],
                         linewidth=3.0 if s == 0 else 1.5, linestyle="-" if s == 0 else (0, (4, 2 * s)),
                         label="D" if s == 0 else f"M_{s + 1} D")
        axes[1].set_title(norm_title(f"rows of the flat decoder [D; M_2 D; ...] ({len(flat)})", flat))
        axes[1].legend(fontsize=8)
    else:
        axes[0].hist(flat, bins=norm_bins(flat), color="tab:blue")
        axes[0].set_title(norm_title(f"rows of W_dec ({len(flat)})", flat))
    for ax in axes:
        ax.set_xlabel("L2 norm of a decoder row (raw-activation units)")
        ax.set_ylabel("rows")
        ax.ticklabel_format(axis="x", useOffset=False)  # show the value, not an offset like 1e-7 + 0.0312
    return png(fig)


@torch.no_grad()
def transform_spectra(model) -> tuple[bytes, str]:
    ms = model.slot_transforms.float()[1:]                 # M_2 ... M_S (M_1 = I by construction)
    eye = torch.eye(ms.shape[1])
    sv = torch.linalg.svdvals(ms).numpy()
    sv_diff = torch.linalg.svdvals(ms - eye).numpy()
    fig = new_figure(11, 3.8)
    a, b = fig.subplots(1, 2)
    idx = np.arange(1, sv.shape[1] + 1)
    marker = "." if len(idx) <= 64 else None  # dots merge into a thick band at large d
    for s in range(len(sv)):
        c = SLOT_COLOURS[(s + 1) % 6]
        a.plot(idx, sv[s], marker=marker, color=c, label=f"M_{s + 2}")
        b.plot(idx, sv_diff[s], marker=marker, color=c, label=f"M_{s + 2} - I")
    a.set_title("singular values of M_s (all 1 = orthogonal)")
    a.set_ylim(0, max(1.2, 1.1 * float(sv.max())))
    b.set_title("singular values of M_s - I (0 = slot is a copy of slot 1)")
    b.set_ylim(0, max(0.1, 1.1 * float(sv_diff.max())))
    for ax in (a, b):
        ax.set_xlabel("index (descending)")
        ax.set_ylabel("singular value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fro = ", ".join(f"||M_{s + 2} - I||_F = {float(np.sqrt((d ** 2).sum())):.3g}" for s, d in enumerate(sv_diff))
    return png(fig), fro


def label_heatmap(corr: torch.Tensor, keys: list[tuple[int, str, str]], slot_names: list[str],
                  panel_names: list[str]) -> bytes:
    """One panel per SAE slot: rows = labelled objects, columns = attribute values grouped by family."""
    columns = list(dict.fromkeys((f, v) for _, f, v in keys))          # (family, value), first-seen order
    col_of = {c: i for i, c in enumerate(columns)}
    n_obj = max(k[0] for k in keys) + 1
    grids = np.full((corr.shape[0], n_obj, len(columns)), np.nan)
    for j, (slot, fam, val) in enumerate(keys):
        grids[:, slot, col_of[(fam, val)]] = corr[:, j].numpy()
    n_panels = len(panel_names)
    width = min(16.0, max(7.0, 0.3 * len(columns) + 2.5))
    fig = new_figure(width, n_panels * (0.4 * n_obj + 1.5) + 0.8)
    fig.suptitle("best-matching latent for each label (phi of firing vs label)"
                 + ("; one panel per SAE slot" if n_panels > 1 else ""), fontsize=11)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    from matplotlib import colormaps  # noqa: PLC0415

    cmap = colormaps["viridis"].with_extremes(bad="lightgray")     # grey: no such label
    families = list(dict.fromkeys(f for f, _ in columns))
    for p, ax in enumerate(axes):
        im = ax.imshow(grids[p], vmin=0, vmax=1, cmap=cmap, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n_obj), slot_names[:n_obj], fontsize=9)
        ax.set_xticks(range(len(columns)), [v for _, v in columns], rotation=90, fontsize=8)
        ax.set_title(panel_names[p], fontsize=10, loc="left")
        for f in families[1:]:                                        # separators between families
            ax.axvline(columns.index((f, next(v for ff, v in columns if ff == f))) - 0.5, color="white", lw=2)
        if len(columns) <= 40:
            for (r, c), val in np.ndenumerate(grids[p]):
                if np.isfinite(val):
                    ax.text(c, r, f"{val:.2f}"[1:] if 0 <= val < 1 else f"{val:.1f}", ha="center", va="center",
                            fontsize=7, color="white" if val < 0.6 else "black")
        sec = ax.secondary_xaxis("top")
        starts = [next(i for i, (ff, _) in enumerate(columns) if ff == f) for f in families]
        ends = starts[1:] + [len(columns)]
        sec.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)], families, fontsize=9)
        sec.tick_params(length=0)
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="best latent's phi with the label")
    return png(fig)


# ---- sections -----------------------------------------------------------------------------------
def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def run_section(run: Run) -> Section:
    c = run.config
    model_rows = [("architecture", c.get("architecture"))] + list(c.get("model", {}).items())
    train = c.get("train", {})
    train_rows = [(k, train[k]) for k in ("steps", "batch_size", "lr", "seed", "hook", "target_l0") if k in train]
    data = c.get("data", {})
    data_rows = [("cache", data["cache"])] if "cache" in data else [("tensor", data.get("tensor"))]
    parts = ["<div class=tables>", "<div><h3>model</h3>", table(model_rows), "</div>",
             "<div><h3>training</h3>", table(train_rows + data_rows), "</div>"]
    if run.metrics is not None:
        scalars = [(k, v) for k, v in run.metrics.items() if isinstance(v, (int, float))]
        if run.log and "time" in run.log[0]:
            scalars.append(("wall time of logged steps (s)", run.log[-1]["time"] - run.log[0]["time"]))
            first = next((log[0] for _, _, log in run.phases if log and "time" in log[0]), None)
            if first is not None:
                scalars.append(("wall time from the first phase's first logged step (s)",
                                run.log[-1]["time"] - first["time"]))
        parts += ["<div><h3>end-of-run metrics</h3>", table(scalars), "</div>"]
    parts.append("</div>")
    parts.append(f"<details><summary>full config.json</summary><pre>{html.escape(json.dumps(c, indent=1))}</pre></details>")
    note = "" if run.metrics is not None else run.metrics_note
    return Section("Run", caption=note, table_html="".join(parts))


def joined_phases(run: Run) -> tuple[list[dict], list[tuple[int, str]], str]:
    """(log, boundaries, caption) of a recipe-trained run: its earlier phases' logs (phases/*/) and
    then the final phase's (log.jsonl), steps offset to count from the start of the whole run."""
    m = run.metrics or {}
    rows, bounds, offset, spans = [], [], 0, []
    # without a map the recipe trains its standard SAE on (rebind_fallback): that is the last phase then
    last = "2-standard, continued" if m.get("rebind_fallback") else "2-rebind"
    for name, n_steps, log in run.phases + [(last, None, run.log)]:
        if rows:
            rows.append({"step": offset})                      # breaks every line at the boundary
        rows += [{**r, "step": r["step"] + offset} for r in (log or [])]
        bounds.append((offset, name))
        n_steps = n_steps if n_steps is not None else (int(log[-1]["step"]) if log else 0)
        spans.append(f"{name} steps {offset}-{offset + n_steps}" + ("" if log else " (no log)"))
        offset += n_steps
    verdicts = ", ".join(f"{k} = {fmt(m[k])}" for k in ("rebind_pairs", "rebind_fallback", "tie_cost", "slot_usage")
                         if k in m)
    cap = (f"Trained by the binding recipe (sae/recipes/binding.py) in phases, each its own training run with its own "
           f"learning-rate schedule and dead-latent window: {'; '.join(spans)}. The saved dictionary, the "
           f"end-of-run metrics and the figures below are the last phase's"
           + (f" (verdicts: {verdicts})" if verdicts else "") + ". ")
    return rows, bounds, cap


def curves_section(run: Run) -> Section:
    title = "Training curves"
    if not run.log:
        return Section(title, skipped=run.log_note)
    window = run.config.get("model", {}).get("dead_tokens", "dead_tokens")
    log, bounds, phases = joined_phases(run) if run.phases else (run.log, [], "")
    n_rows = sum(1 for r in log if len(r) > 1)  # not the separators between phases
    source = "the phases' log.jsonl files" if bounds else "log.jsonl"
    cap = (phases + f"{n_rows} log steps from {source} (every {run.config.get('train', {}).get('log_every', '?')} "
           "steps). Loss, FVU and L0 are measured on the training batch of that step. A latent counts as dead "
           f"once silent for min({window}, tokens trained so far) training tokens, i.e. early on only latents that "
           "never fired since the start; the density histogram below counts firing in the end-of-run eval instead.")
    return Section(title, caption=cap + (f" {run.log_note}." if run.log_note else ""),
                   pngs=[training_curves(log, bounds)])


def density_section(run: Run) -> Section:
    title = "Feature density"
    if run.model is None:
        return Section(title, skipped=run.model_note)
    if run.log_density is None:
        return Section(title, skipped="no sae/sparsity.safetensors beside the dictionary")
    n_slots = run.model.cfg.n_slots if is_binding(run.model) else 1
    tokens = (run.metrics or {}).get("tokens")
    cap = ("Fraction of tokens each latent fires on, measured on the end-of-run eval batches "
           f"({tokens} tokens)" if tokens else "Fraction of tokens each latent fires on (end-of-run eval)")
    cap += (". One line per SAE slot; L0 per slot is the sum of its latents' densities." if n_slots > 1 else ".")
    return Section(title, caption=cap, pngs=[density_histogram(run.log_density, n_slots, tokens)])


def norms_section(run: Run) -> Section:
    title = "Decoder norms"
    if run.model is None:
        return Section(title, skipped=run.model_note)
    cap = ("Norms of decoder rows in raw-activation units (the training-time scale is folded in, so unit-norm "
           "rows during training show up here as 1 / activation_scale).")
    if is_binding(run.model):
        cap += " Right: the rows each slot decodes with, M_s d_f; an orthogonal M_s keeps every norm."
    return Section(title, caption=cap, pngs=[decoder_norms(run.model)])


def transforms_section(run: Run) -> Section:
    title = "Slot transforms"
    if run.model is None:
        return Section(title, skipped=run.model_note)
    if not is_binding(run.model):
        return Section(title, skipped=f"not a binding SAE ({run.config.get('architecture')})")
    image, fro = transform_spectra(run.model)
    cap = (f"M_1 = I by construction and is not drawn; parametrisation: {run.model.cfg.slot_transform}. {fro}. "
           "M_s is only identifiable on the span of the dictionary (see binding.md).")
    return Section(title, caption=cap, pngs=[image])


def load_labels(run: Run, cfg: ReportConfig) -> Labels | str:
    """The heatmap's rows and labels, or a note saying why there are none. A --labels file that
    cannot be used is an error (asked for explicitly); labels merely absent are a note."""
    if run.model is None:
        if cfg.labels:
            raise ReportError(f"--labels given but {run.path} has no loadable dictionary: {run.model_note}")
        return run.model_note
    return labels_from_file(cfg, run) if cfg.labels else labels_from_scenes_cache(cfg, run)


def heatmap_section(run: Run, lab: Labels | str, cfg: ReportConfig) -> Section:
    title = "Latents x labels"
    if isinstance(lab, str):
        return Section(title, skipped=lab)
    y, keys = label_indicators(lab)
    co, nf = firing_counts(run.model, lab.x, y, cfg.batch_size)
    binding = is_binding(run.model)
    n_slots = run.model.cfg.n_slots if binding else 1
    corr = best_latent_correlation(co, y.sum(0), nf, len(y), n_slots)
    n = run.model.n_latents if binding else run.model.n_total
    panels = ([f"SAE slot {s + 1} (latents {s * n}..{(s + 1) * n - 1})" for s in range(n_slots)] if binding
              else [f"all {n} latents (not a binding SAE)"])
    cap = ("Each cell: max over the latents of that SAE slot of the phi coefficient (correlation of two 0/1 "
           "variables) between 'the latent fires (z > 0)' and 'this object has this attribute value'. 0 = no latent "
           "fires in step with the label, 1 = one latent fires on exactly those rows; grey = a label that is never "
           "(or always) true in these rows. Reading it: a latent for 'red anywhere in the scene' scores about the "
           "same on every object's 'red', so equal object rows in a panel mean a bag code; one bright object row per "
           "panel means that SAE slot is bound to that object. "
           f"Unrelated latents reach about {math.sqrt(2 * math.log(n) / len(lab.x)):.2f} by chance "
           f"(sqrt(2 ln(latents per panel) / rows)). Rows: {lab.source}.")
    # The same numbers averaged over each object's labels: one glance at which slot holds which object.
    n_obj = max(k[0] for k in keys) + 1
    head = "".join(f"<th>{html.escape(lab.slot_names[j])}</th>" for j in range(n_obj))
    body = ""
    for p, name in enumerate(panels):
        body += f"<tr><th>{html.escape(name.split(' (')[0])}</th>"
        for j in range(n_obj):
            values = corr[p, [k[0] == j for k in keys]].numpy()
            body += f"<td>{np.nanmean(values):.3f}</td>" if np.isfinite(values).any() else "<td>-</td>"
        body += "</tr>"
    summary = (f"<p class=caption>Mean of each panel row (over that object's labels):</p>"
               f"<table><tr><th></th>{head}</tr>{body}</table>")
    return Section(title, caption=cap, table_html=summary, pngs=[label_heatmap(corr, keys, lab.slot_names, panels)])


# ---- the page -----------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}.caption{color:#444;max-width:75em}
.skipped{color:#a60;font-style:italic}img{max-width:100%;display:block;margin:.5em 0}
.tables{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ddd;padding:.15em .6em;text-align:left}th{background:#f5f5f5;font-weight:normal}
pre{font-size:.8em;background:#f8f8f8;padding:.5em}"""


def render_html(run: Run, sections: list[Section]) -> str:
    body = []
    for s in sections:
        body.append(f"<section><h2>{html.escape(s.title)}</h2>")
        if s.skipped:
            body.append(f"<p class=skipped>Skipped: {html.escape(s.skipped)}.</p>")
        if s.caption:
            body.append(f"<p class=caption>{html.escape(s.caption)}</p>")
        body.append(s.table_html)
        for image in s.pngs:
            data = base64.b64encode(image).decode("ascii")
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
        body.append("</section>")
    name = html.escape(str(run.path.resolve()))
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>SAE run {name}</title>"
            f"<style>{STYLE}</style></head><body><h1>SAE run report</h1><p>{name}</p>\n"
            + "\n".join(body) + "\n</body></html>\n")


def make_report(cfg: ReportConfig) -> Path:
    """Build every section in memory, then write the page in one atomic step."""
    if cfg.max_rows <= 0 or cfg.batch_size <= 0:
        raise ReportError(f"max_rows and batch_size must be positive, got {cfg.max_rows}, {cfg.batch_size}")
    run = read_run(Path(cfg.run_dir))
    labels = load_labels(run, cfg)  # first: bad input fails before any figure is drawn
    sections = [run_section(run), curves_section(run), density_section(run), norms_section(run),
                transforms_section(run), heatmap_section(run, labels, cfg)]
    out = Path(cfg.out) if cfg.out else run.path / "report.html"
    try:
        files.make_dirs(out.parent)
        files.write_text(out, render_html(run, sections))
    except files.OutputError as e:
        raise ReportError(f"{out}: cannot write the report ({e.os_reason or e})") from None
    return out


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        out = make_report(cfg)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
