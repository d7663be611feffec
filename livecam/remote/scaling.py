"""A musetalk pool that follows its cluster's GPUs: one generator replica per GPU, more as GPU
machines join (`ray start --address HEAD --num-gpus N`), fewer as they leave.

It is a Serve autoscaling policy, run by Serve's controller, so a change starts or stops only
the replicas it adds or removes: the others keep their streams and their warm avatars (a new
`serve.run` would redeploy every replica: Serve gives each a new code version).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

CHECK_EVERY_S = 5.0  # how often the controller asks the cluster for its GPUs
MAX_REPLICAS = 1024  # Serve wants a bound; the cluster's GPUs are the real one

log = logging.getLogger(__name__)


def one_per_gpu(ctx: Any) -> tuple[int, dict[str, Any]]:
    """The replicas wanted: the cluster's GPUs (at least one). `ctx` is Serve's
    AutoscalingContext; its policy state keeps the last count between checks. Where the
    cluster does not answer, the pool stays as it is."""
    state = dict(ctx.policy_state)
    now = ctx.current_time or time.time()
    if "gpus" not in state or now - state["checked"] >= CHECK_EVERY_S:
        state["checked"] = now
        try:
            state["gpus"] = int(ray.cluster_resources().get("GPU", 0))
        except Exception as exc:  # the GCS busy or restarting: asked again at the next check
            log.warning("the pool keeps its replicas: no GPU count from the cluster (%s)", exc)
            state.setdefault("gpus", ctx.target_num_replicas)
    return max(1, state["gpus"]), state


def follow_gpus(replicas: int) -> dict[str, Any]:
    """The deployment's autoscaling config: `replicas` to start with, then one per GPU, at
    once (no delay: the count follows hardware, not load)."""
    return {
        "min_replicas": 1,
        "initial_replicas": replicas,
        "max_replicas": MAX_REPLICAS,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": one_per_gpu},
    }
