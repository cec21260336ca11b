"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("omni_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.tokens = Counter("omni_generated_tokens", "Answer tokens generated (chat completions)", registry=r)
        self.images = Counter("omni_generated_images", "Images generated", registry=r)
        self.queue_depth = Gauge("omni_queue_depth", "Requests accepted and waiting for a slot", registry=r)
        self.running = Gauge("omni_running_requests", "Requests decoding in the running batch, by task", ["task"],
                             registry=r)
        self.rows = Gauge("omni_batch_rows", "Inference-state rows in use (the running batch), by task", ["task"],
                          registry=r)
        self.capacity = Gauge("omni_batch_capacity_rows", "Inference-state rows of each task's pool", ["task"],
                              registry=r)
        self.latency = Histogram("omni_request_latency_seconds", "Time from request to full response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("omni_time_to_first_token_seconds", "Time from request to the first answer token",
                                     buckets=LATENCY_BUCKETS, registry=r)

    def watch(self, scheduler) -> None:
        """Read the scheduler's queue and batch at every scrape."""
        self.registry.register(_SchedulerCounters(scheduler))
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        for task, pool in scheduler.pools.items():
            self.running.labels(task).set_function(lambda t=task: scheduler.running(t))
            self.rows.labels(task).set_function(lambda t=task: scheduler.rows_used(t))
            self.capacity.labels(task).set(pool.capacity)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCounters:
    """Counters the scheduler thread keeps, read at each scrape."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler
        steps = CounterMetricFamily("omni_decode_steps", "Batched decoding steps run, by task", labels=["task"])
        rows = CounterMetricFamily("omni_decode_step_requests", "Requests in each batched step, summed, by task "
                                   "(divided by omni_decode_steps: the mean running batch)", labels=["task"])
        for task in s.pools:
            steps.add_metric([task], s.steps[task])
            rows.add_metric([task], s.stepped_requests[task])
        yield steps
        yield rows
        yield CounterMetricFamily("omni_cancelled_requests", "Requests dropped before their generation ended, their "
                                  "rows freed: the client went away, or a stop sequence ended every answer",
                                  value=s.cancelled)
