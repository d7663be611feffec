"""The policy that keeps a musetalk pool at one replica per GPU of its cluster (Serve's
controller runs it; the running cluster test: tests/test_remote_cluster.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from livecam.remote import scaling
from livecam.remote.server import follows_gpus


def test_the_pool_wants_one_replica_per_gpu_and_asks_the_cluster_every_few_seconds(monkeypatch):
    gpus, asked = [2.0], []

    def cluster_resources() -> dict[str, float]:
        asked.append(gpus[0])
        return {"CPU": 8.0} | ({"GPU": gpus[0]} if gpus[0] is not None else {})

    monkeypatch.setattr(scaling.ray, "cluster_resources", cluster_resources)
    state: dict = {"serve-internal": 1}  # Serve's own keys in the state stay

    def decide(at: float) -> int:
        nonlocal state
        wanted, state = scaling.one_per_gpu(SimpleNamespace(policy_state=state, current_time=at))
        return wanted

    assert decide(100.0) == 2 and len(asked) == 1
    gpus[0] = 3.0  # a machine with a GPU joined
    assert decide(100.0 + scaling.CHECK_EVERY_S / 2) == 2 and len(asked) == 1  # not asked yet
    assert decide(100.0 + scaling.CHECK_EVERY_S) == 3 and len(asked) == 2
    gpus[0] = 1.0
    assert decide(100.0 + 2 * scaling.CHECK_EVERY_S) == 1
    gpus[0] = None  # every GPU machine left (Ray then lists no GPU): one replica waits for one
    assert decide(100.0 + 3 * scaling.CHECK_EVERY_S) == 1
    assert state["serve-internal"] == 1


def test_the_autoscaling_config_starts_at_the_count_and_follows_at_once():
    config = scaling.follow_gpus(4)
    assert config["initial_replicas"] == 4 and config["min_replicas"] == 1
    assert config["upscale_delay_s"] == config["downscale_delay_s"] == 0.0
    assert config["policy"]["policy_function"] is scaling.one_per_gpu
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**config)  # Serve takes it


def test_only_a_musetalk_pool_on_gpus_whose_count_was_not_given_follows_them():
    gpus, cpus = {"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}
    assert follows_gpus(gpus, "musetalk", None)
    assert not follows_gpus(gpus, "musetalk", 2)  # --replicas fixes the count
    assert not follows_gpus(cpus, "musetalk", None)  # a CPU pool: one replica, as it was
    assert not follows_gpus(gpus, "lite", None)
