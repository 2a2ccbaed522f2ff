"""A family of scenes models: when does a trained transformer bind linearly, and does the binding
SAE see it? (issue 18)

    python -m sae.eval.scene_family --out results/scene_family       # the study, ~1.5 h on one CPU thread

Each model of the family (FAMILIES) is a scenes model (sae/lm/scenes_model.py) trained by the
project's own loop (train_scenes_model) on its world (sae/lm/scenes.World: objects per scene, query
mix); the knobs are width, depth, objects, training length and the query mix. Per model, all at the
separator residual of the bottleneck layer, the only way the scene reaches the queries:

  train     the model; accuracy on unseen scenes and held-out conjunctions; bottleneck evidence
            (bottleneck_report without its probes: patching identity, mean ablation, recolour patch)
  cache     SEP residuals of n_cache train scenes (what the SAEs train on)
  probes    linear and MLP probes per (slot, attribute) from the residual, fitted on train scenes,
            scored on unseen scenes and on the held-out-conjunction object (fit_scene_probes with
            hidden 0 / mlp_hidden: the MLP shares one hidden layer across heads)
  topk      a TopK SAE by sae.train (defaults but steps, batch, latents, k)
  binding   a BindingSAE (n_slots = objects) by sae.train: the binding recipe (rebind_pairs,
            rebind_fallback, tie_cost, slot_usage); on fallback the result is the standard SAE
  *_eval    scenes_binding.evaluate_sae (probes from codes, swap test, causal edits with the error
            term fixed, on the model's own query mix); for the TopK SAE the echo detector, and for a
            binding SAE whose recipe kept a map, the detector on its decoder: "transfer" is the mean
            cross-validated cos(M w_i, w_j) of the pairs, each judged by a map not fitted on it

Every stage writes its own file under MODELS_DIR/<model>/ atomically and is skipped when that file
exists, so a stopped run (SIGTERM, SIGKILL) continues where it stopped; the table, the JSON and the
picture are rebuilt from those files at the end of every run. Model weights, caches and SAEs live
under MODELS_DIR (default OUT/models, kept out of git); OUT gets table.md, family.json, family.png.
"""
from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import sae
from sae.core.config import option, parse_config
from sae.core.files import make_dirs, save_safetensors, write_file, write_json, write_result, write_text
from sae.core.io import read_json
from sae.eval.echo import find_echoes
from sae.eval.probes import fit_scene_probes
from sae.eval.scenes_binding import evaluate_sae, probe_scores, sep_residuals
from sae.eval.train_scenes_model import (bottleneck_report, measure, model_metadata, save_scenes_model,
                                         train_scenes_model)
from sae.lm.scenes_model import ScenesModelConfig, load_scenes_metadata, load_scenes_model, world_of
from sae.recipes.binding import MIN_USAGE


@dataclass(frozen=True)
class ModelSpec:
    """One model of the family. The bottleneck is the middle of the stack (layer n_layers/2 - 1)."""
    name: str
    d_model: int
    n_layers: int
    steps: int
    max_objects: int = 3
    query_mix: str = "all"
    lr: float = 3e-3
    batch_size: int = 128
    n_eval: int = 400  # scenes per evaluation set (fewer for the widest: their forwards dominate)
    sweep: str = "width"  # which line of the picture / group of the table it belongs to
    shipped: bool = False  # the shipped model (sae/lm/assets), measured here, never retrained

    def model_config(self, seed: int, steps_scale: float) -> ScenesModelConfig:
        if self.shipped:
            meta = load_scenes_metadata()
            return ScenesModelConfig(**{k: v for k, v in meta["config"].items() if k in ScenesModelConfig.__dataclass_fields__})
        steps = max(1, round(self.steps * steps_scale))
        return ScenesModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=4, d_mlp=4 * self.d_model,
                                 bottleneck_layer=self.n_layers // 2 - 1, seed=seed, steps=steps,
                                 batch_size=self.batch_size, lr=self.lr, warmup_steps=min(200, steps // 10),
                                 eval_scenes=1000, max_objects=self.max_objects, query_mix=self.query_mix)


def _width(d, layers, steps, **kw):
    return ModelSpec(f"w{d}-L{layers}", d, layers, steps, **kw)


def _knob(name, steps=2000, **kw):
    return ModelSpec(name, 64, 2, steps, sweep="knob", **kw)


# Sized for ~1.5 h on one CPU thread next to another job (one step of batch 128: 0.06 s at d 32,
# 2 layers; 0.09 s at d 64; ~2.5 s at d 512; d 32 reaches only ~51% in 2,000 steps, 70% in 6,000;
# d 64 99.5% in 6,000): the widest models get few steps, and whether a
# model learned is measured, not assumed. The shipped model (d 64, 4 layers, 6,000 steps) is a member
# for free. Order: cheap and informative first, so that a stopped run has the most to show.
FAMILIES = {
    "full": (
        ModelSpec("w64-L4-shipped", 64, 4, 6000, shipped=True), _width(32, 2, 6000), _width(64, 2, 6000),
        _width(32, 4, 3000),
        _knob("w64-L2-obj2", 2500, max_objects=2), _knob("w64-L2-obj4", 2500, max_objects=4),
        _knob("w64-L2-slot", 2500, query_mix="slot"), _knob("w64-L2-attribute", 2500, query_mix="attribute"),
        _knob("w64-L2-short", 1000),
        _width(128, 2, 2000), _width(256, 2, 600, lr=1.5e-3, n_eval=200),
        _width(512, 2, 150, lr=1e-3, n_eval=150),
    ),
    # a smoke test: two models, a few dozen steps (tests/test_scene_family.py)
    "tiny": (ModelSpec("t16-obj2", 16, 2, 40, max_objects=2, n_eval=40),
             ModelSpec("t16-obj4", 16, 2, 40, max_objects=4, n_eval=40, sweep="knob")),
}


@dataclass
class FamilyConfig:
    out: str = option("results/scene_family", "folder for table.md, family.json and family.png")
    models_dir: str = option("", "folder for weights, caches and SAEs ('' = OUT/models; keep it out of git)")
    family: str = option("full", f"which family: {', '.join(FAMILIES)}")
    models: str = option("", "comma-separated model names to run ('' = all of the family)")
    steps_scale: float = option(1.0, "multiply every model's training steps by this")
    n_cache: int = option(6144, "train scenes whose SEP residuals the SAEs train on")
    sae_steps: int = option(600, "SAE training steps")
    sae_batch: int = option(512, "SAE batch size")
    expansion: int = option(8, "SAE latents per residual dimension")
    max_latents: int = option(1024, "cap on SAE latents (the widest models)")
    k: int = option(8, "active latents per input (TopK and the binding SAE)")
    n_train: int = option(2000, "train scenes for probes and latent lookups")
    probe_steps: int = option(400, "full-batch Adam steps per probe fit")
    mlp_hidden: int = option(256, "hidden units of the MLP probe")
    seed: int = option(0, "seed of models, SAEs and scenes")
    threads: int = option(1, "CPU threads for torch (0 = torch's default)")

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        names = {s.name for s in FAMILIES[self.family]}
        unknown = [m for m in self.selected() if m not in names]
        if unknown:
            raise ValueError(f"--models: {', '.join(unknown)} not in the {self.family} family ({', '.join(sorted(names))})")
        for name in ("n_cache", "sae_steps", "sae_batch", "expansion", "max_latents", "k", "n_train", "probe_steps",
                     "mlp_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not self.steps_scale > 0:
            raise ValueError(f"--steps-scale must be > 0, got {self.steps_scale}")

    def selected(self) -> list[str]:
        return [m for m in self.models.split(",") if m]

    def specs(self) -> list[ModelSpec]:
        chosen = set(self.selected())
        return [s for s in FAMILIES[self.family] if not chosen or s.name in chosen]

    def models_path(self) -> Path:
        return Path(self.models_dir) if self.models_dir else Path(self.out) / "models"


# ----------------------------------------------------------------------------- stages

STAGES = ("train", "cache", "probes", "topk", "binding", "topk_eval", "binding_eval")


def stage_file(folder: Path, stage: str) -> Path:
    """The file whose existence means `stage` is done (written last, atomically)."""
    return folder / ("model.json" if stage == "train" else "sep_cache.safetensors" if stage == "cache"
                     else f"{stage}.json")


def run_train(spec: ModelSpec, cfg: FamilyConfig, folder: Path) -> None:
    mcfg = spec.model_config(cfg.seed, cfg.steps_scale)
    t0 = time.time()
    if spec.shipped:  # measured like the others; its weights are copied, never rewritten
        model, shipped = load_scenes_model(), load_scenes_metadata()
        meta = {**model_metadata(mcfg, model, 0.0, ""), "training": shipped["training"]}
    else:
        model = train_scenes_model(mcfg, eval_every=0)
        meta = model_metadata(mcfg, model, time.time() - t0, f"python -m sae.eval.scene_family (model {spec.name})")
    meta["spec"] = asdict(spec)
    meta["accuracy"] = measure(model, mcfg)
    meta["bottleneck"] = bottleneck_report(model, mcfg.bottleneck_layer, n=spec.n_eval, with_probes=False)
    meta["stage_seconds"] = round(time.time() - t0, 1)
    save_scenes_model(model, meta, folder / "model.safetensors")  # weights, then the JSON: the marker


def run_cache(spec: ModelSpec, cfg: FamilyConfig, folder: Path, model) -> None:
    x = sep_residuals(model, world_of(model).generate_tokens(cfg.n_cache, cfg.seed, "train"))
    save_safetensors(stage_file(folder, "cache"), {"x": x.contiguous()})


def eval_sets(spec: ModelSpec, cfg: FamilyConfig, model) -> dict:
    """The scenes evaluate_sae draws (same seeds), with their SEP residuals."""
    world = world_of(model)
    sets = {"train": world.sample_batch(cfg.n_train, 1000 + cfg.seed, "train"),
            "test": world.sample_batch(spec.n_eval, 2000 + cfg.seed, "test"),
            "heldout": world.sample_batch(spec.n_eval, 3000 + cfg.seed, "heldout")}
    return {k: (sep_residuals(model, b.tokens), b) for k, b in sets.items()}


def run_probes(spec: ModelSpec, cfg: FamilyConfig, folder: Path, model) -> None:
    t0 = time.time()
    sets = eval_sets(spec, cfg, model)
    (x_train, b_train), out = sets["train"], {}
    for kind, hidden in (("linear", 0), ("mlp", cfg.mlp_hidden)):
        with torch.enable_grad():
            fn = fit_scene_probes(x_train, b_train.attributes, steps=cfg.probe_steps, hidden=hidden, seed=cfg.seed)
        out[kind] = probe_scores(fn, sets["test"], sets["heldout"])
    out["stage_seconds"] = round(time.time() - t0, 1)
    write_json(stage_file(folder, "probes"), out)


def n_latents(d_model: int, cfg: FamilyConfig) -> int:
    return min(cfg.expansion * d_model, cfg.max_latents)


def run_sae(kind: str, spec: ModelSpec, cfg: FamilyConfig, folder: Path, model) -> None:
    """sae.train with its defaults but steps, batch and size; the result's model is saved."""
    t0 = time.time()
    x = load_file(str(stage_file(folder, "cache")))["x"]
    d, n = model.cfg.d_model, n_latents(model.cfg.d_model, cfg)
    slots = world_of(model).max_objects
    m = sae.TopKSAE(d, n, k=cfg.k) if kind == "topk" else sae.BindingSAE(d, n // slots, n_slots=slots, k=cfg.k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recipe warns on fallback: recorded in the metrics instead
        res = sae.train(m, x, steps=cfg.sae_steps, batch_size=cfg.sae_batch, seed=cfg.seed,
                        eval_tokens=min(4096, len(x)), log_every=max(1, cfg.sae_steps // 10))
    res.model.save(folder / f"sae_{kind}")
    metrics = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}
    metrics.update(result_class=type(res.model).__name__, n_latents_total=res.model.n_total,
                   stage_seconds=round(time.time() - t0, 1))
    write_json(stage_file(folder, kind), metrics)


def live_rows(m, x: torch.Tensor) -> torch.Tensor:
    """Latents that fire on at least 0.1% of the cache: dead rows only add chance structure."""
    with torch.no_grad():
        return (m.encode(x) > 0).float().mean(0) > MIN_USAGE


def echo_summary(m, x: torch.Tensor) -> dict:
    res = find_echoes(m.W_dec, live=live_rows(m, x))
    out = {"pairs": len(res.pairs), "share": res.share, "pinned": bool(res.pinned)}
    out["transfer_cos"] = res.cos.mean().item() if len(res.pairs) else None  # judged by maps not fitted on them
    return out


def run_sae_eval(kind: str, spec: ModelSpec, cfg: FamilyConfig, folder: Path, model) -> None:
    t0 = time.time()
    m = sae.load(folder / f"sae_{kind}")
    res = evaluate_sae(m, model, cfg.n_train, spec.n_eval, cfg.seed, probe_steps=cfg.probe_steps,
                       residual_probes=False)
    x = load_file(str(stage_file(folder, "cache")))["x"]
    trained = read_json(stage_file(folder, kind))
    if kind == "topk":
        res["echo"] = echo_summary(m, x)
    elif trained.get("rebind_fallback") == 0:
        res["echo"] = echo_summary(m, x)  # the kept map, judged the detector's way
    res["stage_seconds"] = round(time.time() - t0, 1)
    write_json(stage_file(folder, f"{kind}_eval"), res)


def check_same_model(spec: ModelSpec, cfg: FamilyConfig, folder: Path) -> None:
    """A folder left by another family definition must not be resumed as this one."""
    marker = stage_file(folder, "train")
    if marker.exists():
        recorded = load_scenes_metadata(marker)["config"]
        wanted = asdict(spec.model_config(cfg.seed, cfg.steps_scale))
        if any(recorded.get(k) != v for k, v in wanted.items()):
            raise ValueError(f"{folder} holds a different model than {spec.name} asks for (other steps, seed or "
                             "size): remove it or pass another --models-dir")


def run_model(spec: ModelSpec, cfg: FamilyConfig, bar) -> None:
    """Every stage of one model that is not done yet."""
    folder = cfg.models_path() / spec.name
    make_dirs(folder)
    check_same_model(spec, cfg, folder)
    model = None
    for stage in STAGES:
        bar.set_description(f"{spec.name}: {stage}")
        if not stage_file(folder, stage).exists():
            if stage == "train":
                run_train(spec, cfg, folder)
            else:
                model = model or load_scenes_model(weights=folder / "model.safetensors")
                if stage == "cache":
                    run_cache(spec, cfg, folder, model)
                elif stage == "probes":
                    run_probes(spec, cfg, folder, model)
                elif stage.endswith("_eval"):
                    run_sae_eval(stage[: -len("_eval")], spec, cfg, folder, model)
                else:
                    run_sae(stage, spec, cfg, folder, model)
        bar.update()


# ----------------------------------------------------------------------------- the summary


def model_row(spec: ModelSpec, folder: Path) -> dict | None:
    """One table row from a model's stage files; None if its model is not trained yet."""
    if not stage_file(folder, "train").exists():
        return None
    meta = load_scenes_metadata(folder / "model.json")
    acc, bn = meta["accuracy"], meta["bottleneck"]
    row = {"name": spec.name, "sweep": spec.sweep, "d_model": spec.d_model, "n_layers": spec.n_layers,
           "max_objects": spec.max_objects, "query_mix": spec.query_mix, "steps": meta["config"]["steps"],
           "train_seconds": meta["training"]["seconds"], "acc_test": acc["test"]["accuracy"],
           "acc_heldout": acc["heldout_conjunctions"]["accuracy"], "acc_chance": bn["chance"]["accuracy"],
           "identity_max_abs_logit_diff": bn["identity_max_abs_logit_diff"],
           "mean_ablated_acc": bn["mean_ablated"]["accuracy"], "recolour_flip": bn["recolour_patch"]["flip_accuracy"],
           "stage_seconds": {"train": meta.get("stage_seconds")}}
    if stage_file(folder, "probes").exists():
        p = read_json(stage_file(folder, "probes"))
        row["stage_seconds"]["probes"] = p.pop("stage_seconds", None)
        row["probes"] = p
    for kind in ("topk", "binding"):
        for stage in (kind, f"{kind}_eval"):
            if stage_file(folder, stage).exists():
                r = read_json(stage_file(folder, stage))
                row["stage_seconds"][stage] = r.pop("stage_seconds", None)
                row[stage] = r
    row["seconds"] = round(sum(v for v in row["stage_seconds"].values() if v), 1)
    return row


def _f(v, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _edit(ev: dict | None, edit: str, cond: str) -> str:
    e = (ev or {}).get("edits", {}).get(edit, {}).get(cond)
    return "—" if not e else f"{_f(e.get('flip'))} / {_f(e.get('specificity'))}"


def _binding_cond(ev: dict | None) -> str:
    return "binding/moved" if ev and "binding/moved" in ev.get("edits", {}).get("recolour", {}) else "data/moved"


def models_table(rows: list[dict]) -> list[str]:
    header = ("| model | d_model | layers | objects | queries | steps | train s | accuracy: unseen / held-out conj. "
              "(chance) | patch identity max Δlogit | mean-ablated acc. | probes, unseen scenes: linear / MLP "
              "| held-out object colour, shape: linear / MLP |")
    lines = [header, "|---" * 12 + "|"]
    for r in rows:
        p = r.get("probes", {})
        lin, mlp = p.get("linear", {}), p.get("mlp", {})
        held = " / ".join(f"{_f(q.get('heldout_object', {}).get('colour'))}, {_f(q.get('heldout_object', {}).get('shape'))}"
                          for q in (lin, mlp))
        lines.append(f"| {r['name']} | {r['d_model']} | {r['n_layers']} | {r['max_objects']} | {r['query_mix']} | "
                     f"{r['steps']} | {r['train_seconds']:.0f} | {_f(r['acc_test'], 3)} / {_f(r['acc_heldout'], 3)} "
                     f"({_f(r['acc_chance'])}) | {r['identity_max_abs_logit_diff']:.1e} | {_f(r['mean_ablated_acc'])} | "
                     f"{_f(lin.get('test_mean'))} / {_f(mlp.get('test_mean'))} | {held if p else '—'} |")
    return lines


def slots_table(rows: list[dict]) -> list[str]:
    """Per (slot, attribute): linear / MLP probe accuracy on unseen scenes."""
    n = max(r["max_objects"] for r in rows)
    lines = ["| model | " + " | ".join(f"slot {s}: colour · material · shape, linear / MLP" for s in range(n)) + " |",
             "|---" * (n + 1) + "|"]
    for r in rows:
        p, cells = r.get("probes"), []
        for s in range(n):
            if not p or f"colour@{s}" not in p["linear"]["test"]:
                cells.append("—")
                continue
            cells.append(" / ".join(" · ".join(_f(p[kind]["test"][f"{a}@{s}"]) for a in ("colour", "material", "shape"))
                                    for kind in ("linear", "mlp")))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def saes_table(rows: list[dict]) -> list[str]:
    header = ("| model | TopK FVU / answers spliced | TopK (object, colour) latents: distinct, shared by objects "
              "0 and 1 | echo pairs (transfer cos) | binding recipe: pairs, fallback, "
              "tie cost, slot usage | binding result FVU / answers | swap: codes differ TopK / binding | swap: both "
              "right TopK / binding | recolour flip / specificity: true residual · TopK (data) · binding | swap edit: "
              "binding |")
    lines = [header, "|---" * 10 + "|"]
    for r in rows:
        t, b, te, be = (r.get(k) for k in ("topk", "binding", "topk_eval", "binding_eval"))
        if not (t and b and te and be):
            lines.append(f"| {r['name']} | " + " | ".join(["(not run yet)"] + [""] * 8) + " |")
            continue
        echo = te.get("echo", {})
        rb = f"{b.get('rebind_pairs', 0)}, {b.get('rebind_fallback')}, {_f(b.get('tie_cost'), 3)}, {_f(b.get('slot_usage'))}"
        cond, lk = _binding_cond(be), te["latent_lookup"]["data"]
        lines.append(
            f"| {r['name']} | {_f(te['reconstruction']['fvu'], 3)} / {_f(te['reconstruction']['acc_sae'])} | "
            f"{lk['distinct_latents']} of {len(lk['latents']) * len(lk['latents'][0])}, {_f(lk['shared_across_objects'])} | "
            f"{echo.get('pairs', '—')} ({_f(echo.get('transfer_cos'))}) | {rb} | {_f(be['reconstruction']['fvu'], 3)} / "
            f"{_f(be['reconstruction']['acc_sae'])} | {_f(te['swap']['codes_differ'])} / {_f(be['swap']['codes_differ'])} | "
            f"{_f(te['swap']['sae']['both_right'])} / {_f(be['swap']['sae']['both_right'])} | "
            f"{_edit(te, 'recolour', 'residual')} · {_edit(te, 'recolour', 'data/moved')} · {_edit(be, 'recolour', cond)} "
            f"({cond.split('/')[0]}) | {_edit(be, 'swap', cond)} |")
    return lines


def write_table(rows: list[dict], path: Path) -> None:
    done = [r for r in rows if r]
    text = ["# Scene family (generated by `python -m sae.eval.scene_family`)", ""]
    if not done:
        text.append("No model trained yet.")
    else:
        text += ["## Models and probes at the separator", ""] + models_table(done)
        text += ["", "## Probes per (slot, attribute)", ""] + slots_table(done)
        text += ["", "## SAEs at the separator", ""] + saes_table(done)
    write_text(path, "\n".join(text) + "\n")


def plot(rows: list[dict], path: Path) -> bool:
    """Linear / MLP probe accuracy and matched pairs against width, one line per depth (the width
    sweep only; the knob models are in the table). False if matplotlib is missing or no row has probes."""
    try:
        import matplotlib  # noqa: PLC0415 (slow import, needed only for the picture)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (slow import, needed only for the picture)
    except ImportError:
        return False
    sweep = [r for r in rows if r and r["sweep"] == "width" and "probes" in r]
    if not sweep:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for layers in sorted({r["n_layers"] for r in sweep}):
        rs = sorted((r for r in sweep if r["n_layers"] == layers), key=lambda r: r["d_model"])
        w = [r["d_model"] for r in rs]
        line, = a.plot(w, [r["probes"]["linear"]["test_mean"] for r in rs], "o-", label=f"{layers} layers: linear")
        a.plot(w, [r["probes"]["mlp"]["test_mean"] for r in rs], "s--", color=line.get_color(), label=f"{layers} layers: MLP")
        a.plot(w, [r["acc_test"] for r in rs], ":", color=line.get_color(), alpha=0.6, label=f"{layers} layers: task acc.")
        done = [r for r in rs if r.get("binding") and r.get("topk_eval")]
        wd = [r["d_model"] for r in done]
        b.plot(wd, [r["binding"].get("rebind_pairs", 0) for r in done], "o-", color=line.get_color(),
               label=f"{layers} layers: binding recipe pairs")
        b.plot(wd, [r["topk_eval"].get("echo", {}).get("pairs", 0) for r in done], "s--", color=line.get_color(),
               label=f"{layers} layers: echo pairs (TopK)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.legend(fontsize=7)
    a.set_ylabel("mean accuracy, unseen scenes")
    a.set_title("probes per (slot, attribute) at the separator")
    b.set_ylabel("matched pairs")
    b.set_title("shared slot map found")
    fig.tight_layout()
    make_dirs(path.parent)
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # a reader never sees half a picture
    plt.close(fig)
    return True


def summarise(cfg: FamilyConfig, command: str, wall: float) -> dict:
    out = Path(cfg.out)
    rows = [model_row(s, cfg.models_path() / s.name) for s in cfg.specs()]
    write_table(rows, out / "table.md")
    drew = plot(rows, out / "family.png")
    done = [r for r in rows if r]
    summary = {"command": command, "config": asdict(cfg), "wall_seconds_this_run": round(wall, 1),
               "stage_seconds_total": round(sum(r["seconds"] for r in done), 1),
               "picture": "family.png" if drew else None, "models": done,
               "not_trained": [s.name for s, r in zip(cfg.specs(), rows) if r is None]}
    write_result(out / "family.json", summary)
    return summary


def main(argv=None) -> int:
    try:
        cfg = parse_config(FamilyConfig, argv, "python -m sae.eval.scene_family", __doc__.split("\n\n")[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # SIGTERM as an exception, so atomic writes remove their temporary files; the rerun skips what is done
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python -m sae.eval.scene_family " + " ".join(sys.argv[1:] if argv is None else argv)
    t0, specs = time.time(), cfg.specs()
    try:
        with tqdm(total=len(specs) * len(STAGES), desc="scene family", dynamic_ncols=True) as bar:
            for spec in specs:
                run_model(spec, cfg, bar)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarise(cfg, command, time.time() - t0)
    print(f"wrote {Path(cfg.out) / 'table.md'}, family.json" + (", family.png" if summary["picture"] else "")
          + f" ({len(summary['models'])} models, {summary['stage_seconds_total']:.0f} s of stages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
