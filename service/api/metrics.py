"""Prometheus metrics of one app (its own registry: nothing global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self.requests = Counter(
            "seeright_requests_total", "Chat completion requests by outcome.", ["status"], registry=self.registry
        )
        self.method_requests = Counter(
            "seeright_intervention_requests_total", "Requests per intervention method.", ["method"], registry=self.registry
        )
        self.latency = Histogram(
            "seeright_request_latency_seconds", "End-to-end latency of chat completions.", ["method"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry,
        )
        self.prompt_tokens = Counter("seeright_prompt_tokens_total", "Prompt tokens processed.", registry=self.registry)
        self.completion_tokens = Counter("seeright_completion_tokens_total", "Tokens generated.", registry=self.registry)
        self.queue_depth = Gauge("seeright_queue_depth", "Requests waiting or running.", registry=self.registry)
