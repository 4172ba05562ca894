"""What the Ray cluster can hold, and whether a study's storage is reachable from every node of it.

Checked after connecting to Ray and before anything of the study is created:
- **Shared storage.** On a cluster with more than one node (or one that can autoscale), the default storage (the
  launching machine's results directory) is refused, and a local path is probed: a file written by the launcher must
  be readable by a task on every node. An object store URI (`s3://`, `gs://`, ...) passes as is.
- **Capacity.** Trials at once are computed from the cluster's largest size (the autoscaler's maximum), not from the
  nodes that happen to be up at launch, so an autoscaling cluster scales out to the trials' demand.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import yaml
from pyarrow import fs as pafs

from .paths import STORAGE_ENV, StudyPaths, is_tracking_server, is_uri

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written on the head node by `ray up` (the autoscaler's config)
HEAD = "node:__internal_head__"  # the resource Ray gives the head node only


class StorageError(RuntimeError):
    """The study's storage (or tracking server) cannot serve this cluster; the message says how to fix it."""


FIX = (f"give every node one storage: --storage s3://bucket/prefix (or gs://..., or a path on a shared mount such as "
       f"NFS), or set ${STORAGE_ENV} or the spec's `storage:`")


def autoscaler_max_resources(config: dict) -> dict[str, float]:
    """The largest resources a `ray up` cluster config can reach: the head plus every worker type at its maximum
    (the global `max_workers` caps the number of worker nodes)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    total: dict[str, float] = {}

    def add(resources: dict, count: int) -> None:
        for k, v in (resources or {}).items():
            total[k] = total.get(k, 0) + v * count

    add(types.get(head, {}).get("resources"), 1)
    budget = config.get("max_workers")
    for name, node_type in types.items():
        if name == head:
            continue
        count = node_type.get("max_workers", node_type.get("min_workers", 0))
        if budget is not None:
            count = min(count, budget)
            budget -= count
        add(node_type.get("resources"), count)
    return total


def cluster_capacity() -> dict[str, float]:
    """Per resource, the most the connected cluster can offer: what it has now, or the autoscaler's maximum
    (from the cluster config in Ray's GCS, as Ray Train reads it, or the head node's `ray up` config)."""
    import ray  # [ray] resources now and at most
    from ray._private import state

    capacity = dict(ray.cluster_resources())
    maxima = [state.state.get_max_resources_from_cluster_config() or {}]
    bootstrap = Path(os.path.expanduser(BOOTSTRAP_CONFIG))
    if bootstrap.exists():
        maxima.append(autoscaler_max_resources(yaml.safe_load(bootstrap.read_text()) or {}))
    for most in maxima:
        for k, v in most.items():
            capacity[k] = max(capacity.get(k, 0), v)
    return capacity


def may_span_nodes() -> bool:
    """More than one node is alive, or the autoscaler may add some."""
    import ray  # [ray] nodes

    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) > 1:
        return True
    from ray._private import state

    return bool(state.state.get_max_resources_from_cluster_config()) or Path(os.path.expanduser(BOOTSTRAP_CONFIG)).exists()


def unreachable_from(directory: str) -> list[str]:
    """Node ids of alive nodes on which a file just written into `directory` (by this process) is not visible."""
    import ray  # [ray] one task per node
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".study-probe-{uuid.uuid4().hex}")
    Path(probe).write_text("probe")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(probe)
                        for n in nodes])
        return [n for n, ok in zip(nodes, seen) if not ok]
    finally:
        os.remove(probe)


def check_tracking(tracking_uri: str) -> None:
    """A tracking server must answer before a study records anything on it."""
    if not is_tracking_server(tracking_uri) or tracking_uri.startswith("databricks"):
        return
    import urllib.request

    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10).read()
    except OSError as exc:
        raise StorageError(f"tracking server {tracking_uri} does not answer ({exc}); start it (e.g. `mlflow server "
                           "--host 0.0.0.0 --port 5000 --artifacts-destination s3://bucket/mlartifacts`) or fix "
                           "--tracking-uri") from None


def check_storage(paths: StudyPaths) -> None:
    """Refuse a storage some node cannot reach, or a tracking server that does not answer (raises StorageError
    naming the fix); creates nothing that stays."""
    check_tracking(paths.tracking_uri)
    for location in (paths.storage, paths.store_uri):
        if is_uri(location):
            try:
                pafs.FileSystem.from_uri(location)
            except (ValueError, OSError) as exc:
                raise StorageError(f"storage {location}: no pyarrow filesystem reaches it ({exc})") from None
    if not may_span_nodes():
        return
    if paths.default_storage:
        raise StorageError(f"this Ray cluster has (or may grow) more than one node, and the study's storage is "
                           f"the launching machine's {paths.storage}, which the other nodes cannot see; {FIX}")
    for location in (paths.storage, paths.store_uri):
        if is_uri(location) and not location.startswith("file://"):
            continue
        local = location.removeprefix("file://")
        missing = unreachable_from(local)
        if missing:
            raise StorageError(f"storage {location} is node-local: {len(missing)} node(s) of the cluster cannot "
                               f"see a file written there ({', '.join(m[:12] for m in missing)}); {FIX}")


def trial_driver_resources() -> dict:
    """Tune resources of a trial driver: no core (it only waits on its Train run, so idle drivers never hold the
    CPUs their own workers need), a token 1 MiB of memory (Tune refuses an empty request), and a sliver of the head
    node's own resource, so drivers live on the head (which never scales down) and not on a worker node."""
    return {"cpu": 0, "memory": 2**20, HEAD: 0.001}


__all__ = ["StorageError", "autoscaler_max_resources", "cluster_capacity", "check_storage", "trial_driver_resources"]
