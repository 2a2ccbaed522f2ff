"""The reader (sae/store.py): global shuffle, exact resume, flat memory, and clear errors for bad
caches. Caches are written from tensors (sae.lm.cache.write_tensors): no model needed."""

import json
from pathlib import Path

import pytest
import torch

from sae.lm.cache import write_tensors
from sae.core.store import ActivationStore, CacheError, TensorStore, make_store, open_cache


def indexed(n, d=4):
    """Row i is (i, i, ..., i): a batch says exactly which rows it holds."""
    return torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)


@pytest.fixture
def cache(tmp_path):
    """1000 rows in 7 shards (the last one short)."""
    return write_tensors(tmp_path / "c", indexed(1000), shard_rows=150)


def rows(store, n_batches):
    return torch.cat([store.next_batch()[:, 0] for _ in range(n_batches)]).long()


def one_line(e):
    return "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# the order

def test_each_epoch_is_a_fresh_permutation_across_shards(cache):
    s = make_store(cache, batch_size=100, seed=0, block_rows=50, buffer_rows=200)  # 4 blocks per buffer
    e0, e1 = rows(s, 10), rows(s, 10)
    assert sorted(e0.tolist()) == list(range(1000)) and sorted(e1.tolist()) == list(range(1000))
    assert not torch.equal(e0, e1)
    first = e0[:100] // 150  # shard of each row of the first batch: drawn from several shards
    assert len(set(first.tolist())) >= 3
    # deterministic from the seed
    assert torch.equal(rows(make_store(cache, batch_size=100, seed=0, block_rows=50, buffer_rows=200), 10), e0)
    assert not torch.equal(rows(make_store(cache, batch_size=100, seed=1, block_rows=50, buffer_rows=200), 10), e0)


def test_batches_cross_buffer_and_epoch_ends(cache):
    s = make_store(cache, batch_size=300, seed=3, block_rows=64, buffer_rows=256)
    got = rows(s, 10)  # 3000 rows: exactly 3 epochs, batches straddling buffers and epochs
    for e in range(3):
        assert sorted(got[e * 1000:(e + 1) * 1000].tolist()) == list(range(1000))


def test_small_cache_is_shuffled_exactly_like_the_tensor(cache):
    """A cache that fits one buffer is one global permutation, the same as the in-memory store's."""
    a, b = make_store(cache, batch_size=64, seed=5), make_store(indexed(1000), batch_size=64, seed=5)
    assert isinstance(b, TensorStore) and a.d_in == b.d_in == 4 and a.n_rows == b.n_rows == 1000
    for _ in range(40):
        assert torch.equal(a.next_batch(), b.next_batch())


@pytest.mark.parametrize("make", [
    lambda c: make_store(c, batch_size=70, seed=2, block_rows=32, buffer_rows=100),
    lambda c: make_store(indexed(1000), batch_size=70, seed=2),
])
@pytest.mark.parametrize("skip", [0, 1, 3, 14, 15, 29])  # 14/15: at and across the epoch end
def test_restored_store_continues_exactly(cache, make, skip):
    s = make(cache)
    for _ in range(skip):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # survives JSON
    assert len(json.dumps(state)) < 300
    expected = [s.next_batch() for _ in range(20)]
    t = make(cache)
    t.next_batch()  # a store elsewhere in its stream
    t.load_state_dict(state)
    assert all(torch.equal(t.next_batch(), x) for x in expected)


def test_state_from_other_data_or_options_is_refused(cache):
    state = make_store(cache, batch_size=10, seed=0).state_dict()
    with pytest.raises(CacheError, match="store state has seed=0 but this store has seed=1"):
        make_store(cache, batch_size=10, seed=1).load_state_dict(state)
    with pytest.raises(CacheError, match="kind='cache' but this store has kind='tensor'"):
        make_store(indexed(1000), batch_size=10, seed=0).load_state_dict(state)
    with pytest.raises(CacheError, match="block_rows"):
        make_store(cache, batch_size=10, seed=0, block_rows=7).load_state_dict(state)


def test_several_hooks_and_dtypes(tmp_path):
    x, y = torch.randn(300, 8), torch.randn(300, 3)
    path = write_tensors(tmp_path / "c", {"blocks.0.hook_resid_post": x, "blocks.0.mlp.hook_post": y},
                         shard_rows=128, dtype="bfloat16")
    with pytest.raises(CacheError, match="holds several hooks .*: choose one") as e:
        make_store(path, batch_size=10)
    assert one_line(e)
    with pytest.raises(CacheError, match="has no hook 'blocks.1.hook_resid_post'"):
        make_store(path, batch_size=10, hook="blocks.1.hook_resid_post")
    s = make_store(path, batch_size=300, hook="blocks.0.mlp.hook_post")
    b = s.next_batch()
    assert s.d_in == 3 and b.dtype == torch.float32
    assert torch.equal(torch.sort(b[:, 0]).values, torch.sort(y[:, 0].bfloat16().float()).values)
    assert torch.equal(open_cache(path).read("blocks.0.hook_resid_post", 100, 200), x[100:200].bfloat16())


# -----------------------------------------------------------------------------
# memory

def status_kb(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    pytest.skip(f"no {key} in /proc/self/status")


def test_memory_stays_flat_on_a_cache_much_larger_than_the_buffer(tmp_path):
    """96 MB of cache in 3 shards of 32 MB, a 2 MB buffer: streaming it twice must raise the peak
    resident memory (VmHWM, reset through clear_refs, so transient peaks count) by far less than
    one shard. Reading whole shards (+65 MB) or memory-mapping them (+92 MB: mapped file pages are
    resident) fails this; positioned reads into the fixed buffer measure about +6 MB."""
    n, d = 24576, 1024
    path = write_tensors(tmp_path / "big", torch.randn(n, d, generator=torch.Generator().manual_seed(0)),
                         shard_rows=8192)
    s = ActivationStore(path, batch_size=512, seed=0, block_rows=128, buffer_rows=512, verify=False)
    s.next_batch()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    base = status_kb("VmRSS")
    for _ in range(2 * n // 512):
        s.next_batch()
    growth_mb = (status_kb("VmHWM") - base) / 1024
    assert growth_mb < 16, f"peak memory grew {growth_mb:.1f} MB while streaming 192 MB"
    assert s.state_dict()["epoch"] == 2  # it really went through the whole cache twice


# -----------------------------------------------------------------------------
# bad caches and options: one line, naming the file

def rewrite_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    for k, v in changes.items():
        m[k] = v(m[k]) if callable(v) else v
    (path / "manifest.json").write_text(json.dumps(m))


def test_truncated_shard(cache):
    f = cache / "shard-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CacheError, match="shard-00002.safetensors: truncated") as e:
        make_store(cache, batch_size=10, verify=False)  # caught by the size check, without hashing
    assert one_line(e)


def test_corrupt_shard_fails_checksum(cache):
    f = cache / "shard-00001.safetensors"
    b = bytearray(f.read_bytes())
    b[-7] ^= 0xFF  # a data byte: size and header still fine
    f.write_bytes(bytes(b))
    with pytest.raises(CacheError, match="shard-00001.safetensors: sha256 mismatch") as e:
        make_store(cache, batch_size=10)
    assert one_line(e)
    make_store(cache, batch_size=10, verify=False)  # the opt-out for huge caches skips only the hash


def test_corrupt_header(cache):
    f = cache / "shard-00000.safetensors"
    b = bytearray(f.read_bytes())
    b[8:12] = b"\xff\xff\xff\xff"
    f.write_bytes(bytes(b))
    with pytest.raises(CacheError, match="shard-00000.safetensors: corrupt safetensors header"):
        make_store(cache, batch_size=10, verify=False)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(CacheError, match="shard-00000.safetensors: not a safetensors file"):
        make_store(cache, batch_size=10, verify=False)


def test_manifest_that_does_not_match_the_files(cache):
    (cache / "shard-00006.safetensors").unlink()
    with pytest.raises(CacheError, match="shard-00006.safetensors: shard listed in manifest.json is missing"):
        make_store(cache, batch_size=10)


def test_manifest_rows_or_d_in_differ_from_the_shard(tmp_path):
    a = write_tensors(tmp_path / "a", indexed(300), shard_rows=100)
    rewrite_manifest(a, shards=lambda s: [{**s[0], "rows": 99}, *s[1:]], n_tokens=299)
    with pytest.raises(CacheError, match="shard-00000.safetensors: 'activations' is F32 \\[100, 4\\], manifest says float32 \\[99, 4\\]"):
        make_store(a, batch_size=10)
    b = write_tensors(tmp_path / "b", indexed(300), shard_rows=100)
    rewrite_manifest(b, d_in={"activations": 5})
    with pytest.raises(CacheError, match="manifest says float32 \\[100, 5\\]"):
        make_store(b, batch_size=10)
    c = write_tensors(tmp_path / "c", indexed(300), shard_rows=100)
    rewrite_manifest(c, n_tokens=301)
    with pytest.raises(CacheError, match="shards hold 300 rows but n_tokens is 301"):
        make_store(c, batch_size=10)


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no such cache directory"):
        make_store(tmp_path / "nope", batch_size=10)
    (tmp_path / "d").mkdir()
    with pytest.raises(CacheError, match="no manifest.json, not a finished activation cache$"):
        make_store(tmp_path / "d", batch_size=10)
    (tmp_path / "d" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt JSON"):
        make_store(tmp_path / "d", batch_size=10)
    (tmp_path / "d" / "manifest.json").write_text('{"format": "sae-activation-cache", "version": 9}')
    with pytest.raises(CacheError, match="format version 9, this reader reads 1"):
        make_store(tmp_path / "d", batch_size=10)


def test_d_in_mismatch(cache):
    with pytest.raises(CacheError, match="hook activations\\) has d_in=4 but the SAE expects d_in=16") as e:
        make_store(cache, batch_size=10, d_in=16)
    assert one_line(e)
    with pytest.raises(CacheError, match="data has d_in=4 but the SAE expects d_in=16"):
        make_store(indexed(10), batch_size=10, d_in=16)


def test_nan_rows_are_named(tmp_path):
    """NaN in a stored shard (written past the writer's own check) is reported with shard and rows."""
    path = write_tensors(tmp_path / "c", indexed(400), shard_rows=100)
    f = path / "shard-00002.safetensors"
    from safetensors.torch import load_file, save_file
    t = load_file(f)
    t["activations"][[17, 42], 1] = float("nan")
    save_file(t, f)
    from sae.core.store import sha256_file
    rewrite_manifest(path, shards=lambda s: [*s[:2], {**s[2], "sha256": sha256_file(f)}, s[3]])
    s = make_store(path, batch_size=400, seed=0, block_rows=50, buffer_rows=100)
    with pytest.raises(CacheError, match="NaN/inf activations in .* hook activations: shard-00002.safetensors rows 17, 42 \\(2 rows") as e:
        s.next_batch()
    assert one_line(e)
    x = indexed(20)
    x[3, 0] = float("inf")
    with pytest.raises(CacheError, match="NaN/inf activations in data rows 3 "):
        make_store(x, batch_size=20).next_batch()


@pytest.mark.parametrize("kw, msg", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=1001), "batch_size 1001 is larger than the 1000 rows"),
    (dict(block_rows=0), "block_rows must be a positive integer"),
    (dict(buffer_rows=-5), "buffer_rows must be a positive integer"),
])
def test_invalid_store_options(cache, kw, msg):
    with pytest.raises(CacheError, match=msg):
        make_store(cache, **{"batch_size": 10, **kw})


def test_bad_data_arguments():
    with pytest.raises(CacheError, match="data must be a tensor or a cache directory"):
        make_store([1, 2, 3], batch_size=1)
    with pytest.raises(CacheError, match="data must be a \\(N, d_in\\) float tensor"):
        make_store(torch.zeros(10, dtype=torch.long), batch_size=1)
    with pytest.raises(CacheError, match="data is empty"):
        make_store(torch.zeros(0, 4), batch_size=1)
    with pytest.raises(CacheError, match="empty dataset"):
        write_tensors("/tmp/never-written", torch.zeros(0, 4))
