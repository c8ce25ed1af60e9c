"""Connecting to Ray: an existing cluster, or a local one started for this run.

A local Ray instance is started by this process, so its workers inherit the
driver's environment, credentials included. Workers of a remote cluster do
not: they get their credentials from their own chain (instance or pod role,
a mounted profile). Only non-secret settings (endpoint, region, profile
name) are forwarded to them through the job's runtime environment, because
Ray records runtime environments in its logs and job state, and secrets must
not land there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from ..config import ConfigError
from .ray_env import LOOPBACK, check_local_node_ip, cluster_address, set_ray_defaults

log = logging.getLogger(__name__)

# Forwarded to workers when set in the driver's environment: settings, never secrets.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED",
    "UFLOW_SHARED_DATA",
)


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def gpus_per_worker(requested: float | None) -> float:
    """GPUs to ask for per task or actor: None means one if the cluster has any, else none.

    Asking a cluster without GPUs for one makes Ray wait forever, so that is an error here.
    """
    available = ray.cluster_resources().get("GPU", 0)
    if requested is None:
        return 1.0 if available > 0 else 0.0
    if requested > 0 and available < requested:
        raise ConfigError(f"{requested} GPU requested per worker but the Ray cluster has {available:g}; ask for 0 GPUs to use CPUs")
    return float(requested)


def check_fits(what: str, num_cpus: float, num_gpus: float = 0.0) -> None:
    """Refuse a task or actor no node of the cluster can ever hold: Ray would wait for it forever.

    Each task or actor runs on one node, so the test is per node, not the
    cluster's total. (An autoscaling cluster that could add a larger node is
    not consulted: ask for what its current nodes hold, or start one first.)
    """
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        return
    largest = max(nodes, key=lambda r: (r.get("CPU", 0), r.get("GPU", 0)), default={})
    raise ConfigError(
        f"{what} asks for {num_cpus:g} CPU and {num_gpus:g} GPU, but no node of the Ray cluster has that much "
        f"(the largest has {largest.get('CPU', 0):g} CPU and {largest.get('GPU', 0):g} GPU)"
    )


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None) -> Iterator[None]:
    """Use the running Ray session, connect to ``address`` (or ``RAY_ADDRESS``), or start a local one.

    A session this function starts is shut down on exit; one it found is left
    alone. A local instance runs without token auth, so it is kept on
    loopback: the CLI calls :func:`.ray_env.prepare_ray_env` before it imports Ray,
    and a warning says so when Ray came in first.
    """
    set_ray_defaults()
    if ray.is_initialized():
        yield
        return
    runtime_env = {"env_vars": forwarded_env()}
    address = cluster_address(address)
    if address is not None:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        log.info("starting a local Ray instance")
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            dashboard_host=LOOPBACK,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
        check_local_node_ip(ray.util.get_node_ip_address())
    try:
        yield
    finally:
        ray.shutdown()
