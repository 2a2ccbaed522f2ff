"""The run report (eval/report.py): one self-contained HTML file with decodable PNGs, the heatmap's
definition, label recovery, notes for missing pieces, one-line errors, and atomic writes."""
import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sae
from sae.eval import report
from sae.eval.worlds import WorldConfig, make_world
from sae.recipes.binding import STANDARD_SHARE

WORLD = WorldConfig(d=8, families=(4, 4), n_slots=2, seed=0)
TRAIN = dict(steps=40, batch_size=128, log_every=5, eval_tokens=256, lr=3e-3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A TopK run on Gaussian data and a BindingSAE run on a tiny bound world, trained once."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    sae.train(sae.TopKSAE(8, 32, k=3), torch.randn(1024, 8), run_dir=str(root / "topk"), **TRAIN)
    world = make_world(WORLD)
    sae.train(sae.BindingSAE(8, 12, n_slots=2, k=3, transform_init="random_orthogonal"),
              world.sample(2048).x, run_dir=str(root / "binding"), **TRAIN)
    return root, world


def copy_run(runs, name, tmp_path) -> Path:
    return Path(shutil.copytree(runs[0] / name, tmp_path / name, ignore=shutil.ignore_patterns("report*.html")))


def images(page: str) -> list[np.ndarray]:
    """Every embedded PNG, decoded."""
    from matplotlib.image import imread

    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    out = []
    for b64 in found:
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out.append(imread(io.BytesIO(raw), format="png"))
    return out


def check_images(page: str, n: int):
    pics = images(page)
    assert len(pics) == n
    for img in pics:
        h, w = img.shape[:2]
        assert img.ndim == 3 and img.shape[2] in (3, 4)
        assert 300 <= w <= 2500 and 200 <= h <= 2500, (w, h)
        assert img[..., :3].std() > 0.02  # something is drawn, not a blank canvas


def sections(page: str) -> list[str]:
    return re.findall(r"<h2>([^<]*)</h2>", page)


def skipped(page: str) -> list[str]:
    return re.findall(r"<p class=skipped>Skipped: ([^<]*?)\.</p>", page)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("report: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ---- whole reports ------------------------------------------------------------------------------
def test_topk_report_is_one_self_contained_file(runs, tmp_path):
    run = copy_run(runs, "topk", tmp_path)
    before = sorted(p.name for p in run.iterdir())
    assert report.main([str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == sorted(before + ["report.html"])  # nothing else written
    page = (run / "report.html").read_text()
    assert sections(page) == ["Run", "Training curves", "Feature density", "Decoder norms", "Slot transforms",
                              "Latents x labels"]
    assert re.search(r"(src|href)=\"(?!data:)", page) is None  # no external files or links
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['fvu']:.4g}" in page  # the metrics table reads metrics.json
    assert skipped(page) == ["not a binding SAE (topk)",
                             "the run was trained on an in-memory tensor; pass --labels to draw this heatmap"]
    check_images(page, 3)  # curves, density, norms


def test_binding_report_with_a_world_labels_file(runs, tmp_path):
    run = copy_run(runs, "binding", tmp_path)
    world = runs[1]
    test = world.sample(512, seed=1, split="all")
    labels, legend = report.world_labels(world, test)
    report.write_labels(tmp_path / "labels.safetensors", labels, legend, x=test.x)
    out = tmp_path / "out" / "r.html"
    assert report.main([str(run), "--out", str(out), "--labels", str(tmp_path / "labels.safetensors")]) == 0
    page = out.read_text()
    assert skipped(page) == []
    assert "||M_2 - I||_F" in page and "512 rows" in page
    check_images(page, 5)  # curves, density, norms, spectra, heatmap


def test_a_recipe_trained_binding_run_shows_every_phase(runs, tmp_path):
    # sae.train trains a binding SAE by the recipe (a standard SAE first, then the rebind or more of the
    # standard SAE): the run directory's log.jsonl is the last phase's only; the curves must show the
    # whole run, phases marked, not the last 10 of its 40 steps
    run = copy_run(runs, "binding", tmp_path)
    assert sorted(p.name for p in (run / "phases").iterdir()) == ["1-standard"]
    r = report.read_run(run)
    first = int(STANDARD_SHARE * TRAIN["steps"])
    assert [(name, steps) for name, steps, _ in r.phases] == [("1-standard", first)]
    log, bounds, caption = report.joined_phases(r)
    last = "2-standard, continued" if r.metrics["rebind_fallback"] else "2-rebind"
    assert bounds == [(0, "1-standard"), (first, last)]
    steps = [row["step"] for row in log if len(row) > 1]
    logged = lambda n: len(range(TRAIN["log_every"], n, TRAIN["log_every"])) + 1  # every log_every and the last
    assert steps == sorted(steps) and steps[-1] == TRAIN["steps"]
    assert len(steps) == logged(first) + logged(TRAIN["steps"] - first)
    assert f"1-standard steps 0-{first}; {last} steps {first}-{TRAIN['steps']}" in caption
    assert report.main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert f"1-standard steps 0-{first}" in page and "rebind_fallback = " in page
    shutil.rmtree(run / "phases")  # a run without phases reads as before
    assert report.read_run(run).phases == []


def test_cli_entry_point_and_lazy_matplotlib(tmp_path):
    # `python -m sae.eval.report` runs the module as __main__; runpy does the same after the import check.
    code = ("import runpy, sys, sae, sae.eval.report; assert 'matplotlib' not in sys.modules, 'imported at import'; "
            "sys.argv = ['report', sys.argv[1]]; runpy.run_module('sae.eval.report', run_name='__main__')")
    # (runpy warns that the module is already imported: that is the check above, not a problem)
    done = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", code, str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"report: error: {tmp_path / 'nope'}: no such directory"


def test_missing_pieces_are_skipped_with_a_note(runs, tmp_path):
    run = copy_run(runs, "topk", tmp_path)
    shutil.rmtree(run / "sae")
    (run / "metrics.json").unlink()
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 45, "lo')  # torn last line
    assert report.main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert f"{len(lines)} log steps" in page and "1 unreadable line(s) skipped" in page
    assert skipped(page) == ["no sae/ dictionary (the run has not finished)"] * 4
    assert "no metrics.json" in page
    check_images(page, 1)

    (run / "log.jsonl").unlink()
    assert report.main([str(run)]) == 0
    assert skipped((run / "report.html").read_text())[0] == "no log.jsonl in the run directory"


def test_a_run_on_a_cache_reads_label_rows_from_it(tmp_path):
    from sae.lm.cache import write_tensors

    world = make_world(WORLD)
    samples = world.sample(1024, seed=3)
    cache = write_tensors(tmp_path / "cache", samples.x)
    run = tmp_path / "run"
    sae.train(sae.TopKSAE(8, 16, k=3), str(cache), run_dir=str(run), **{**TRAIN, "steps": 10})
    assert report.main([str(run)]) == 0
    assert "is not a scenes cache; pass --labels" in skipped((run / "report.html").read_text())[-1]

    report.write_labels(tmp_path / "w.safetensors", *report.world_labels(world, samples))  # no 'x'
    assert report.main([str(run), "--labels", str(tmp_path / "w.safetensors")]) == 0
    page = (run / "report.html").read_text()
    assert skipped(page) == ["not a binding SAE (topk)"]
    assert f"w.safetensors with rows 0..1023 of {cache}" in page
    check_images(page, 4)

    shutil.rmtree(cache)  # moved away since training: the heatmap is skipped, the report still made
    assert report.main([str(run)]) == 0
    assert "no such cache directory" in skipped((run / "report.html").read_text())[-1]


# ---- bad input: one line, non-zero exit, nothing written ------------------------------------------
def test_not_a_run_directory(runs, tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert one_line_error(capsys).endswith("missing: no such directory")
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "not a run directory (no config.json" in one_line_error(capsys)
    assert report.main([str(runs[0] / "topk" / "sae")]) == 2  # a dictionary, not its run
    assert "pass the run directory above it" in one_line_error(capsys)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"arch')
    assert report.main([str(tmp_path / "torn")]) == 2
    assert "config.json: not valid JSON" in one_line_error(capsys)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not safetensors"), "corrupt or truncated safetensors"),
    (lambda p: report.write_labels(p, torch.zeros(4, 2), {"groups": []}), "needs 'groups', a list of 2 entries"),
    (lambda p: report.write_labels(p, torch.full((4, 1), 7), {"groups": [{"slot": 0, "family": "c", "values": ["a"]}]}),
     "column 0 (c) holds values outside -1..0"),
    (lambda p: report.write_labels(p, torch.zeros(4, 1), {"groups": [{"slot": 0, "family": "c", "values": ["a"]}]}),
     "no 'x' tensor, and the run was trained on an in-memory tensor"),
    (lambda p: report.write_labels(p, torch.zeros(4, 1), {"groups": [{"slot": 0, "family": "c", "values": ["a"]}]},
                                   x=torch.zeros(4, 3)), "activations have d_in=3, the dictionary expects 8"),
])
def test_bad_labels_fail_in_one_line_and_leave_no_file(runs, tmp_path, capsys, make, message):
    run = copy_run(runs, "binding", tmp_path)
    make(tmp_path / "labels.safetensors")
    before = sorted(p.name for p in run.iterdir())
    assert report.main([str(run), "--labels", str(tmp_path / "labels.safetensors")]) == 2
    assert message in one_line_error(capsys)
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_failed_write_leaves_the_previous_report_and_no_temporary(runs, tmp_path, monkeypatch, capsys):
    run = copy_run(runs, "topk", tmp_path)
    (run / "report.html").write_text("previous")
    assert report.main([str(run), "--out", str(run)]) == 2  # the output path is a directory
    assert one_line_error(capsys) == f"report: error: {run}: cannot write the report (Is a directory)"

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.files.os, "replace", fail)  # dies between writing the temporary and renaming
    assert report.main([str(run)]) == 2
    assert one_line_error(capsys).endswith("report.html: cannot write the report (No space left on device)")
    assert (run / "report.html").read_text() == "previous"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


# ---- the pieces ---------------------------------------------------------------------------------
def test_best_latent_correlation_follows_its_definition():
    g = torch.Generator().manual_seed(0)
    n = 4000
    a = torch.rand(n, generator=g) < 0.2                   # label A
    b = torch.rand(n, generator=g) < 0.5                   # label B
    y = torch.stack([a, b, torch.zeros(n, dtype=torch.bool)], 1).double()  # third label never true
    fires = torch.zeros(n, 2, 3)                           # 2 SAE slots x 3 latents
    fires[:, 0, 0] = a                                     # slot 1 has a latent that is exactly A
    fires[:, 0, 1] = 1                                     # always on: says nothing
    fires[:, 1, 0] = b & (torch.rand(n, generator=g) < 0.5)  # slot 2: a partial B detector
    fires[:, 1, 2] = torch.rand(n, generator=g) < 0.3      # noise
    fires = fires.reshape(n, 6).double()
    corr = report.best_latent_correlation(y.T @ fires, y.sum(0), fires.sum(0), n, n_slots=2)
    assert corr.shape == (2, 3)
    assert corr[0, 0] == pytest.approx(1.0)
    assert abs(corr[1, 0]) < 0.1                           # slot 2 knows nothing of A
    fb, yb = fires[:, 3].numpy(), b.double().numpy()
    assert corr[1, 1] == pytest.approx(np.corrcoef(fb, yb)[0, 1], abs=1e-9)  # phi = Pearson on 0/1
    assert corr[:, 2].isnan().all()

    class Fixed(torch.nn.Module):  # an "SAE" whose codes are the fires above: counts by batches agree
        def encode(self, x):
            return fires[x[:, 0].long()]
    co, nf = report.firing_counts(Fixed(), torch.arange(n).double()[:, None], y, batch_size=333)
    assert torch.equal(co, y.T @ fires) and torch.equal(nf, fires.sum(0))


def test_world_labels_name_the_atom_in_each_slot():
    world = make_world(WorldConfig(d=8, families=(4, 3), n_slots=2, family_prob=0.6, seed=1))
    samples = world.sample(300, seed=2)
    labels, legend = report.world_labels(world, samples)
    assert labels.shape == (300, 4)
    assert [(g["slot"], len(g["values"])) for g in legend["groups"]] == [(0, 4), (0, 3), (1, 4), (1, 3)]
    for col, (s, f) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        members = (world.family == f).nonzero().squeeze(1)
        present = samples.coefs[:, s, members] > 0
        assert torch.equal(labels[:, col] >= 0, present.any(1))
        rows = present.any(1)
        assert present[rows, labels[rows, col]].all()
    assert (labels == -1).any()  # family_prob < 1: some objects lack a family


def test_scenes_labels_are_recovered_from_the_generator():
    from sae.lm import scenes

    source = {"kind": "generator", "function": "sae.lm.scenes.generate_tokens", "n_sequences": 40, "seed": 3,
              "split": "test"}
    seq = torch.tensor([5, 0, 39, 5, 17])
    batch = report.regenerate_scenes(source, 40)
    labels, groups, names = report.scene_labels(batch, seq)
    assert labels.shape == (5, scenes.MAX_OBJECTS * 3) and names[0] == "object 1"
    objects = [sc.objects for sc in scenes.sample_scenes(40, 3, "test")]
    for r, i in enumerate(seq.tolist()):
        for j in range(scenes.MAX_OBJECTS):
            for a, attr in enumerate(scenes.ATTRIBUTES):
                g = groups[3 * j + a]
                assert (g["slot"], g["family"]) == (j, attr)
                want = getattr(objects[i][j], attr) if j < len(objects[i]) else None
                got = labels[r, 3 * j + a].item()
                assert (g["values"][got] if got >= 0 else None) == want
    # a prefix of the source is the same scenes as the whole
    assert torch.equal(report.regenerate_scenes(source, 18).tokens, batch.tokens[:18])
    with pytest.raises(report.ReportError, match="the source has 40"):
        report.regenerate_scenes(source, 41)

    # the check compares every cached token of the rows' sequences with the regenerated ones
    s_idx = seq.repeat_interleave(scenes.N_CTX)
    pos = torch.arange(scenes.N_CTX).repeat(len(seq))
    tokens = batch.tokens[s_idx, pos].int()
    report.check_scene_tokens(batch, s_idx, pos, tokens)
    other = report.regenerate_scenes({**source, "seed": 4}, 40)
    with pytest.raises(report.ReportError, match="differ from the regenerated scenes"):
        report.check_scene_tokens(other, s_idx, pos, tokens)
