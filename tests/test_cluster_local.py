"""cluster/local/: a real multi-node Ray cluster on this machine, driven the way operators drive one.

One head node and one worker node (separate raylets, their own CPUs and resources), started and
stopped by the scripts; Shar data is prepared by a job sent with `JobSubmissionClient` and the
tiny recipe trained by one sent with `ray job submit`, with one Ray Train worker on each node;
metrics come out of the nodes' Prometheus endpoints. The cluster has its own ports and temp dir,
so it never touches the session's `ray_local` cluster or anyone else's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from serve.throughput_mode import THROUGHPUT_MODE_ENV, without_throughput_mode

REPO = Path(__file__).resolve().parents[1]
START = REPO / "cluster" / "local" / "start.sh"
STOP = REPO / "cluster" / "local" / "stop.sh"
RAY = Path(sys.executable).with_name("ray")


def local_excludes() -> list[str]:
    """.git and what .git/info/exclude hides (wheel caches and the like): Ray honours .gitignore
    when it ships the working dir, but not .git/info/exclude."""
    exclude_file = REPO / ".git" / "info" / "exclude"
    lines = exclude_file.read_text().splitlines() if exclude_file.is_file() else []
    return ["/.git/", *(line.strip() for line in lines if line.strip() and not line.startswith("#"))]


# The working dir a job ships to the cluster: the repo, minus untracked local artefacts.
RUNTIME_ENV = {"working_dir": str(REPO), "excludes": local_excludes()}
# Every node has one `train_slot` and every training worker asks for one: one worker per node,
# whatever Ray's default (PACK) placement would prefer.
TRAIN_SLOT = "train_slot"
JOB_TIMEOUT_S = 420


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if text in line]


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


@pytest.fixture(scope="module")
def cluster():
    """Head + 1 worker node, 2 CPUs and one `train_slot` each; stopped even on failure.

    4 CPUs in all, as in the session's `ray_local`: 2 training workers plus Ray Data's tasks.
    """
    # A short path: Ray's socket paths under the temp dir must stay under 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="salmc-", dir="/tmp"))
    env_file = directory / "cluster.env"
    # Metrics every second instead of every 10 s, so a short run shows up on the endpoint.
    # Without Serve's mode variables, so the nodes have them only if start.sh sets them.
    env = {**without_throughput_mode(os.environ), "RAY": str(RAY), "RAY_metrics_report_interval_ms": "1000"}
    try:
        started = subprocess.run(
            [START, "--dir", directory, "--head-cpus", "2", "--worker-cpus", "2",
             "--head-resources", json.dumps({"head_node": 1, TRAIN_SLOT: 1}),
             "--worker-resources", json.dumps({"worker_node": 1, TRAIN_SLOT: 1})],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        yield {**read_env(env_file), "dir": directory}
    finally:
        # start.sh records the cluster before starting anything, so this also cleans up a partial start.
        client_port = read_env(env_file).get("SALM_CLUSTER_CLIENT_PORT") if env_file.exists() else None
        subprocess.run([STOP, "--dir", directory, "--grace-s", "5"], check=False, timeout=120)
        leftover = processes_mentioning(f"{directory}/") + [
            line
            for line in processes_mentioning("ray.util.client.server")
            if f"--port={client_port} " in line + " "
        ]
        shutil.rmtree(directory, ignore_errors=True)
        assert not leftover, f"stop.sh left processes behind: {leftover}"


def alive_node_ids(cluster: dict) -> list[str]:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster["RAY_DASHBOARD_ADDRESS"], filters=[("state", "=", "ALIVE")])
    return sorted(node.node_id for node in nodes)


def without_upload_noise(output: str) -> str:
    """Job output for an assertion message, without Ray's line per ignored file."""
    return "\n".join(line for line in output.splitlines() if "Ignoring upload" not in line)[-6000:]


def report_of(output: str) -> dict:
    """The JSON line check_nodes.py / emit_sample_metrics.py print."""
    (line,) = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(line)


def test_cluster_has_a_head_and_a_worker_node_with_their_own_resources(cluster: dict) -> None:
    from ray.util.state import list_nodes

    nodes = list_nodes(
        address=cluster["RAY_DASHBOARD_ADDRESS"], filters=[("state", "=", "ALIVE")], detail=True
    )
    by_role = {("head" if node.is_head_node else "worker"): node for node in nodes}
    assert len(nodes) == 2 and set(by_role) == {"head", "worker"}
    assert by_role["head"].resources_total.get("CPU") == 2 and "GPU" not in by_role["head"].resources_total
    assert by_role["head"].resources_total.get("head_node") == 1
    assert by_role["worker"].resources_total.get("CPU") == 2
    assert by_role["worker"].resources_total.get("worker_node") == 1
    assert all(node.resources_total.get(TRAIN_SLOT) == 1 for node in nodes)


def wait_for(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(1)
    return status


def test_check_nodes_job_runs_a_task_on_every_node_started_in_serves_throughput_mode(cluster: dict) -> None:
    """cluster/local/check_nodes.py, the quick look at a new cluster the README gives operators."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster["RAY_DASHBOARD_ADDRESS"])
    job_id = client.submit_job(entrypoint="python cluster/local/check_nodes.py", runtime_env=RUNTIME_ENV)
    status = wait_for(client, job_id, timeout_s=240)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, without_upload_noise(logs)
    report = report_of(logs)
    assert report["ran_on"] == report["nodes"] == alive_node_ids(cluster)
    # start.sh starts every node in Serve's throughput mode, as `salm serve` and the RayService do.
    modes = [task["serve_mode_env"] for task in report["tasks"]]
    assert modes == [THROUGHPUT_MODE_ENV] * len(report["nodes"])


@pytest.fixture(scope="module")
def shar_data(cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight synthesised utterances, made into Shar (2 shards) by `ray_jobs/prepare_data.py` on the cluster."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from salm.assets.synthetic_speech import make_sentences, synthesize_corpus, write_nemo_manifest

    root = tmp_path_factory.mktemp("cluster_data")
    utterances = synthesize_corpus(root / "wav", make_sentences(8, seed=5), ["kal16", "slt"])
    manifest = write_nemo_manifest(utterances, root / "train.jsonl")
    client = JobSubmissionClient(cluster["RAY_DASHBOARD_ADDRESS"])
    job_id = client.submit_job(
        entrypoint=f"python ray_jobs/prepare_data.py {manifest} -o {root / 'shar'} --shard-size 4",
        runtime_env=RUNTIME_ENV,
    )
    status = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)
    assert status == JobStatus.SUCCEEDED, without_upload_noise(client.get_job_logs(job_id))
    assert len(list((root / "shar").glob("cuts.*.jsonl.gz"))) == 2
    return root / "shar"


def train_entrypoint(shar: Path, llm: Path, exp_dir: Path, name: str) -> list[str]:
    """The tiny recipe, as small as it goes: 2 workers (one per node), 4 steps of batch 2, one
    validation (8 clips, 4 new tokens) and one checkpoint at the last step, holding a ``model.nemo``
    (``exp_manager.always_save_nemo``) instead of an export at the end."""
    return [
        "python", "ray_jobs/train.py", "--config-name", "tiny",
        f"model.pretrained_llm={llm}",
        f"data.train_ds.shar_path={shar}",
        "data.train_ds.batch_size=2",
        f"data.validation_ds.datasets.dev.shar_path={shar}",
        "data.validation_ds.batch_size=4",
        "trainer.num_workers=2",
        f"trainer.resources_per_worker={{CPU: 1, {TRAIN_SLOT}: 1}}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=2",
        "trainer.max_new_tokens=4",
        "trainer.log_prediction_train=false",
        "trainer.log_prediction_valid_samples=1",
        "model.lr_scheduler.warmup_steps=2",
        "exp_manager.save_nemo_on_train_end=false",
        f"exp_manager.exp_dir={exp_dir}",
        f"exp_manager.name={name}",
        "exp_manager.always_save_nemo=true",
    ]  # fmt: skip


def check_training_job(cluster: dict, submission_id: str, run_dir: Path) -> Path:
    """The job SUCCEEDED, left a step-4 checkpoint with the model, and its two Ray Train workers
    ran on two different nodes: the head and the worker node. Returns the checkpoint directory."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    client = JobSubmissionClient(cluster["RAY_DASHBOARD_ADDRESS"])
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED, without_upload_noise(client.get_job_logs(submission_id))
    logs = client.get_job_logs(submission_id)
    assert "validation @ step 4: " in logs and "val_wer_dev=" in logs, without_upload_noise(logs)

    # Beside the checkpoint_* directories Ray Train keeps checkpoint_manager_snapshot.json.
    (checkpoint,) = [path for path in run_dir.glob("checkpoint_*") if path.is_dir()]
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    assert (checkpoint / "model" / "model.safetensors").is_file()
    assert (checkpoint / "model" / "config.json").is_file()
    assert (checkpoint / "deepspeed").is_dir()

    # The state API keeps finished actors (state DEAD) with the node they ran on.
    workers = [
        actor
        for actor in list_actors(
            address=cluster["RAY_DASHBOARD_ADDRESS"],
            filters=[("class_name", "=", "RayTrainWorker")],
            detail=True,
            raise_on_missing_output=False,
        )
        if actor.job_id == info.job_id
    ]
    assert len(workers) == 2, workers
    assert sorted(worker.node_id for worker in workers) == alive_node_ids(cluster)
    return checkpoint


def test_ray_job_submit_trains_with_a_worker_on_each_node(
    cluster: dict, shar_data: Path, tiny_llm_dir: Path, tmp_path: Path
) -> None:
    submission_id = f"salm-train-cli-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [RAY, "job", "submit", "--address", cluster["RAY_DASHBOARD_ADDRESS"], "--working-dir", REPO,
         "--runtime-env-json", json.dumps({"excludes": RUNTIME_ENV["excludes"]}),
         "--submission-id", submission_id,
         "--", *train_entrypoint(shar_data, tiny_llm_dir, tmp_path, "cli")],
        env={**os.environ, "RAY_AUTH_MODE": cluster["RAY_AUTH_MODE"]},
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, without_upload_noise(result.stdout + result.stderr)
    assert f"Job '{submission_id}' succeeded" in result.stdout + result.stderr
    checkpoint = check_training_job(cluster, submission_id, tmp_path / "cli")
    assert (checkpoint / "model.nemo").stat().st_size > 1_000_000  # exp_manager.always_save_nemo


def scrape(port: str) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_project_metrics_reach_the_nodes_prometheus_endpoints(cluster: dict) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    sys.path.insert(0, str(REPO / "cluster" / "monitoring"))
    from emit_sample_metrics import project_metrics, prometheus_names

    expected = {name for metric in project_metrics() for name in prometheus_names(metric)}
    assert any(n.startswith("ray_salm_train_") for n in expected)
    assert any(n.startswith("ray_salm_serve_") for n in expected)

    client = JobSubmissionClient(cluster["RAY_DASHBOARD_ADDRESS"])
    job_id = client.submit_job(
        entrypoint="python cluster/monitoring/emit_sample_metrics.py --seconds 240", runtime_env=RUNTIME_ENV
    )
    try:
        # Every node exports what its own workers record; scrape all of them, as Prometheus does.
        ports = cluster["SALM_CLUSTER_METRICS_PORTS"].split()
        assert len(ports) == 2
        deadline, seen = time.monotonic() + 200, set()
        expected.add("ray_node_cpu_utilization")  # Ray's own node metrics share the endpoint
        while not expected <= seen and time.monotonic() < deadline:
            assert client.get_job_status(job_id) in {JobStatus.PENDING, JobStatus.RUNNING}, (
                client.get_job_logs(job_id)
            )
            seen = set().union(*(scrape(port) for port in ports))
            time.sleep(1)
        assert expected <= seen, f"missing on the endpoints: {sorted(expected - seen)}"
        # What cluster/monitoring/prometheus.yml follows: the head lists every node's endpoint.
        discovery = json.loads((cluster["dir"] / "ray" / "prom_metrics_service_discovery.json").read_text())
        targets = {target.rsplit(":", 1)[1] for group in discovery for target in group["targets"]}
        assert set(ports) <= targets
    finally:
        client.stop_job(job_id)
        wait_for(client, job_id, timeout_s=60)


def test_stop_script_ends_its_cluster_and_descendants_and_spares_other_clusters(tmp_path: Path) -> None:
    """Stand-in processes: Ray daemons carry the temp dir in their command line, the client
    server its port; workers are their children. Another cluster's look-alikes must survive."""
    directory = Path(tempfile.mkdtemp(prefix="salmc-", dir="/tmp"))
    (directory / "cluster.env").write_text("SALM_CLUSTER_CLIENT_PORT=12345\n")
    child_pid_file = tmp_path / "child.pid"
    spawn_child = f"import subprocess, time; open({str(child_pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '300']).pid)); time.sleep(300)"
    sleep = "import time; time.sleep(300)"
    mine = [
        subprocess.Popen([sys.executable, "-c", spawn_child, f"--log-dir={directory}/ray/session_1/logs"]),
        subprocess.Popen(
            [sys.executable, "-c", sleep, "-m", "ray.util.client.server", "--port=12345", "--mode=proxy"]
        ),
    ]
    others = [
        subprocess.Popen([sys.executable, "-c", sleep, f"--log-dir={directory}-other/ray/session_1/logs"]),
        subprocess.Popen(
            [sys.executable, "-c", sleep, "-m", "ray.util.client.server", "--port=123456", "--mode=proxy"]
        ),
    ]
    try:
        deadline = time.monotonic() + 30
        while not child_pid_file.exists() or not child_pid_file.read_text():
            assert time.monotonic() < deadline, "the stand-in daemon did not start its child"
            time.sleep(0.1)
        child_pid = int(child_pid_file.read_text())
        subprocess.run(
            [STOP, "--dir", directory, "--grace-s", "2"], check=True, capture_output=True, timeout=60
        )
        for process in mine:
            process.wait(timeout=10)  # raises if stop.sh left it running
        assert (
            not Path(f"/proc/{child_pid}").exists()
            or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2]
        )
        assert all(process.poll() is None for process in others)
        assert not (directory / "cluster.env").exists()
    finally:
        for process in mine + others:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
