"""Prometheus metrics for `/metrics`, in a registry owned by one app (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leanlm.serve.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("leanlm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("leanlm_prompt_tokens", "prompt tokens of finished sequences", registry=r)
        self.generated_tokens = Counter("leanlm_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("leanlm_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("leanlm_inter_token_latency_seconds", "time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        Gauge("leanlm_queue_length", "sequences waiting for a batch row", registry=r).set_function(
            lambda: engine.queued)
        Gauge("leanlm_active_sequences", "sequences holding a batch row", registry=r).set_function(
            lambda: engine.active)
        Gauge("leanlm_batch_size", "sequences decoded in the last decode step", registry=r).set_function(
            lambda: engine.last_batch)
        Gauge("leanlm_decode_steps", "batched decode steps run so far", registry=r).set_function(
            lambda: engine.steps)
        if engine.spec is not None:  # speculative decoding: totals over every sequence's verified blocks
            spec = engine.spec.stats
            for name, doc, fn in (
                    ("draft_tokens", "draft tokens proposed so far", lambda: spec.proposed),
                    ("accepted_tokens", "draft tokens accepted so far", lambda: spec.accepted),
                    ("verified_blocks", "sequence blocks verified so far (one per sequence per forward)",
                     lambda: spec.rounds),
                    ("acceptance_rate", "accepted / proposed draft tokens", lambda: spec.acceptance),
                    ("tokens_per_forward", "tokens a sequence gains per verifying forward (1 = no gain)",
                     lambda: spec.tokens_per_forward)):
                Gauge(f"leanlm_speculative_{name}", doc, registry=r).set_function(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)
