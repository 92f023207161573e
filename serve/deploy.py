"""Deploy a Serve config to a running Ray cluster through its dashboard, as ``serve deploy`` does.

Used by the tests and the load generator, so they exercise the same path as production
(config file -> dashboard REST API -> Serve controller) rather than a Python-only shortcut.
"""

from __future__ import annotations

import time

import httpx

APPLICATIONS_PATH = "/api/serve/applications/"


def deploy_and_wait(config: dict, dashboard_url: str, timeout_s: float = 300.0) -> None:
    """PUT ``config`` (a validated Serve config dict) and wait until every application is RUNNING."""
    base = dashboard_url if dashboard_url.startswith("http") else f"http://{dashboard_url}"
    response = httpx.put(base + APPLICATIONS_PATH, json=config, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(
            f"the dashboard refused the Serve config (HTTP {response.status_code}): {response.text}"
        )
    names = [application["name"] for application in config["applications"]]
    deadline = time.monotonic() + timeout_s
    statuses: dict = {}
    while time.monotonic() < deadline:
        applications = httpx.get(base + APPLICATIONS_PATH, timeout=30).json().get("applications", {})
        statuses = {name: applications.get(name, {}).get("status") for name in names}
        failed = [name for name, status in statuses.items() if status == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError(
                f"Serve application {failed[0]!r} failed: {applications[failed[0]].get('message')}"
            )
        if all(status == "RUNNING" for status in statuses.values()):
            return
        time.sleep(1)
    raise TimeoutError(f"Serve applications not running after {timeout_s:g} s: {statuses}")
