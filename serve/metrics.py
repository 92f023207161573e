"""The serving metrics, exported by Ray to its dashboard and Prometheus endpoint.

``ray.serve.metrics`` adds the application, deployment and replica tags, so one Grafana panel
can split any of these by replica. Names start with ``salm_serve_``; Ray prefixes ``ray_``.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
BATCH_REQUEST_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
BATCH_AUDIO_BOUNDARIES_S = [5, 10, 20, 40, 80, 160, 320, 640, 1280]


class IngressMetrics:
    """What the HTTP front door sees: latency per route and status, and why requests were refused."""

    def __init__(self) -> None:
        self.latency_s = metrics.Histogram(
            "salm_serve_request_latency_s",
            description="HTTP request latency in seconds, from the ingress receiving it to the response.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("route", "status"),
        )
        self.rejected = metrics.Counter(
            "salm_serve_requests_rejected",
            description="Requests refused, by reason (bad_audio, too_large, too_long, invalid_request, "
            "unauthorized, overloaded, failed).",
            tag_keys=("reason",),
        )


class TranscriberMetrics:
    """What a model replica does: batch sizes, audio processed, speed and its waiting queue."""

    def __init__(self) -> None:
        self.batch_requests = metrics.Histogram(
            "salm_serve_batch_requests",
            description="Requests per generation batch.",
            boundaries=BATCH_REQUEST_BOUNDARIES,
        )
        self.batch_audio_s = metrics.Histogram(
            "salm_serve_batch_audio_s",
            description="Audio seconds per generation batch (the batch budget is measured in these).",
            boundaries=BATCH_AUDIO_BOUNDARIES_S,
        )
        self.audio_s = metrics.Counter("salm_serve_audio_seconds", description="Audio seconds transcribed.")
        self.compute_s = metrics.Counter(
            "salm_serve_compute_seconds",
            description="Seconds spent in generation; rate(audio) / rate(compute) is the RTFx.",
        )
        self.rtfx = metrics.Gauge(
            "salm_serve_rtfx", description="Audio seconds per compute second in the last batch (RTFx)."
        )
        self.queue_depth = metrics.Gauge(
            "salm_serve_queue_depth", description="Requests waiting in this replica for a batch slot."
        )
        self.model_wait_s = metrics.Histogram(
            "salm_serve_model_wait_s",
            description="Seconds a request waited in this replica for the model, from Serve batching it "
            "to its batch starting. Latency minus this and the batch's compute time is the HTTP path's share.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
