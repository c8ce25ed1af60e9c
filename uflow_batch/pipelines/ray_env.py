"""The environment Ray must find when it is imported: no usage reporting, no token auth, loopback for local runs.

This module does not import Ray, on purpose. Ray reads some settings once, at
``import ray`` time; the CLI calls :func:`prepare_ray_env` before it imports
anything that imports Ray, so they take effect.

Why loopback: a local Ray instance runs with token auth off (token auth
written by a local ``ray.init`` breaks later ``ray start`` clusters, see
``RAY_DEFAULT_ENV``). Left to itself, Ray on Linux advertises the host's
interface address and its gRPC servers (GCS, raylet, workers) listen on every
interface, so anyone on the network could submit work to an unauthenticated
instance. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` puts Ray in its single-machine
mode (the one it uses on macOS and Windows): the node address is 127.0.0.1 and
every server binds to loopback only. It is set only when a local instance is
started: a driver joining a remote cluster must advertise an address the
cluster's nodes can reach.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Ray settings this product needs everywhere: no usage reporting, no token auth
# written behind the user's back (it breaks later `ray start` clusters).
RAY_DEFAULT_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}

# Ray's single-machine mode: node address 127.0.0.1, every server bound to loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK = "127.0.0.1"


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to connect to (``address``, else ``RAY_ADDRESS``); None when a local instance is started."""
    address = address or os.environ.get("RAY_ADDRESS")
    return None if not address or address == "local" else address


def set_ray_defaults() -> dict[str, str]:
    """Set :data:`RAY_DEFAULT_ENV` where the operator has not chosen otherwise; returns what it set."""
    applied = {name: value for name, value in RAY_DEFAULT_ENV.items() if name not in os.environ}
    os.environ.update(applied)
    return applied


def prepare_ray_env(address: str | None) -> dict[str, str]:
    """Set the environment Ray reads at import for a session at ``address``; returns what it set.

    Only for a process that then starts (or joins) one Ray session, such as
    the CLI: the loopback setting is forced when a local instance will be
    started (an unauthenticated Ray must not listen on the network), and the
    processes of that instance inherit it. It would also stop this process
    from starting a multi-node cluster with ``ray start``, which the CLI never
    does. Called after Ray was imported, it can no longer take effect;
    :func:`check_local_node_ip` says so once the instance runs.
    """
    applied = set_ray_defaults()
    if cluster_address(address) is None:
        os.environ.update(LOOPBACK_ENV)
        applied.update(LOOPBACK_ENV)
        if "ray" in sys.modules:
            log.debug("Ray was imported before its environment was prepared; loopback binding may not apply")
    return applied


def check_local_node_ip(node_ip: str) -> None:
    """Warn when a local instance this process started is reachable beyond this machine."""
    if node_ip != LOOPBACK:
        log.warning("the local Ray instance (token auth off) advertises %s and listens beyond loopback: Ray was "
                    "imported before uflow_batch could set %s; set it in the environment", node_ip,
                    ", ".join(f"{k}={v}" for k, v in LOOPBACK_ENV.items()))
