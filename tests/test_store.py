"""Stage keys and the stage store: reuse, integrity, crash safety and cross-process compute-once."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time

import pytest

from trainables.stages import store as store_mod
from trainables.stages.keys import stage_key
from trainables.stages.store import MANIFEST, CorruptEntry, StageStore, StoreError, get_or_compute

SPAWN = mp.get_context("spawn")
KEY = "finetune-0123456789abcdef0123"


# -- helpers (module level so spawned processes can import them) ---------------------------------------------------

def _write_outputs(out_dir: str, tag: str = "v1") -> None:
    os.makedirs(os.path.join(out_dir, "ckpt"), exist_ok=True)
    with open(os.path.join(out_dir, "model.bin"), "wb") as f:
        f.write(hashlib.sha256(tag.encode()).digest() * 5000)  # 160 kB
    with open(os.path.join(out_dir, "ckpt", "state.json"), "w") as f:
        json.dump({"tag": tag}, f)


def _counting_compute(counter: str, sleep: float, out_dir: str, tag: str = "v1") -> dict:
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(sleep)
    _write_outputs(out_dir, tag)
    return {"tag": tag, "pid": os.getpid()}


def _count(counter: str) -> int:
    if not os.path.exists(counter):
        return 0
    with open(counter) as f:
        return len(f.read().splitlines())


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root).replace(os.sep, "/")] = f.read()
    return out


def _worker_get_or_compute(root, key, counter, barrier, results):
    barrier.wait(timeout=300)  # every process imports torch first: tens of seconds on busy cores
    entry, computed = get_or_compute(StageStore(root), key, functools.partial(_counting_compute, counter, 0.5))
    results.put((entry.path, entry.manifest, computed))


def _worker_die_while_computing(root, key, started):
    def compute(out_dir):
        _write_outputs(out_dir, "doomed")
        started.set()
        time.sleep(60)  # killed here, holding the claim, with outputs half-way

    get_or_compute(StageStore(root), key, compute)


def _worker_key(results):
    results.put(stage_key("layerwise", {"lr": 0.1, "betas": (0.9, 0.999), "b": {"z": 1, "a": [None, True]}},
                          "classifier-abc", "cifar10@sha:1234", 3))


def _join_all(procs, timeout=300):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    _write_outputs(str(d))
    return str(d)


@pytest.fixture
def store(tmp_path):
    return StageStore(str(tmp_path / "store"))


# -- keys ----------------------------------------------------------------------------------------------------------

BASE = dict(kind="finetune", config={"lr": 0.001, "epochs": 10, "loss": {"weights": [1.0, 0.5]}},
            parent_key="topdown-1234", data_identity="cifar10@abc", seed=0)


def test_key_is_readable_and_stable_across_processes():
    key = stage_key(**BASE)
    assert key.startswith("finetune-") and len(key) == len("finetune-") + 20
    assert int(key.split("-", 1)[1], 16) >= 0
    # insertion order of mappings and tuple-vs-list do not matter
    reordered = dict(BASE, config={"loss": {"weights": (1.0, 0.5)}, "epochs": 10, "lr": 0.001})
    assert stage_key(**reordered) == key

    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_worker_key, args=(results,)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    _join_all(procs)
    here = stage_key("layerwise", {"b": {"a": [None, True], "z": 1}, "betas": [0.9, 0.999], "lr": 0.1},
                     "classifier-abc", "cifar10@sha:1234", 3)
    assert got[0] == got[1] == here


@pytest.mark.parametrize("change", [
    {"kind": "topdown"},
    {"config": {"lr": 0.002, "epochs": 10, "loss": {"weights": [1.0, 0.5]}}},
    {"config": {"lr": 0.001, "epochs": 10, "loss": {"weights": [1.0, 0.5, 0.0]}}},
    {"config": {"lr": 0.001, "epochs": 10.0, "loss": {"weights": [1.0, 0.5]}}},
    {"config": {"lr": 0.001, "epochs": 10, "loss": {"weights": [1.0, 0.5]}, "extra": None}},
    {"parent_key": None},
    {"parent_key": "topdown-1235"},
    {"data_identity": "cifar10@abd"},
    {"seed": 1},
])
def test_key_changes_with_every_input(change):
    assert stage_key(**dict(BASE, **change)) != stage_key(**BASE)


class _Color(enum.Enum):
    RED = 1


@pytest.mark.parametrize("config, path", [
    ({"opt": {"betas": [0.9, object()]}}, "config.opt.betas[1]"),
    ({"layers": {1, 2}}, "config.layers"),
    ({"m": {1: "a"}}, "config.m"),
    ({"c": _Color.RED}, "config.c"),
    ({"p": b"bytes"}, "config.p"),
])
def test_key_rejects_non_json_values_naming_the_path(config, path):
    with pytest.raises(TypeError) as err:
        stage_key("finetune", config, None, "d", 0)
    assert str(err.value).startswith(path + ":")


def test_key_validates_scalar_inputs():
    with pytest.raises(TypeError, match="seed"):
        stage_key("finetune", {}, None, "d", True)
    with pytest.raises(ValueError):
        stage_key("fine/tune", {}, None, "d", 0)


# -- store basics --------------------------------------------------------------------------------------------------

def test_put_get_roundtrip(store, src):
    assert not store.has(KEY) and store.keys() == []
    with pytest.raises(KeyError):
        store.get(KEY)
    before = _tree(src)

    entry = store.put(KEY, src, {"epochs": 3})
    assert store.has(KEY) and store.keys() == [KEY]
    got = store.get(KEY)
    assert got == entry
    files = _tree(got.path)
    manifest = json.loads(files.pop(MANIFEST))
    assert files == before == _tree(src)  # identical content, source left in place
    assert manifest == got.manifest and manifest["key"] == KEY and manifest["meta"] == {"epochs": 3}
    assert manifest["files"] == {rel: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                                 for rel, b in before.items()}
    assert store.meta(KEY) == {"epochs": 3}
    # a fresh handle on the same root sees the same entry
    assert StageStore(os.path.dirname(got.path)).get(KEY) == got


@pytest.mark.parametrize("atomic", [True, False])
def test_put_is_idempotent(tmp_path, src, atomic):
    store = StageStore(str(tmp_path / "store"), atomic_rename=atomic)
    first = store.put(KEY, src, {"n": 1})
    other = tmp_path / "other"
    _write_outputs(str(other), "v2")
    again = store.put(KEY, str(other), {"n": 2})
    assert again == first
    assert store.get(KEY).manifest == first.manifest
    assert _tree(first.path)["model.bin"] == _tree(src)["model.bin"]


def test_put_rejects_bad_input_without_writing(store, src):
    with pytest.raises(TypeError):
        store.put(KEY, src, {"x": object()})
    with pytest.raises(ValueError):
        store.put("../escape", src)
    with pytest.raises(ValueError):
        store.has("a.tmp-1")
    assert store.keys() == [] and not store.has(KEY)


def test_discard(store, src):
    store.put(KEY, src)
    store.discard(KEY)
    assert not store.has(KEY) and store.keys() == []
    store.discard(KEY)  # absent: no-op
    assert [n for n in os.listdir(store.root) if not n.startswith(".")] == []


# -- integrity -----------------------------------------------------------------------------------------------------

def test_truncated_file_is_detected_and_recomputed(store, tmp_path, caplog):
    counter = str(tmp_path / "counter")
    compute = functools.partial(_counting_compute, counter, 0.0)
    entry, computed = get_or_compute(store, KEY, compute)
    assert computed and _count(counter) == 1

    target = os.path.join(entry.path, "model.bin")
    with open(target, "r+b") as f:
        f.truncate(1000)
    assert store.has(KEY)  # has() is cheap and does not verify
    with pytest.raises(CorruptEntry) as err:
        store.get(KEY)
    assert KEY in str(err.value) and "model.bin" in str(err.value)

    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        entry2, computed = get_or_compute(store, KEY, compute)
    assert computed and _count(counter) == 2
    assert any(KEY in r.getMessage() for r in caplog.records)
    assert store.get(KEY) == entry2
    assert get_or_compute(store, KEY, compute)[1] is False and _count(counter) == 2


def test_same_size_alteration_is_detected(store, src):
    entry = store.put(KEY, src)
    with open(os.path.join(entry.path, "ckpt", "state.json"), "r+b") as f:
        f.write(b"X")
    with pytest.raises(CorruptEntry, match="ckpt/state.json"):
        store.get(KEY)


@pytest.mark.parametrize("damage", ["missing_file", "garbage_manifest", "escaping_manifest"])
def test_other_damage_is_corrupt_entry(store, src, damage):
    entry = store.put(KEY, src)
    mpath = os.path.join(entry.path, MANIFEST)
    if damage == "missing_file":
        os.remove(os.path.join(entry.path, "ckpt", "state.json"))
        match = "state.json"
    elif damage == "garbage_manifest":
        with open(mpath, "w") as f:
            f.write("{not json")
        match = "manifest"
    else:
        m = json.load(open(mpath))
        m["files"]["../../evil"] = m["files"].pop("model.bin")
        json.dump(m, open(mpath, "w"))
        match = "manifest"
    with pytest.raises(CorruptEntry, match=match) as err:
        store.get(KEY)
    assert KEY in str(err.value)


# -- crash safety --------------------------------------------------------------------------------------------------

def test_compute_failure_publishes_nothing(store, tmp_path):
    def half_then_crash(out_dir):
        with open(os.path.join(out_dir, "model.bin"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        get_or_compute(store, KEY, half_then_crash)
    assert not store.has(KEY) and store.keys() == []
    assert os.listdir(store.scratch_dir) == []
    assert [n for n in os.listdir(store.root) if not n.startswith(".")] == []
    with store.claim(KEY, timeout=0.1):  # claim was released
        pass

    counter = str(tmp_path / "counter")
    entry, computed = get_or_compute(store, KEY, functools.partial(_counting_compute, counter, 0.0))
    assert computed and _count(counter) == 1 and store.get(KEY) == entry


@pytest.mark.parametrize("atomic", [True, False])
def test_crash_mid_put_leaves_nothing_visible(tmp_path, src, monkeypatch, atomic):
    store = StageStore(str(tmp_path / "store"), atomic_rename=atomic)
    real_pump, calls = store_mod._pump, []

    def failing_pump(s, d=None):
        calls.append(1)
        if len(calls) == 2:  # first file copied, second one dies half-way
            d.write(s.read(10))
            raise OSError("disk gone")
        return real_pump(s, d)

    monkeypatch.setattr(store_mod, "_pump", failing_pump)
    with pytest.raises(OSError, match="disk gone"):
        store.put(KEY, src)
    monkeypatch.setattr(store_mod, "_pump", real_pump)

    assert not store.has(KEY) and store.keys() == []
    with pytest.raises(KeyError):
        store.get(KEY)
    visible = [n for n in os.listdir(store.root) if not n.startswith(".")]
    # atomic: the temp dir is gone and <key>/ never existed; in place: <key>/ holds files but no manifest
    assert visible == ([] if atomic else [KEY])
    counter = str(tmp_path / "counter")
    entry, computed = get_or_compute(store, KEY, functools.partial(_counting_compute, counter, 0.0))
    assert computed and _count(counter) == 1
    assert store.get(KEY) == entry and store.keys() == [KEY]
    assert [n for n in os.listdir(store.root) if not n.startswith(".")] == [KEY]


def test_leftover_tmp_dir_is_invisible_and_cleaned(store, src, tmp_path):
    # What a process killed just before the rename leaves behind: a complete-looking temp directory.
    leftover = os.path.join(store.root, f"{KEY}.tmp-deadbeef")
    store.put(KEY, src)
    os.rename(os.path.join(store.root, KEY), leftover)

    assert not store.has(KEY) and store.keys() == []
    counter = str(tmp_path / "counter")
    entry, computed = get_or_compute(store, KEY, functools.partial(_counting_compute, counter, 0.0, tag="v2"))
    assert computed and _count(counter) == 1 and store.get(KEY) == entry
    assert not os.path.exists(leftover)


# -- cross-process -------------------------------------------------------------------------------------------------

def test_concurrent_processes_compute_once(store, tmp_path):
    counter = str(tmp_path / "counter")
    n = 4
    barrier, results = SPAWN.Barrier(n), SPAWN.Queue()
    procs = [SPAWN.Process(target=_worker_get_or_compute, args=(store.root, KEY, counter, barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    _join_all(procs)

    assert _count(counter) == 1
    assert sorted(c for _, _, c in got) == [False] * (n - 1) + [True]
    assert len({p for p, _, _ in got}) == 1
    assert all(m == got[0][1] for _, m, _ in got)
    entry = store.get(KEY)  # verifies checksums
    assert entry.manifest == got[0][1] and store.keys() == [KEY]


def test_claim_released_when_holder_dies(store, tmp_path):
    started = SPAWN.Event()
    p = SPAWN.Process(target=_worker_die_while_computing, args=(store.root, KEY, started))
    p.start()
    try:
        assert started.wait(300)
        with pytest.raises(StoreError, match="timed out"):
            with store.claim(KEY, timeout=0.2):
                pass
    finally:
        p.kill()
        p.join(10)

    assert not store.has(KEY)
    counter = str(tmp_path / "counter")
    entry, computed = get_or_compute(store, KEY, functools.partial(_counting_compute, counter, 0.0), timeout=10)
    assert computed and _count(counter) == 1 and entry.meta["tag"] == "v1"
    assert os.listdir(store.scratch_dir) == []  # the dead holder's half-written scratch dir was cleaned up


def test_claim_timeout_in_process(store):
    with store.claim(KEY):
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=KEY):
            with store.claim(KEY, timeout=0.2):
                pass
        assert time.monotonic() - t0 < 10  # it times out (a 0.2 s wait), rather than hanging
    with store.claim(KEY, timeout=0.2):
        pass


# -- URIs and the non-local (no-rename) path -----------------------------------------------------------------------

def test_file_uri_and_plain_path_are_the_same_store(tmp_path, src):
    root = str(tmp_path / "store")
    plain, uri = StageStore(root), StageStore("file://" + root)
    assert uri.local and uri.root == plain.root
    entry = uri.put(KEY, src, {"via": "uri"})
    assert plain.keys() == uri.keys() == [KEY]
    assert plain.get(KEY) == entry == uri.get(KEY)
    plain.discard(KEY)
    assert not uri.has(KEY)


def test_mock_object_store_path(tmp_path, src):
    cache = str(tmp_path / "cache")
    store = StageStore("mock://bucket/stages", cache_dir=cache)
    assert not store.local and not store.atomic_rename
    counter = str(tmp_path / "counter")
    compute = functools.partial(_counting_compute, counter, 0.0)

    # A crashed non-atomic put: files but no manifest -> invisible, and overwritten by the next put.
    store.fs.create_dir(store._p(KEY), recursive=True)
    with store.fs.open_output_stream(store._p(KEY, "stale.bin")) as f:
        f.write(b"partial")
    assert not store.has(KEY) and store.keys() == []

    entry, computed = get_or_compute(store, KEY, compute)
    assert computed and store.keys() == [KEY] and store.has(KEY)
    assert entry.path == os.path.join(cache, KEY)  # a local, verified copy
    files = _tree(entry.path)
    files.pop(MANIFEST)
    assert files == _tree(src)
    assert store.fs.get_file_info(store._p(KEY, "stale.bin")).type.name == "NotFound"
    assert get_or_compute(store, KEY, compute) == (entry, False) and _count(counter) == 1

    # A damaged local cache copy is re-fetched, not reported (the store itself is fine).
    with open(os.path.join(entry.path, "model.bin"), "r+b") as f:
        f.truncate(3)
    assert _tree(store.get(KEY).path)["model.bin"] == _tree(src)["model.bin"]

    # A damaged remote file is reported and recomputed.
    with store.fs.open_output_stream(store._p(KEY, "model.bin")) as f:
        f.write(b"short")
    with pytest.raises(CorruptEntry, match="model.bin"):
        store.get(KEY)
    entry2, computed = get_or_compute(store, KEY, compute)
    assert computed and _count(counter) == 2 and store.get(KEY) == entry2

    store.discard(KEY)
    assert not store.has(KEY) and store.keys() == [] and not os.path.exists(entry.path)
