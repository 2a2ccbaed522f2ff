"""Sharing dictionaries through the Hugging Face Hub, offline: sae.load from a Hub cache laid out as
huggingface_hub lays it out (blobs, snapshot symlinks, refs) with HF_HUB_OFFLINE=1; a SAELens
release resolved through sae-lens' own directory; the upload against a mocked HfApi that records
its calls, then read back through the same offline cache."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sae
from sae.core import hub
from sae.core.io import LoadError
from sae.eval import dashboard, upload as upload_cli

D = 8


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """Files as huggingface_hub caches a download: content-addressed blobs, a snapshot folder of
    relative symlinks to them named by a commit hash, and refs/<revision> holding that hash."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


def folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.name}" if prefix else p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: huggingface_hub reads both settings at import, so its
    constants are set as well as the environment."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def trained_run(tmp_path) -> Path:
    torch.manual_seed(0)
    x = torch.randn(2048, D)
    return sae.train(sae.TopKSAE(D, 32, k=4), x, steps=30, batch_size=256, run_dir=str(tmp_path / "run"),
                     metadata={"model_name": "scenes", "hook_name": "blocks.1.hook_resid_post"}).run_dir


def same_dictionary(a, b):
    x = torch.randn(64, a.d_in)
    assert type(a) is type(b) and torch.allclose(a.encode(x), b.encode(x)) and torch.allclose(a(x).x_hat, b(x).x_hat)


# ---- loading from a Hub repo --------------------------------------------------------------------
def test_load_from_a_hub_subfolder_offline(tmp_path, offline_hub):
    m = sae.TopKSAE(D, 24, k=3)
    m.save(tmp_path / "d")
    hub_cache(offline_hub, "someone/dicts", folder_files(tmp_path / "d", "layer1/topk"))
    same_dictionary(sae.load("someone/dicts/layer1/topk"), m)
    same_dictionary(sae.load("hf://someone/dicts/layer1/topk"), m)
    with pytest.raises(LoadError, match="no cfg.json"):  # the repo is cached, that folder is not in it
        sae.load("someone/dicts/layer2")
    with pytest.raises(LoadError, match="HF_HUB_OFFLINE=1") as e:  # never cached: fails at once, offline
        sae.load("someone/other/x")
    assert "\n" not in str(e.value)


def test_binding_dictionary_and_revision_from_the_hub(tmp_path, offline_hub):
    """A binding SAE needs its binding_weights.safetensors too; a tag resolves through refs/."""
    m = sae.BindingSAE(D, 12, n_slots=2, k=3)
    with torch.no_grad():
        m.transform_param.normal_()
    m.save(tmp_path / "b")
    hub_cache(offline_hub, "someone/binding", folder_files(tmp_path / "b", ""), revision="v1")
    with pytest.raises(LoadError):  # only the tag v1 exists in the cache, no main
        sae.load("hf://someone/binding")
    same_dictionary(sae.load("hf://someone/binding", revision="v1"), m)


def test_a_local_folder_wins_over_a_hub_id(tmp_path, offline_hub, monkeypatch):
    m = sae.TopKSAE(D, 16, k=2)
    monkeypatch.chdir(tmp_path)
    m.save("someone/dicts")  # a local folder named like a repo id: no Hub look-up at all
    same_dictionary(sae.load("someone/dicts"), m)
    with pytest.raises(LoadError, match="not a directory"):
        sae.load("someone/missing")  # 'someone' exists here, so this is a local path


def test_hf_hub_offline_in_a_fresh_process(tmp_path):
    """The environment as a user sets it, before huggingface_hub is imported."""
    m = sae.TopKSAE(D, 16, k=2)
    m.save(tmp_path / "d")
    cache = tmp_path / "hf"
    hub_cache(cache, "a-b/c.d", folder_files(tmp_path / "d", "x"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    code = "import sae, torch; print(float(sae.load('a-b/c.d/x').W_dec.sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(float(m.W_dec.detach().sum()), rel=1e-6)


# ---- SAELens releases ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release_directory():
    pytest.importorskip("sae_lens")
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()  # ~10 s the first time (sae-lens imports transformer-lens)


def test_saelens_release_loads_from_its_repo(tmp_path, offline_hub, release_directory):
    """gpt2-small-res-jb, through sae-lens' directory, from a cached copy of its repo in the old
    SAELens layout (hook_point, no architecture): a standard ReLU SAE, whose codes we check by hand."""
    release, sae_id = "gpt2-small-res-jb", "blocks.8.hook_resid_pre"
    lookup = release_directory[release]
    torch.manual_seed(0)
    w = {"W_enc": torch.randn(D, 20), "b_enc": torch.randn(20), "W_dec": torch.randn(20, D), "b_dec": torch.randn(D)}
    from safetensors.torch import save as to_bytes

    cfg = {"d_in": D, "d_sae": 20, "hook_point": sae_id, "model_name": "gpt2-small", "dtype": "float32",
           "normalize_activations": "none", "device": "cpu"}
    folder = lookup.saes_map[sae_id]
    hub_cache(offline_hub, lookup.repo_id, {f"{folder}/cfg.json": json.dumps(cfg).encode(),
                                            f"{folder}/sae_weights.safetensors": to_bytes(w)})
    m = sae.load(release, sae_id=sae_id)
    x = torch.randn(32, D)
    assert isinstance(m, sae.ReLUSAE)
    assert torch.allclose(m.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]), atol=1e-5)


def test_release_errors_are_one_line(tmp_path, offline_hub, release_directory, capsys):
    with pytest.raises(LoadError, match="unknown SAELens release 'gpt2-small-res-jbb'; did you mean gpt2-small-res-jb"):
        sae.load("gpt2-small-res-jbb", sae_id="blocks.8.hook_resid_pre")
    with pytest.raises(LoadError, match="has no SAE id 'blocks.99.hook_resid_pre'"):
        sae.load("gpt2-small-res-jb", sae_id="blocks.99.hook_resid_pre")
    converted = next(r for r, v in release_directory.items() if v.conversion_func)
    with pytest.raises(LoadError, match="needs SAELens' own converter"):
        sae.load(converted, sae_id=next(iter(release_directory[converted].saes_map)))
    # the same through a command: one line, exit 2, nothing written
    out = tmp_path / "dash"
    assert dashboard.main(["not-a-release", "--sae-id", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dashboard: error: unknown SAELens release") and "\n" not in err and not out.exists()


# ---- uploading ----------------------------------------------------------------------------------
class FakeApi:
    """Records what HfApi would have been asked to do."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        FakeApi.last = self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, operations, kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123")


def uploaded(ops) -> dict[str, bytes]:
    """path in repo -> bytes of each CommitOperationAdd (a local file path or bytes)."""
    out = {}
    for op in ops:
        src = op.path_or_fileobj
        out[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else src
    return out


def test_upload_commits_the_dictionary_and_a_card_that_loads_back(tmp_path, offline_hub):
    run = trained_run(tmp_path)
    api = FakeApi()
    commit = hub.upload(run, "me/dicts", path_in_repo="topk-32", api=api)
    assert commit.commit_url.endswith("/commit/0123")
    (c1, repo, kw), (c2, repo2, ops, kw2) = api.calls
    assert (c1, repo, kw["exist_ok"], kw["private"], c2, repo2) == ("create_repo", "me/dicts", True, False,
                                                                     "create_commit", "me/dicts")
    files = uploaded(ops)
    assert set(files) == {f"topk-32/{n}" for n in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
                                                    "README.md")}
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert files[f"topk-32/{name}"] == (run / "sae" / name).read_bytes()
    card = files["topk-32/README.md"].decode()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"| fvu | {metrics['fvu']:.4g} |" in card and f"over {metrics['tokens']} activations" in card
    assert 'sae.load("me/dicts/topk-32")' in card and "blocks.1.hook_resid_post" in card and "SAE.load_from_disk" in card
    hub_cache(offline_hub, "me/dicts", files)  # what the Hub would then serve
    same_dictionary(sae.load("me/dicts/topk-32"), sae.load(run / "sae"))


def test_upload_command_and_its_bad_input(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    run = trained_run(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert upload_cli.main([str(run), "me/dicts", "--private"]) == 0
    ops = FakeApi.last.calls[1][2]
    assert FakeApi.last.calls[0][2]["private"] is True and {op.path_in_repo for op in ops} >= {"cfg.json", "README.md"}
    assert "commit/0123" in capsys.readouterr().out
    FakeApi.last = None
    for argv, words in (([str(tmp_path / "none"), "me/dicts"], "neither a dictionary folder"),
                        ([str(run), "not-a-repo-id"], "must be owner/name"),
                        ([str(run), "me/dicts", "--path-in-repo", "../up"], "no '..'")):
        assert upload_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("upload: error:") and words in err and "\n" not in err
    (run / "sae" / "sae_weights.safetensors").write_bytes(b"garbage")  # refused before anything is sent
    assert upload_cli.main([str(run), "me/dicts"]) == 2 and "corrupt" in capsys.readouterr().err
    assert FakeApi.last is None
