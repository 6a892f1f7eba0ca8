"""Shared fixtures: one local Ray instance per test session, tiny models, temp dirs."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (never attaches to a running head), shut down at the end.

    4 logical CPUs on a 2-core machine so that train workers and Ray Data
    can both be scheduled (see docs/ray-mlflow-notes: the 2-CPU deadlock).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def tiny_tokenizer():
    from pipelines.models import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture()
def tiny_model():
    from pipelines.models import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri(monkeypatch):
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which the driver honours
    (clusters set it): never let one test's store leak into the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors run fastest on one thread, and on 2 cores torch's thread pool
    fights Ray and the other tests; restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
