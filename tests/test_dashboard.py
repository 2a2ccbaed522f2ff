"""Feature dashboards (sae/eval/dashboard.py, sae/eval/latent_stats.py) on a small scenes cache and
a TopK SAE trained on it: the pages against a brute-force pass over the whole cache, the streamed
source against the cache, the memory bound, the output folder's rules, bad input, a binding SAE's
slots; and the site in a real browser: Debian's headless Chromium, driven through chromedriver."""
import errno
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sae
from sae.core import files
from sae.core.store import Cache
from sae.eval import dashboard, webdriver
from sae.eval.latent_stats import Block, Histograms, LatentStats
from sae.lm import models
from sae.lm.cache import CacheConfig, write_cache, write_tensors

HOOK = "blocks.1.hook_resid_post"
SMALL = ["--top-k", "6", "--samples", "8", "--context", "4", "--block-rows", "300"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A 96-scene cache in 4 shards and a 128-latent TopK SAE trained on it (a real run folder)."""
    root = tmp_path_factory.mktemp("dash")
    model = models.load_model("scenes")
    cache = write_cache(CacheConfig(out=str(root / "cache"), n_sequences=96, batch_size=32, shard_rows=700), model=model)
    torch.manual_seed(0)
    run = sae.train(sae.TopKSAE(64, 128, k=4), str(cache), steps=60, batch_size=256, run_dir=str(root / "run")).run_dir
    return SimpleNamespace(root=root, cache=Path(cache), run=run, model=model)


def build(argv) -> int:
    return dashboard.main([str(a) for a in argv])


def site(out: Path) -> tuple[dict, dict]:
    """(index, {latent: entry}) read back from the data files (JSON inside one call each)."""
    def payload(f):
        text = f.read_text()
        return json.loads("[" + text[text.index("(") + 1: text.rindex(")")] + "]")

    index = payload(out / "data" / "index.js")[0]
    entries, vocab = {}, {}
    for f in sorted((out / "data").glob("latents-*.js")):
        _, shard = payload(f)
        vocab.update(shard["vocab"])
        entries.update({e["i"]: e for e in shard["latents"]})
    return index, {"entries": entries, "vocab": vocab}


@pytest.fixture(scope="module")
def built(scenes):
    out = scenes.root / "site"
    assert build([scenes.run, "--out", out, *SMALL]) == 0
    return out


def brute_force(scenes):
    """Every row's codes and columns, the whole cache at once (what the pass must not need)."""
    c = Cache(scenes.cache)
    m = sae.load(scenes.run / "sae")
    with torch.no_grad():
        codes = m.encode(c.read(HOOK))
    seq, pos, tok = (c.read(k) for k in ("seq_index", "position", "token_ids"))
    row_of = {(s, p): r for r, (s, p) in enumerate(zip(seq.tolist(), pos.tolist()))}
    return codes, seq, pos, tok, row_of


# ---- the pages hold what a brute-force pass says --------------------------------------------------
def test_pages_match_a_brute_force_pass(scenes, built):
    codes, seq, pos, tok, row_of = brute_force(scenes)
    index, data = site(built)
    entries = data["entries"]
    assert index["meta"]["rows"] == len(codes) and len(entries) == 128 and index["meta"]["token_sep"] == " "
    for i, e in entries.items():
        col = codes[:, i]
        assert e["count"] == int((col > 0).sum()) and e["density"] == pytest.approx(e["count"] / len(codes))
        assert sum(e["hist"]["counts"]) == e["count"]
        if not e["count"]:
            assert e["top"] == [] and e["samples"] == []
            continue
        assert e["max"] == pytest.approx(float(col.max()), rel=1e-3)
        top = col.topk(min(6, e["count"])).values
        assert [c["act"] for c in e["top"]] == pytest.approx(top.tolist(), rel=1e-3)
        for c in e["top"] + e["samples"]:
            check_context(c, i, e, codes, seq, tok, row_of)
        assert len(e["samples"]) == min(8, e["count"]) and all(0 <= c["pct"] <= 100 for c in e["samples"])
        assert len({(c["seq"], c["pos"][c["peak"]]) for c in e["samples"]}) == len(e["samples"])  # no repeats


def check_context(c, i, e, codes, seq, tok, row_of):
    """A context is the rows around its peak in the peak's own sequence, in order, with their
    tokens and this latent's activation on each (in thousandths of its maximum)."""
    peak = row_of[(c["seq"], c["pos"][c["peak"]])]
    assert float(codes[peak, i]) == pytest.approx(c["act"], rel=1e-3) and codes[peak, i] > 0
    rows = [r for r in range(peak - 4, peak + 5) if 0 <= r < len(seq) and seq[r] == seq[peak]]
    assert [row_of[(c["seq"], p)] for p in c["pos"]] == rows
    assert c["tok"] == tok[rows].tolist()
    expected = (codes[rows, i] / float(codes[:, i].max()) * 1000).round().clamp(0, 1000)
    assert (torch.tensor(c["a"]) - expected).abs().max() <= 1


def test_streamed_source_gives_the_pages_the_cache_gives(scenes, built, tmp_path):
    """No cache: the model run over the generator (same seed, split and sequences as the cache)
    yields the same rows, so the same counts and histograms, and top contexts of the same values
    that are real contexts of the cache (scenes sharing a prefix tie exactly, so which of the tied
    rows is shown may differ in the last bits of the encoder's arithmetic)."""
    out = tmp_path / "stream"
    assert build([scenes.run, "--out", out, "--source", "generator", "--n-sequences", 96, "--batch-size", 32, *SMALL]) == 0
    (a_index, a), (b_index, b) = site(built), site(out)
    assert b_index["meta"]["rows"] == a_index["meta"]["rows"] and "run over generator" in b_index["meta"]["data"]
    codes, seq, pos, tok, row_of = brute_force(scenes)
    for i, e in a["entries"].items():
        f = b["entries"][i]
        assert (f["count"], f["hist"]["counts"]) == (e["count"], e["hist"]["counts"])
        assert f["max"] == pytest.approx(e["max"], rel=1e-4)
        assert [c["act"] for c in f["top"]] == pytest.approx([c["act"] for c in e["top"]], rel=1e-4)
        for c in f["top"] + f["samples"]:
            check_context(c, i, f, codes, seq, tok, row_of)


def test_a_run_trained_on_a_stream_needs_no_options(scenes, built, tmp_path):
    """A run trained straight from the model (sae.lm.stream) has no cache: the dashboard runs the
    model over the stream's own source (here the cache's: 96 generated scenes, seed 0), so its
    counts are the cache-based pages' counts."""
    from sae.lm.stream import ModelStream, StreamConfig

    stream = ModelStream(StreamConfig(model="scenes", hooks=[HOOK], n_sequences=96, forward_batch=32, buffer_rows=1024))
    torch.manual_seed(0)
    run = sae.train(sae.TopKSAE(64, 128, k=4), stream, steps=20, batch_size=256, run_dir=str(tmp_path / "run")).run_dir
    assert "cache" not in json.loads((run / "config.json").read_text())["data"]
    assert build([run, "--latents", "0-15", *SMALL]) == 0  # RUN/dashboard, from the stream's source
    index, data = site(run / "dashboard")
    assert "scenes run over generator" in index["meta"]["data"] and index["meta"]["rows"] == site(built)[0]["meta"]["rows"]
    m = sae.load(run / "sae")
    with torch.no_grad():
        codes = m.encode(Cache(scenes.cache).read(HOOK))
    assert [data["entries"][i]["count"] for i in range(16)] == (codes[:, :16] > 0).sum(0).tolist()


def test_output_tokens_and_neighbours(scenes, built):
    m = sae.load(scenes.run / "sae")
    model = scenes.model
    W = (model.W_U * model.ln_final.w[:, None]).detach()
    _, data = site(built)
    for i in (0, 77):
        e, logits = data["entries"][i], m.W_dec[i].detach() @ W
        assert [t for t, _ in e["logits"]["up"]] == logits.topk(10).indices.tolist()
        assert [t for t, _ in e["logits"]["down"]] == (-logits).topk(10).indices.tolist()
        cos = torch.nn.functional.normalize(m.W_dec.detach(), dim=1) @ torch.nn.functional.normalize(m.W_dec[i].detach(), dim=0)
        cos[i] = -2
        assert [j for j, _ in e["near"]] == cos.topk(8).indices.tolist()
    assert data["vocab"][str(models.get_tokenizer("scenes").encode("red")[0])] == "red"


# ---- memory: one streaming pass in bounded blocks ---------------------------------------------------
def test_the_pass_reads_blocks_never_the_whole_cache(scenes, tmp_path, monkeypatch):
    reads = []
    original = Cache.read_into

    def spy(self, out, name, shard, r0, r1):
        reads.append((name, r1 - r0))
        return original(self, out, name, shard, r0, r1)

    monkeypatch.setattr(Cache, "read_into", spy)
    monkeypatch.setattr(Cache, "read", lambda *a, **k: pytest.fail("read the cache whole"))
    assert build([scenes.run, "--out", tmp_path / "d", *SMALL]) == 0
    hook_reads = [n for name, n in reads if name == HOOK]
    n_rows = Cache(scenes.cache).n_rows
    assert max(hook_reads) <= 300 and sum(hook_reads) == n_rows  # every row once: blocks end where sequences do


def status_kb(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    pytest.skip(f"no {key} in /proc/self/status")


def test_peak_memory_stays_flat_on_a_cache_much_larger_than_a_block(tmp_path):
    """64 MB of activations in 4 shards, blocks of 1,024 rows (1 MB): the whole pass must raise
    the peak resident memory (VmHWM, reset through clear_refs) by far less than the cache."""
    n, d = 65536, 256
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    cache = write_tensors(tmp_path / "big", x, hook=HOOK, shard_rows=16384)
    del x
    torch.manual_seed(0)
    sae.TopKSAE(d, 256, k=8).save(tmp_path / "dict", metadata={"hook_name": HOOK})
    cfg = dashboard.DashboardConfig(out=str(tmp_path / "site"), cache=str(cache), block_rows=1024, top_k=8,
                                    samples=8, context=2)
    inputs = dashboard.resolve(str(tmp_path / "dict"), cfg)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    base = status_kb("VmRSS")
    stats = dashboard.collect(inputs, cfg, None)
    growth_mb = (status_kb("VmHWM") - base) / 1024
    assert stats.rows == n and int(stats.count.sum()) == 8 * n  # it went through every row (TopK: 8 each)
    assert growth_mb < 24, f"peak memory grew {growth_mb:.1f} MB over a pass of a 64 MB cache"


def test_state_does_not_grow_with_rows():
    """The bound of latent_stats.py: the same bytes after 1 block or 50 (and as its formula says)."""
    stats = LatentStats(300, top_k=5, samples=7, context=3, bins=16)
    n, k, width = 300, 5 + 7, 7
    assert stats.state_bytes() == n * (k * (12 * width + 24) + 8 * 16 + 24)
    before = stats.state_bytes()
    for b in range(50):
        codes = torch.relu(torch.randn(200, n) - 1.5)
        stats.update(Block(codes, torch.zeros(200, dtype=torch.int32), torch.arange(200) // 20 + 10 * b,
                           torch.arange(200, dtype=torch.int32) % 20, 200 * b))
    assert stats.state_bytes() == before and stats.rows == 10000


def test_histograms_are_exact_whatever_order_values_arrive_in():
    """Growing the range merges bins exactly: the same counts as binning with the final range."""
    values = torch.rand(4000) ** 3 * torch.logspace(-2, 2, 4000)  # the maximum arrives late
    h = Histograms(1, 16)
    for chunk in values.split(100):
        h.add(torch.zeros(len(chunk), dtype=torch.long), chunk, chunk.max()[None])
    hi = float(h.hi[0])
    assert values.max() < hi <= 2 * values.max() and math.log2(hi) == int(math.log2(hi))
    assert torch.equal(h.counts[0], torch.bincount((values * 16 / hi).long(), minlength=16))
    with pytest.raises(ValueError, match="power of two"):
        Histograms(1, 12)


# ---- the output folder and bad input --------------------------------------------------------------
def one_line_error(capsys, words):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("dashboard: error:") and words in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)


def test_output_folder_rules(scenes, tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("mine")
    assert build([scenes.run, "--out", foreign]) == 2
    one_line_error(capsys, "not a dashboard")
    assert [p.name for p in foreign.iterdir()] == ["paper.tex"]

    out = tmp_path / "d"
    assert build([scenes.run, "--out", out, "--latents", "0-9", *SMALL]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = dashboard.js_call

    def full_disk(fn, *args):
        if fn == "index":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fn, *args)

    monkeypatch.setattr(dashboard, "js_call", full_disk)
    assert build([scenes.run, "--out", out, "--latents", "0-19", *SMALL]) == 2
    one_line_error(capsys, "disk full")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier one, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "notes"]  # no temporary folder left
    monkeypatch.setattr(dashboard, "js_call", real)
    assert build([scenes.run, "--out", out, "--latents", "0-19", *SMALL]) == 0  # an earlier dashboard is replaced
    assert len(site(out)[0]["latents"]) == 20


def test_bad_input_is_one_line_and_writes_nothing(scenes, tmp_path, capsys):
    moved = tmp_path / "run"
    shutil.copytree(scenes.run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["cache"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    shutil.copytree(scenes.run / "sae", tmp_path / "dict")  # a dictionary on its own, no run around it
    out = tmp_path / "out"
    cases = [([moved], "no such cache directory; pass --cache DIR, or --source"),
             ([scenes.run, "--hook", "blocks.0.hook_resid_post"], "does not hold hook 'blocks.0.hook_resid_post'"),
             ([scenes.run, "--latents", "5,128"], "--latents names latent 128, out of range: the dictionary has 128"),
             ([scenes.run, "--latents", "a-b"], "--latents must be latent ids"),
             ([scenes.run, "--bins", "30"], "--bins must be a power of two"),
             ([scenes.run, "--cache", scenes.cache, "--source", "generator"], "--cache and --source both"),
             ([tmp_path / "dict"], "pass --out"),
             ([tmp_path / "nothing"], "no such run or dictionary directory")]
    for argv, words in cases:
        assert build([*argv, "--out", out] if "pass --out" not in words else argv) == 2
        one_line_error(capsys, words)
        assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "dict").iterdir()) == ["cfg.json", "sae_weights.safetensors",
                                                                     "sparsity.safetensors"]


# ---- a binding SAE: the atom in every slot ----------------------------------------------------------
def test_binding_pages_show_the_atom_in_every_slot(scenes, tmp_path):
    torch.manual_seed(0)
    m = sae.BindingSAE(64, 16, n_slots=2, k=4, slot_transform="full")
    with torch.no_grad():
        m.transform_param.copy_(torch.linalg.qr(torch.randn(1, 64, 64))[0])
    m.save(tmp_path / "b", metadata={"model_name": "scenes", "hook_name": HOOK})
    out = tmp_path / "site"
    assert build([tmp_path / "b", "--cache", scenes.cache, "--latents", "3", "--out", out, *SMALL]) == 0
    index, data = site(out)
    assert sorted(data["entries"]) == [3, 19]  # the atom's latent in slot 2 comes along
    m = sae.load(tmp_path / "b")
    with torch.no_grad():
        codes = m.encode(Cache(scenes.cache).read(HOOK))
    b = data["entries"][19]["binding"]
    assert (b["atom"], b["slot"]) == (3, 1) and [s["latent"] for s in b["slots"]] == [3, 19]
    assert [s["count"] for s in b["slots"]] == [int((codes[:, j] > 0).sum()) for j in (3, 19)]
    d = m.dictionary.detach()
    moved = m.slot_transforms[1].detach() @ d[3]
    assert b["slots"][0]["self_cos"] == pytest.approx(1.0, abs=1e-3) and b["slots"][0]["near"][0][0] == 3
    assert b["slots"][1]["self_cos"] == pytest.approx(float(torch.cosine_similarity(moved, d[3], dim=0)), abs=1e-3)
    best = int((torch.nn.functional.normalize(d, dim=1) @ moved).argmax())
    assert b["slots"][1]["near"][0][0] == best


def test_site_is_self_contained(built):
    """No server and no network: every reference is a relative file that exists; no external URL."""
    import re

    html = (built / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert refs and all((built / r).is_file() for r in refs)
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = (built / name).read_text().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert dashboard.is_dashboard(built) and files.only_files(built, {"index.html", "dashboard.js", "dashboard.css",
                                                                      "data", "dashboard.json"})


# ---- in a real browser ------------------------------------------------------------------------------
@pytest.mark.skipif(bool(webdriver.available()), reason=webdriver.available() or "chromium present")
def test_in_headless_chromium(built, tmp_path):
    """Open the site from disk, sort, search by token, click a latent open; its histogram and
    contexts are drawn from its data file."""
    index, data = site(built)
    entries, vocab = data["entries"], data["vocab"]
    with webdriver.Browser(width=1280, height=1000) as b:
        b.get((built / "index.html").resolve().as_uri())
        b.wait_for("tr.row")
        assert len(b.find_all("tr.row")) == 128
        b.click(b.wait_for('th[data-sort="max"]'))  # sort by maximum activation, largest first
        shown = b.execute("return [...document.querySelectorAll('tr.row')].map(r => +r.dataset.latent)")
        assert [entries[i]["max"] for i in shown] == sorted((e["max"] for e in entries.values()), reverse=True)
        b.type(b.wait_for("#search"), "Sphere")  # search by token, case-insensitive
        found = b.execute("return [...document.querySelectorAll('tr.row')].map(r => +r.dataset.latent)")
        expected = {r[0] for r in index["latents"] if any("sphere" in t.lower() for t in r[5] + r[6])}
        assert found and set(found) == expected and len(found) < 128

        b.click(b.find_all("tr.row")[0])  # open the first match
        b.wait_for("#top .context")
        e = entries[found[0]]
        assert b.text(b.wait_for("#title")).startswith(f"Latent {found[0]}")
        heights = b.execute("return [...document.querySelectorAll('#histogram rect.bar')].map(r => +r.getAttribute('height'))")
        assert len(heights) == 32 and [h > 0 for h in heights] == [c > 0 for c in e["hist"]["counts"]]
        peaks = b.execute("return [...document.querySelectorAll('#top .context .tok.peak')].map(t => t.textContent)")
        assert len(b.find_all("#top .context")) == len(e["top"]) > 0
        assert peaks == [vocab[str(c["tok"][c["peak"]])] for c in e["top"]]
        assert len(b.find_all("#samples .context")) == len(e["samples"])
        assert len(b.find_all("#logits .chip.up")) == 10 and len(b.find_all("#near a")) == 8
        png = b.screenshot()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000

        b.execute("location.hash = 'latent=999'")
        assert "not in this dashboard" in b.text(b.wait_for("#app .error"))
