"""Prometheus metrics for /metrics, named as vLLM names them (with a `gpt2kit:` prefix).

The engine thread updates them; prometheus_client is thread-safe. Each server has its own registry, so
tests that start several servers in one process do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(name, doc, list(labels), registry=r).labels(**labels)

        def counter(name, doc):
            return Counter(name, doc, list(labels), registry=r).labels(**labels)

        def histogram(name, doc):
            return Histogram(name, doc, list(labels), buckets=LATENCY_BUCKETS, registry=r).labels(**labels)

        self.running = gauge("gpt2kit:num_requests_running", "Sequences in the running batch (prefill or decode).")
        self.waiting = gauge("gpt2kit:num_requests_waiting", "Sequences waiting for a free slot.")
        self.prompt_tokens = counter("gpt2kit:prompt_tokens", "Prompt tokens processed (cached ones included).")
        self.cached_tokens = counter("gpt2kit:prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache.")
        self.generation_tokens = counter("gpt2kit:generation_tokens", "Tokens generated.")
        self.requests = Counter("gpt2kit:request_success", "Requests answered, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("gpt2kit:time_to_first_token_seconds", "From arrival to the first generated token.")
        self.inter_token = histogram("gpt2kit:inter_token_latency_seconds", "Between two tokens of one sequence.")
        self.e2e = histogram("gpt2kit:e2e_request_latency_seconds", "From arrival to the last token of a request.")
        self.queue_time = histogram("gpt2kit:request_queue_time_seconds", "From arrival to admission into the batch.")
        self.model_name = model_name

    def finished(self, reason: str) -> None:
        self.requests.labels(model_name=self.model_name, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
