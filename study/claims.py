"""Cluster-wide stage claims: one Ray actor per stage store, so a stage is computed once per cluster, whatever the
store (an object store has no lock files that every node shares).

The guarantees of the store's file locks, kept:
- **exclusive**: one holder per stage key at a time; waiters poll until it is free (``ensure_chain`` takes a chain's
  claims root first, so chains sharing a prefix cannot deadlock);
- **released on publish**: the holder releases a claim as soon as its stage is stored (``ensure_chain``);
- **recovered when the claimant dies**: a claim is a lease that the holder's process renews in the background; when
  the process (or its node) dies, renewals stop and the claim lapses after ``ttl`` seconds.

The registry actor lives on the head node and is created by the study's launcher (``registry_for``): it is owned by
that study. A study that finds another's registry for the same store shares it; if the owner ended meanwhile, the
next claimant creates a new one. If the actor itself dies (e.g. the node's memory monitor kills it), Ray restarts it.
Either way the leases start empty and every live holder re-asserts its claims at its next renewal (within
``ttl / 5``); a stage claimed in that window may be computed twice, which the store tolerates (same key, same
content, first manifest wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator

from trainables.stages.store import StoreError

NAMESPACE = "decoding-pathways"
TTL_S = 20.0  # a dead claimant's claims are free again after this long


def registry_name(store_uri: str) -> str:
    return "stage-claims-" + hashlib.sha256(store_uri.encode()).hexdigest()[:16]


class ClaimRegistry:
    """Leases: key -> (holder, expiry). A Ray actor (see ``registry_for``); plain Python otherwise."""

    def __init__(self, ttl: float = TTL_S):
        self.ttl = ttl
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str) -> bool:
        now = time.monotonic()
        current = self.leases.get(key)
        if current is None or current[0] == holder or current[1] < now:
            self.leases[key] = (holder, now + self.ttl)
            return True
        return False

    def renew(self, holder: str, keys: list[str]) -> list[str]:
        """Extend (or re-take, on a fresh registry) the holder's leases; returns the keys it lost to another."""
        return [k for k in keys if not self.acquire(k, holder)]

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, (None,))[0] == holder:
            del self.leases[key]

    def held(self) -> dict[str, str]:
        now = time.monotonic()
        return {k: h for k, (h, t) in self.leases.items() if t >= now}


def registry_for(store_uri: str, ttl: float = TTL_S, name: str | None = None):
    """The claim registry of `store_uri` on the connected cluster: found, or created on the head node."""
    import ray  # [ray] the named actor

    from .cluster import HEAD

    actor = ray.remote(ClaimRegistry).options(name=name or registry_name(store_uri), namespace=NAMESPACE,
                                              get_if_exists=True, num_cpus=0, resources={HEAD: 0.001},
                                              max_concurrency=64, max_restarts=-1, max_task_retries=-1)
    return actor.remote(ttl)


class ClusterClaims:
    """The store's claim protocol (``StageStore(uri, claims=ClusterClaims(uri))``), backed by the registry actor.

    Picklable (it holds the store URI only); each process gets its own holder id and renewal thread."""

    def __init__(self, store_uri: str, ttl: float = TTL_S, name: str | None = None, poll_s: float = 0.5):
        self.store_uri, self.ttl, self.name, self.poll_s = store_uri, ttl, name, poll_s
        self._reset()

    def __getstate__(self):
        return {k: self.__dict__[k] for k in ("store_uri", "ttl", "name", "poll_s")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _reset(self) -> None:
        self.holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._actor = None
        self._renewer: threading.Thread | None = None

    def _call(self, method: str, *args):
        import ray  # [ray] registry calls; a lost registry (its owner ended) is created again

        for attempt in range(2):
            if self._actor is None:
                self._actor = registry_for(self.store_uri, self.ttl, self.name)
            try:
                return ray.get(getattr(self._actor, method).remote(*args))
            except ray.exceptions.RayActorError:
                self._actor = None
                if attempt:
                    raise

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.ttl / 5)
            with self._lock:
                keys = sorted(self._held)
            if keys:
                self._call("renew", self.holder, keys)

    @contextlib.contextmanager
    def claim(self, key: str, timeout: float | None = None) -> Iterator[None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._call("acquire", key, self.holder):
            if deadline is not None and time.monotonic() > deadline:
                raise StoreError(f"timed out after {timeout} s waiting for the claim on stage {key}; another trial "
                                 "of the cluster is probably computing it")
            time.sleep(self.poll_s)
        with self._lock:
            self._held.add(key)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_forever, daemon=True, name="stage-claims")
                self._renewer.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(key)
            self._call("release", key, self.holder)
