"""The session's local Ray cluster is real: tasks run in other processes, the dashboard answers."""

import os
import urllib.request


def test_tasks_run_in_worker_processes_and_dashboard_answers(ray_local) -> None:
    import ray

    @ray.remote
    def pid() -> int:
        return os.getpid()

    assert os.getpid() not in ray.get([pid.remote() for _ in range(2)])
    with urllib.request.urlopen(f"http://{ray_local.dashboard_url}/api/version", timeout=30) as response:
        assert response.status == 200
