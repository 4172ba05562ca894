"""Shared fixtures: one local Ray instance per session, tiny real data, tiny stage settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance per test session
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as the study launcher sets it

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with this machine's 2 cores, for one test module (study tests start their own)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fmnist_root():
    """The real Fashion-MNIST files (installed by setup.sh from the system's packages)."""
    root = os.environ.get("FASHION_MNIST_DIR", FMNIST_DIR)
    if not os.path.exists(os.path.join(root, "train-labels-idx1-ubyte.gz")) and not os.path.exists(
        os.path.join(root, "train-labels-idx1-ubyte")
    ):
        pytest.fail(f"Fashion-MNIST files not found in {root}: run ./setup.sh (it installs them)")
    return root
