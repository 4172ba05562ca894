"""Stage store: content-addressed storage of stage outputs, so no stage is ever computed twice.

An entry is a directory ``<root>/<key>/`` of opaque files plus ``MANIFEST.json`` (size and sha256 of every file,
creation time, caller's meta). Callers use :func:`get_or_compute`; the guarantees are:

- **Visible only complete.** An entry exists (``has``/``keys``/``get``) iff its manifest exists, and the manifest is
  written last. On local filesystems the entry is additionally assembled under ``<key>.tmp-<uuid>/`` and renamed
  into place, so a reader never sees a half-written directory. On object stores (no atomic rename) files are
  written under ``<key>/`` and the manifest last; files without a manifest are invisible and overwritten by the
  next ``put``. A crash at any point therefore leaves either nothing or a complete entry.
- **Verified on read.** ``get`` checks every file's size and sha256 against the manifest and raises
  :class:`CorruptEntry` naming the key and the file; ``get_or_compute`` discards such an entry and recomputes it.
  For non-local stores ``get`` returns a local cache copy (the files callers actually open), fully verified on
  every ``get``; the remote files are hashed when downloaded and size-checked on later ``get``s (a same-size
  alteration of a remote file is noticed at its next download, e.g. on another machine).
- **Computed once.** ``get_or_compute`` takes an exclusive per-key claim before computing and re-checks the store
  after acquiring it, so concurrent trials needing the same missing stage cause one computation while the others
  wait and then reuse it. Claims come from ``claims`` if given (any object with a ``claim(key, timeout)`` context
  manager; studies pass a cluster-wide registry, ``study/claims.py``, so a stage is computed once per cluster
  whatever the store). Without it they are ``filelock`` lock files, released by the OS if the holder dies: local
  stores keep them in ``<root>/.locks`` (works across processes, and across machines on a shared POSIX filesystem
  with working ``flock``, e.g. NFSv4); non-local stores keep them in ``<cache_dir>/.locks``, which serialises
  computation within one machine only -- two machines may both compute a key, and the last manifest wins (if their
  files interleave, ``get`` detects the mismatch and the entry is recomputed).

All store I/O goes through ``pyarrow.fs`` (the local case too), so local and remote stores run the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import filelock
from pyarrow import fs as pafs

from .keys import KEY_RE

__all__ = ["StoreError", "CorruptEntry", "StageEntry", "StageStore", "get_or_compute", "MANIFEST"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_TMP = ".tmp-"
_CHUNK = 1 << 20
_FORMAT = 1


class StoreError(RuntimeError):
    """A stage store operation failed (e.g. a claim timed out)."""


class CorruptEntry(StoreError):
    """A stored entry does not match its manifest (missing/truncated/altered file, unreadable manifest)."""


@dataclass(frozen=True)
class StageEntry:
    key: str
    path: str  # local directory holding the entry's files (for remote stores: a verified local cache copy)
    manifest: dict

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})


def _pump(src, dst=None) -> tuple[str, int]:
    """Stream ``src`` (optionally into ``dst``) in chunks; return (sha256 hex, size)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), size


def _list_files(src_dir: str) -> list[str]:
    """Relative ('/'-separated) paths of all files under ``src_dir``. Empty directories are not recorded."""
    out = []
    for dirpath, _, filenames in os.walk(src_dir, followlinks=True):
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), src_dir).replace(os.sep, "/"))
    return sorted(out)


def _safe_relpath(rel: object) -> bool:
    # A manifest names files inside its entry only; anything else could make a fetch write outside the cache.
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


class StageStore:
    """A stage store rooted at a local path or a ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``, ...).

    ``cache_dir``: local directory for verified copies of remote entries and their lock files (default
    ``~/.cache/stage-store/<hash of uri>``); for local stores it only hosts compute scratch space if given.
    ``atomic_rename``: publish by renaming a temp directory (default: True for local filesystems, False otherwise).
    ``claims``: where exclusive per-key claims come from (an object with a ``claim(key, timeout)`` context
    manager); default: lock files (see the module's docstring).
    """

    def __init__(self, uri: str, cache_dir: str | None = None, *, atomic_rename: bool | None = None, claims=None):
        self.uri = uri
        self.claims = claims
        if "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.root = root.rstrip("/") if root.strip("/") else root
        self.atomic_rename = self.local if atomic_rename is None else atomic_rename
        if self.local:
            self.fs.create_dir(self.root, recursive=True)
        if cache_dir is None and not self.local:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
            cache_dir = os.path.join(base, "stage-store", hashlib.sha256(uri.encode()).hexdigest()[:16])
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else None
        # Local stores lock inside the root so that every process (or machine) sharing the root shares the locks.
        self.lock_dir = os.path.join(self.root, ".locks") if self.local else os.path.join(self.cache_dir, ".locks")
        self.scratch_dir = os.path.join(self.cache_dir or self.root, ".scratch")

    def __repr__(self) -> str:
        return f"StageStore({self.uri!r})"

    # -- paths ---------------------------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        if not self.root.strip("/"):  # store at the filesystem (or bucket) root
            return self.root + "/".join(parts)
        return "/".join((self.root, *parts))

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not KEY_RE.match(key) or _TMP in key:
            raise ValueError(f"invalid stage key {key!r}: expected letters, digits, '_', '.', '-' "
                             f"(not starting with '.' and not containing {_TMP!r})")

    def _rm(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(path)

    # -- reading -------------------------------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        """True iff a complete entry (one with a manifest) is present. Does not verify checksums."""
        self._check_key(key)
        return self.fs.get_file_info(self._p(key, MANIFEST)).type == pafs.FileType.File

    def _read_manifest(self, key: str) -> dict:
        path = self._p(key, MANIFEST)
        try:
            with self.fs.open_input_stream(path) as f:
                raw = f.read()
        except FileNotFoundError:
            raise KeyError(key) from None
        try:
            manifest = json.loads(raw)
            files = manifest["files"]
            ok = (manifest["key"] == key and isinstance(files, dict)
                  and all(_safe_relpath(rel) and isinstance(v["sha256"], str) and isinstance(v["size"], int)
                          for rel, v in files.items()))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"stage {key}: unreadable manifest {path}: {e!r}") from e
        if not ok:
            raise CorruptEntry(f"stage {key}: malformed manifest {path}")
        return manifest

    @staticmethod
    def _check_sizes(key: str, fs: pafs.FileSystem, entry_dir: str, manifest: dict) -> None:
        """Cheap check (one metadata call): every file exists with the manifest's size."""
        files = manifest["files"]
        infos = fs.get_file_info([f"{entry_dir}/{rel}" for rel in files])
        for (rel, want), info in zip(files.items(), infos):
            if info.type != pafs.FileType.File:
                raise CorruptEntry(f"stage {key}: file {rel!r} is missing ({info.path})")
            if info.size != want["size"]:
                raise CorruptEntry(f"stage {key}: file {rel!r} has {info.size} bytes, manifest says {want['size']}")

    def _verify(self, key: str, fs: pafs.FileSystem, entry_dir: str, manifest: dict, copy_to: str | None = None):
        """Check every file against the manifest (sizes first, cheaply; then sha256), optionally copying the
        bytes read to the local directory ``copy_to``. Raises CorruptEntry naming the key and the file."""
        self._check_sizes(key, fs, entry_dir, manifest)
        for rel, want in manifest["files"].items():
            with contextlib.ExitStack() as stack:
                src = stack.enter_context(fs.open_input_stream(f"{entry_dir}/{rel}"))
                dst = None
                if copy_to is not None:
                    target = os.path.join(copy_to, *rel.split("/"))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    dst = stack.enter_context(open(target, "wb"))
                sha, size = _pump(src, dst)
            if size != want["size"] or sha != want["sha256"]:
                raise CorruptEntry(f"stage {key}: file {rel!r} does not match its manifest "
                                   f"(sha256 {sha[:12]}…, {size} bytes; expected {want['sha256'][:12]}…, "
                                   f"{want['size']} bytes)")

    def get(self, key: str) -> StageEntry:
        """The verified entry for ``key``. KeyError if absent, CorruptEntry if it does not match its manifest."""
        self._check_key(key)
        manifest = self._read_manifest(key)
        if self.local:
            path = self._p(key)
            self._verify(key, self.fs, path, manifest)
            return StageEntry(key, path, manifest)
        return StageEntry(key, self._fetch(key, manifest), manifest)

    def _cached_copy_ok(self, key: str, path: str, manifest: dict) -> bool:
        try:
            with open(os.path.join(path, MANIFEST), "rb") as f:
                if json.loads(f.read()) != manifest:
                    return False  # stale copy of an entry that has since been recomputed
            self._verify(key, pafs.LocalFileSystem(), path, manifest)
            return True
        except (OSError, ValueError, CorruptEntry):
            return False

    def _fetch(self, key: str, manifest: dict, source: tuple[pafs.FileSystem, str] | None = None) -> str:
        """Local verified copy of a remote entry, downloaded (and verified while streaming) if needed.

        ``source`` = (filesystem, directory) to copy from instead of the entry itself (put() passes its local
        source directory, which saves downloading what was just uploaded)."""
        dest = os.path.join(self.cache_dir, key)
        if source is None and self._cached_copy_ok(key, dest, manifest):
            # The copy is what callers read, and it is fully verified; of the remote files we only check sizes,
            # since re-hashing them on every get would defeat the cache.
            self._check_sizes(key, self.fs, self._p(key), manifest)
            return dest
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{key}{_TMP}", dir=self.cache_dir)
        try:
            src_fs, src_dir = source or (self.fs, self._p(key))
            self._verify(key, src_fs, src_dir, manifest, copy_to=tmp)
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            shutil.rmtree(dest, ignore_errors=True)  # a stale or damaged copy
            try:
                os.rename(tmp, dest)
            except OSError:
                # Another process on this machine installed a copy meanwhile; use it if it is good.
                if not self._cached_copy_ok(key, dest, manifest):
                    raise
            return dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def keys(self) -> list[str]:
        """Keys of complete entries, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = sorted(i.base_name for i in infos
                       if i.type == pafs.FileType.Directory and KEY_RE.match(i.base_name) and _TMP not in i.base_name)
        if not names:
            return []
        manifests = self.fs.get_file_info([self._p(n, MANIFEST) for n in names])
        return [n for n, info in zip(names, manifests) if info.type == pafs.FileType.File]

    def meta(self, key: str) -> dict:
        """The manifest's ``meta`` (no checksum verification). KeyError if absent."""
        self._check_key(key)
        return self._read_manifest(key).get("meta", {})

    # -- writing -------------------------------------------------------------------------------------------------

    def put(self, key: str, src_dir: str, meta: dict | None = None) -> StageEntry:
        """Publish the files under local ``src_dir`` as entry ``key`` (copied; ``src_dir`` is left as is).

        Idempotent: if a valid entry exists it is returned unchanged. A corrupt one is replaced."""
        self._check_key(key)
        meta = dict(meta or {})
        json.dumps(meta)  # fail before writing anything if meta is not JSON-serialisable
        src_dir = os.path.abspath(src_dir)
        if not os.path.isdir(src_dir):
            raise StoreError(f"put({key}): source {src_dir!r} is not a directory")
        try:
            return self.get(key)
        except KeyError:
            pass
        except CorruptEntry as e:
            log.warning("stage %s: replacing corrupt entry (%s)", key, e)
            self.discard(key)
        files = _list_files(src_dir)
        if MANIFEST in files:
            raise StoreError(f"put({key}): {MANIFEST!r} is reserved and cannot be a stage output file")

        if not self.atomic_rename:
            # No atomic rename (object stores): overwrite any manifest-less leftovers, write the manifest last.
            dest = self._p(key)
            self._rm(dest)
            manifest = self._write_entry(key, src_dir, files, meta, dest)
            return self._entry_after_put(key, src_dir, manifest)

        tmp = self._p(f"{key}{_TMP}{uuid.uuid4().hex}")
        try:
            manifest = self._write_entry(key, src_dir, files, meta, tmp)
            won = self._publish(key, tmp)
        finally:
            self._rm(tmp)  # no-op once renamed into place
        if not won:  # another writer published the same key first; same key means interchangeable content
            return self.get(key)
        return self._entry_after_put(key, src_dir, manifest)

    def _entry_after_put(self, key: str, src_dir: str, manifest: dict) -> StageEntry:
        if self.local:
            return StageEntry(key, self._p(key), manifest)
        return StageEntry(key, self._fetch(key, manifest, (pafs.LocalFileSystem(), src_dir)), manifest)

    def _write_entry(self, key: str, src_dir: str, files: list[str], meta: dict, entry_dir: str) -> dict:
        self.fs.create_dir(entry_dir, recursive=True)
        made = {entry_dir}
        records = {}
        for rel in files:
            target = f"{entry_dir}/{rel}"
            parent = posixpath.dirname(target)
            if parent not in made:
                self.fs.create_dir(parent, recursive=True)
                made.add(parent)
            with open(os.path.join(src_dir, *rel.split("/")), "rb") as src, self.fs.open_output_stream(target) as dst:
                sha, size = _pump(src, dst)
            records[rel] = {"sha256": sha, "size": size}
        manifest = {
            "format": _FORMAT,
            "key": key,
            "files": records,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "meta": meta,
        }
        # Written last: its presence is what makes the entry exist.
        with self.fs.open_output_stream(f"{entry_dir}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest

    def _publish(self, key: str, tmp: str) -> bool:
        """Rename ``tmp`` to ``<key>``; False if a complete entry got there first."""
        dest = self._p(key)
        try:
            self.fs.move(tmp, dest)
            return True
        except OSError:
            if self.has(key):
                return False
        # ``dest`` is a manifest-less leftover (e.g. from a store written without rename): replace it.
        self._rm(dest)
        self.fs.move(tmp, dest)
        return True

    def discard(self, key: str) -> None:
        """Remove an entry (and its local cache copy) if present, e.g. after CorruptEntry so it is recomputed."""
        self._check_key(key)
        dest = self._p(key)
        if self.atomic_rename:
            # Rename first so the entry disappears atomically; then delete at leisure.
            grave = self._p(f"{key}{_TMP}{uuid.uuid4().hex}")
            try:
                self.fs.move(dest, grave)
            except FileNotFoundError:
                grave = None
            if grave is not None:
                self._rm(grave)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self._p(key, MANIFEST))  # invisible from here on
            self._rm(dest)
        if self.cache_dir and not self.local:
            shutil.rmtree(os.path.join(self.cache_dir, key), ignore_errors=True)

    def _remove_partials(self, key: str) -> None:
        """Delete ``<key>.tmp-*`` leftovers of crashed puts and computes (in the store and in the scratch dir).

        Only safe while holding the claim on ``key``: then no live process is writing them."""
        prefix = f"{key}{_TMP}"  # keys cannot contain _TMP, so this prefix matches no other key's leftovers
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            if info.base_name.startswith(prefix):
                self._rm(info.path)
        if os.path.isdir(self.scratch_dir):
            for name in os.listdir(self.scratch_dir):
                if name.startswith(prefix):
                    shutil.rmtree(os.path.join(self.scratch_dir, name), ignore_errors=True)

    # -- coordination --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the exclusive claim on ``key`` (blocking; StoreError after ``timeout`` seconds if given)."""
        self._check_key(key)
        if self.claims is not None:
            with self.claims.claim(key, timeout):
                yield
            return
        os.makedirs(self.lock_dir, exist_ok=True)
        path = os.path.join(self.lock_dir, f"{key}.lock")
        lock = filelock.FileLock(path, timeout=-1 if timeout is None else timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise StoreError(f"timed out after {timeout} s waiting for the claim on stage {key} ({path}); "
                             "another process is probably computing it") from None
        try:
            yield
        finally:
            lock.release()


def get_or_compute(store: StageStore, key: str, compute: Callable[[str], dict | None], *,
                   timeout: float | None = None) -> tuple[StageEntry, bool]:
    """Return ``(entry, computed)``: the stored entry for ``key``, computing and publishing it first if needed.

    ``compute(tmpdir)`` writes the stage's output files into the fresh directory ``tmpdir`` and returns the meta
    dict to record (or None). It runs at most once per key across all processes sharing the store's locks. If it
    raises, nothing is published, ``tmpdir`` is removed and the exception propagates. ``timeout`` bounds the wait
    for another process's claim (StoreError when exceeded).
    """
    try:
        return store.get(key), False
    except (KeyError, CorruptEntry):
        pass  # a corrupt entry is discarded only under the claim, so it is recomputed exactly once
    with store.claim(key, timeout):
        try:
            return store.get(key), False  # someone else computed it while we waited
        except KeyError:
            pass
        except CorruptEntry as e:
            log.warning("stage %s: corrupt entry discarded, recomputing: %s", key, e)
            store.discard(key)
        store._remove_partials(key)
        os.makedirs(store.scratch_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{key}{_TMP}", dir=store.scratch_dir)
        try:
            meta = compute(tmp)
            if meta is not None and not isinstance(meta, dict):
                raise TypeError(f"compute for stage {key} returned {type(meta).__name__}, expected dict or None")
            return store.put(key, tmp, meta), True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
