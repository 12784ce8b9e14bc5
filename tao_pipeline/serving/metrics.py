"""Prometheus metrics of `tao serve` (text format at /metrics), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tao_pipeline.serving.engine import Engine
from tao_pipeline.serving.request_log import RequestLog

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, request_log: RequestLog | None = None, engine: Engine | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(request_log, engine))
        self.in_flight = Gauge("tao_serve_rows_in_flight", "Rows decoding or queued now.", registry=self.registry)
        self.requests = Counter(
            "tao_serve_requests", "Requests answered or failed.", ["endpoint", "outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "tao_serve_request_seconds", "Time from request to last token.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter("tao_serve_tokens", "Tokens read and written.", ["kind"], registry=self.registry)
        self.model = Gauge("tao_serve_model_info", "The version answering now (value 1).", ["version"],
                           registry=self.registry)  # fmt: skip
        self.swaps = Counter("tao_serve_swaps", "Champion swaps.", registry=self.registry)
        self.logged_rows = Counter(
            "tao_serve_logged_rows", "Answer rows (one per choice) written to the inbox.", registry=self.registry
        )
        self.feedback_posts = Counter(
            "tao_serve_feedback",
            "POST /v1/feedback, by outcome: logged (into the inbox), invalid (400), not_kept (503).",
            ["outcome"],
            registry=self.registry,
        )
        self.unlogged_requests = Counter(
            "tao_serve_unlogged_requests",
            "Answered requests not logged, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.live_latency = Histogram(
            "tao_serve_live_seconds",
            "During a live experiment: seconds to answer, by arm (champion, canary, shadow) and version.",
            ["arm", "version"],
            registry=self.registry,
        )
        self.live_failures = Counter(
            "tao_serve_live_failures_total",
            "During a live experiment: requests that failed with a server error, by arm and version.",
            ["arm", "version"],
            registry=self.registry,
        )

    def answered(self, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(endpoint, "ok").inc()
        self.latency.labels(endpoint).observe(seconds)
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)

    def failed(self, endpoint: str, seconds: float) -> None:
        self.requests.labels(endpoint, "error").inc()
        self.latency.labels(endpoint).observe(seconds)

    def busy(self, endpoint: str) -> None:
        """Refused with 429: too many rows in flight."""
        self.requests.labels(endpoint, "busy").inc()

    def cancelled(self, endpoint: str) -> None:
        """The client left before its answer was whole: nothing more was generated or logged for it."""
        self.requests.labels(endpoint, "cancelled").inc()

    def logged(self, rows: int) -> None:
        self.logged_rows.inc(rows)

    def feedback(self, outcome: str) -> None:
        self.feedback_posts.labels(outcome).inc()

    def live_answer(self, arm: str, version: str, seconds: float) -> None:
        self.live_latency.labels(arm, version).observe(seconds)

    def live_failure(self, arm: str, version: str) -> None:
        self.live_failures.labels(arm, version).inc()

    def unlogged(self, reason: str) -> None:
        self.unlogged_requests.labels(reason).inc()

    def served_version(self, version: str) -> None:
        self.model.clear()
        self.model.labels(version).set(1)

    def swapped(self, version: str, first: bool = False) -> None:
        if not first:
            self.swaps.inc()
        self.served_version(version)

    def render(self, rows_in_flight: int = 0) -> bytes:
        self.in_flight.set(rows_in_flight)
        return generate_latest(self.registry)


class _StateCollector:
    """The request log's and the engine's own counts, read when /metrics is asked."""

    def __init__(self, request_log: RequestLog | None, engine: Engine | None):
        self.request_log, self.engine = request_log, engine

    def collect(self):
        if self.request_log is not None:
            health = self.request_log.health
            errors = CounterMetricFamily("tao_serve_log_errors", "Request-log failures, by kind.", labels=["kind"])
            errors.add_metric(["write"], health.write_errors)
            errors.add_metric(["roll"], health.roll_errors)
            yield errors
            yield CounterMetricFamily("tao_serve_log_rows_lost", "Answered rows that could not be logged.",
                                      value=health.rows_lost)  # fmt: skip
            yield GaugeMetricFamily("tao_serve_log_files_waiting", "Log files not yet handed to the inbox.",
                                    value=len(health.waiting_files))  # fmt: skip
        if self.engine is not None:
            state = self.engine.status()
            for key, value in state.items():
                if isinstance(value, bool):
                    value = int(value)
                if isinstance(value, int | float):
                    yield GaugeMetricFamily(f"tao_serve_engine_{key}", f"The engine's {key.replace('_', ' ')}.",
                                            value=value)  # fmt: skip
