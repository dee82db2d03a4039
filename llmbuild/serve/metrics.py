"""Metrics: the server's Prometheus series (one registry per server, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: sub-millisecond steps on a GPU up to minute-long CPU requests.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    """Request latencies, engine state and token counters, exported at /metrics."""

    def __init__(self, model: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = {"model": model}

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labelnames=["model"], buckets=_LATENCY, registry=r).labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labelnames=["model"], registry=r).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labelnames=["model"], registry=r).labels(**labels)

        self.ttft = histogram("llmbuild_time_to_first_token_seconds", "Arrival to first generated token")
        self.itl = histogram("llmbuild_inter_token_latency_seconds", "Time between consecutive tokens of a request")
        self.e2e = histogram("llmbuild_e2e_request_latency_seconds", "Arrival to last token")
        self.step = histogram("llmbuild_step_seconds", "Wall time of one engine step")
        self.waiting = gauge("llmbuild_requests_waiting", "Requests queued for a batch slot or KV blocks")
        self.running = gauge("llmbuild_requests_running", "Requests in the running batch")
        self.kv_blocks_used = gauge("llmbuild_kv_blocks_used", "KV-cache blocks held by requests")
        self.kv_blocks_total = gauge("llmbuild_kv_blocks_total", "KV-cache blocks in the pool")
        self.prefix_hit_rate = gauge(
            "llmbuild_prefix_cache_hit_rate", "Share of admitted prompt tokens served from the prefix cache"
        )
        self.prompt_tokens = counter("llmbuild_prompt_tokens", "Prompt tokens received")
        self.generation_tokens = counter("llmbuild_generation_tokens", "Tokens generated")
        self.preemptions = counter("llmbuild_preemptions", "Requests preempted (recomputed later) for KV blocks")
        self.prefix_queried = counter("llmbuild_prefix_cache_queried_tokens", "Tokens looked up in the prefix cache")
        self.prefix_hits = counter("llmbuild_prefix_cache_hit_tokens", "Tokens found in the prefix cache")
        self.step_time = counter("llmbuild_step_time_seconds", "Wall time of engine steps")
        self.model_time = counter(
            "llmbuild_model_time_seconds", "Part of step time in the forward pass and sampling (the rest is overhead)"
        )
        self.spec_drafts = counter(
            "llmbuild_spec_decode_num_drafts", "Verifications of proposed tokens (speculative decoding)"
        )
        self.spec_draft_tokens = counter("llmbuild_spec_decode_num_draft_tokens", "Tokens proposed")
        self.spec_accepted_tokens = counter(
            "llmbuild_spec_decode_num_accepted_tokens", "Proposed tokens accepted (each a token without a step)"
        )
        self.lora_adapters = gauge("llmbuild_lora_adapters", "LoRA adapters registered (served as models)")
        self.lora_slots_used = gauge("llmbuild_lora_slots_used", "LoRA slots holding an adapter")
        self.lora_loads = counter(
            "llmbuild_lora_slot_loads", "Adapters written into a slot (first use, or back after an eviction)"
        )
        self._finished = Counter(
            "llmbuild_requests", "Finished requests by reason", labelnames=["model", "finish_reason"], registry=r
        )
        self._model = model
        self._counts = (0, 0, 0)
        self._spec_counts = (0, 0, 0)
        self._lora_loads = 0

    def observe_step(self, seconds: float, model_seconds: float) -> None:
        self.step.observe(seconds)
        self.step_time.inc(seconds)
        self.model_time.inc(model_seconds)

    def finished(self, reason: str) -> None:
        self._finished.labels(model=self._model, finish_reason=reason).inc()

    def set_scheduler_counters(self, preemptions: int, queried: int, hits: int) -> None:
        """Mirror the scheduler's running totals into counters (they only grow)."""
        old = self._counts
        self.preemptions.inc(preemptions - old[0])
        self.prefix_queried.inc(queried - old[1])
        self.prefix_hits.inc(hits - old[2])
        self._counts = (preemptions, queried, hits)
        if queried:
            self.prefix_hit_rate.set(hits / queried)

    def set_lora_state(self, adapters: int, slots_used: int, loads: int) -> None:
        """Mirror the LoRA manager's state (loads: a running total, into a counter)."""
        self.lora_adapters.set(adapters)
        self.lora_slots_used.set(slots_used)
        self.lora_loads.inc(loads - self._lora_loads)
        self._lora_loads = loads

    def set_speculation_counters(self, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        """Mirror the speculator's running totals into counters (they only grow)."""
        old = self._spec_counts
        self.spec_drafts.inc(drafts - old[0])
        self.spec_draft_tokens.inc(draft_tokens - old[1])
        self.spec_accepted_tokens.inc(accepted_tokens - old[2])
        self._spec_counts = (drafts, draft_tokens, accepted_tokens)
