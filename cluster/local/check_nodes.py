"""Check that a Ray cluster can run work on every node: one task per alive node, then a report.

    ray job submit --address "$RAY_DASHBOARD_ADDRESS" --working-dir . -- python cluster/local/check_nodes.py

A placement group with one bundle per node (``STRICT_SPREAD``) pins one task to each node, the
way Ray Train places its workers; every task returns the node it ran on and that node's Serve
mode variables (``serve/throughput_mode.py``: Serve reads them from the node's environment, and a
node started without them serves through the Python proxy). Prints one JSON line
``{"nodes": [...], "ran_on": [...], "tasks": [...]}`` and exits non-zero if some node ran nothing.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve.throughput_mode import THROUGHPUT_MODE_ENV


@ray.remote(num_cpus=1)
def where_am_i() -> dict:
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "serve_mode_env": {name: os.environ.get(name) for name in THROUGHPUT_MODE_ENV},
    }


def main() -> int:
    ray.init()
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    group = placement_group([{"CPU": 1}] * len(nodes), strategy="STRICT_SPREAD")
    ray.get(group.ready(), timeout=120)
    ran = ray.get(
        [
            where_am_i.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            ).remote()
            for i in range(len(nodes))
        ]
    )
    remove_placement_group(group)
    ran_on = sorted({task["node_id"] for task in ran})
    print(json.dumps({"nodes": nodes, "ran_on": ran_on, "tasks": ran}), flush=True)
    return 0 if ran_on == nodes else 1


if __name__ == "__main__":
    sys.exit(main())
