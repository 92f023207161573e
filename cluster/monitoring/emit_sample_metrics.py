"""Publish a sample of every salm metric from a Ray actor, to check Prometheus and Grafana.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python cluster/monitoring/emit_sample_metrics.py --seconds 120

Before the first real training run or deployment, this shows whether the scrape config and the
dashboard (cluster/monitoring/grafana_dashboard.json) see the project's metrics: every training
gauge (``salm_train_*``, from ``salm.train.step_metrics``) and every serving metric
(``salm_serve_*``, from ``serve.metrics``) gets one value, tagged ``run=sample-metrics``. Ray
exports them on each node's metrics port as ``ray_<name>`` (counters with ``_total``, histograms
as ``_bucket``/``_sum``/``_count``). Gauges disappear from the endpoint when the actor exits, so
the actor keeps them alive for ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import time

import ray
from ray.util.metrics import Counter, Gauge, Histogram, Metric

SAMPLE_RUN = "sample-metrics"


def project_metrics() -> list[Metric]:
    """Every metric salm defines, built by the same classes training and serving use."""
    from salm.train.step_metrics import StepMeter
    from serve.metrics import IngressMetrics, TranscriberMetrics

    metrics: list[Metric] = list(StepMeter(SAMPLE_RUN, world_size=1).gauges.values())
    for holder in (IngressMetrics(), TranscriberMetrics()):
        metrics += [value for value in vars(holder).values() if isinstance(value, Metric)]
    return metrics


def prometheus_names(metric: Metric) -> list[str]:
    """The series names Ray's Prometheus exporter gives this metric."""
    name = f"ray_{metric.info['name']}"
    if isinstance(metric, Counter):
        return [f"{name}_total"]
    if isinstance(metric, Histogram):
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    return [name]


def record_sample(metric: Metric) -> None:
    tags = {key: "sample" for key in metric.info["tag_keys"]}
    if "run" in tags:
        tags["run"] = SAMPLE_RUN
    if isinstance(metric, Counter):
        metric.inc(1.0, tags=tags)
    elif isinstance(metric, Histogram):
        metric.observe(1.0, tags=tags)
    elif isinstance(metric, Gauge):
        metric.set(1.0, tags=tags)


@ray.remote(num_cpus=0)
class SampleEmitter:
    """Metrics live in a Ray worker process like the real ones (train workers, Serve replicas)."""

    def emit(self) -> dict:
        self.metrics = project_metrics()  # kept on the actor: a metric is exported while it lives
        for metric in self.metrics:
            record_sample(metric)
        names = sorted(name for metric in self.metrics for name in prometheus_names(metric))
        return {"node_id": ray.get_runtime_context().get_node_id(), "series": names}

    def refresh_gauges(self) -> None:
        """Ray exports a gauge only in the windows where it was set: set them again, as the
        transcriber and the training loop do with their own."""
        for metric in self.metrics:
            if isinstance(metric, Gauge):
                record_sample(metric)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to keep the gauges alive")
    args = parser.parse_args()
    ray.init()
    emitter = SampleEmitter.remote()
    print(json.dumps(ray.get(emitter.emit.remote())), flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(2)
        ray.get(emitter.refresh_gauges.remote())


if __name__ == "__main__":
    main()
