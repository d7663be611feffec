"""The policy that keeps a musetalk pool at one replica per GPU of its cluster (Serve's
controller runs it; the running cluster test: tests/test_remote_cluster.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from livecam.remote import scaling
from livecam.remote.server import follows_gpus


def test_the_pool_wants_one_replica_per_gpu_and_asks_the_cluster_every_few_seconds(
    monkeypatch, caplog
):
    gpus, asked = [2.0], []

    def cluster_resources() -> dict[str, float]:
        asked.append(gpus[0])
        if gpus[0] == "down":
            raise ConnectionError("GCS unavailable")
        return {"CPU": 8.0} | ({"GPU": gpus[0]} if gpus[0] is not None else {})

    monkeypatch.setattr(scaling.ray, "cluster_resources", cluster_resources)
    state: dict = {"serve-internal": 1}  # Serve's own keys in the state stay

    def decide(at: float) -> int:
        nonlocal state
        ctx = SimpleNamespace(policy_state=state, current_time=at, target_num_replicas=5)
        wanted, state = scaling.one_per_gpu(ctx)
        return wanted

    assert decide(100.0) == 2 and len(asked) == 1
    gpus[0] = 3.0  # a machine with a GPU joined
    assert decide(100.0 + scaling.CHECK_EVERY_S / 2) == 2 and len(asked) == 1  # not asked yet
    assert decide(100.0 + scaling.CHECK_EVERY_S) == 3 and len(asked) == 2
    gpus[0] = None  # every GPU machine left (Ray then lists no GPU): one replica waits for one
    assert decide(100.0 + 3 * scaling.CHECK_EVERY_S) == 1
    assert state["serve-internal"] == 1
    gpus[0] = 4.0
    assert decide(100.0 + 4 * scaling.CHECK_EVERY_S) == 4
    gpus[0] = "down"  # the cluster does not answer: the count stays, asked again later
    with caplog.at_level(logging.WARNING, logger=scaling.__name__):
        assert decide(100.0 + 5 * scaling.CHECK_EVERY_S) == 4
    assert caplog.messages == [
        "the pool keeps its replicas: no GPU count from the cluster (GCS unavailable)"
    ]
    assert decide(100.0 + 5.5 * scaling.CHECK_EVERY_S) == 4 and asked.count("down") == 1
    gpus[0] = 2.0
    assert decide(100.0 + 6 * scaling.CHECK_EVERY_S) == 2


def test_a_policy_that_never_reached_the_cluster_keeps_serves_target(monkeypatch):
    def down() -> dict[str, float]:
        raise ConnectionError("GCS unavailable")

    monkeypatch.setattr(scaling.ray, "cluster_resources", down)
    ctx = SimpleNamespace(policy_state={}, current_time=1.0, target_num_replicas=3)
    assert scaling.one_per_gpu(ctx)[0] == 3


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
