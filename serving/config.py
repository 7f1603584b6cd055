"""Typed serving config: what the replica loads and its limits. Validated at the edge
(CLI flags, the Serve config file's `args`), never tuned in code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.store.job_records import FineTuningConfig


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("minilm", description="Backbone folder or shipped alias (minilm, smollm2).")
    hub: str = Field("hub", description="Adapter registry location: a path or fsspec URL.")
    mode: Literal["mixed", "merged"] = Field("mixed", description="mixed: many adapters per batch; merged: one.")
    merged_adapter: str | None = Field(None, description="The adapter a merged replica is dedicated to.")
    kernel_size: int = Field(8, ge=1, le=128, description="Kernel of the adapters this replica mixes.")
    max_rank: int = Field(1, ge=1, le=64)
    targets: list[str] = Field(default_factory=lambda: ["all"], description="Layers the replica wraps.")
    device_slots: int = Field(256, ge=1, le=1_000_000, description="Adapters resident on the device.")
    host_capacity: int = Field(10_000, ge=1, le=10_000_000, description="Adapters kept in host memory.")
    device: str | None = Field(None, description="cuda or cpu; default: cuda when present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Backbone, bank and heads; auto: bfloat16 on CUDA, float32 on the CPU."
    )
    cuda_graphs: bool = Field(
        False, description="On CUDA: replay classify forwards (serving/graphs.py, one graph per (rows, tokens) "
        "bucket) and decode steps (serving/runner.py, one per (rows, read length) bucket) from CUDA graphs, "
        "which saves eager mode's per-layer host time. Ignored on the CPU."
    )
    compile_decode: bool = Field(
        False, description="Causal LMs off CUDA graphs: run each decode step through torch.compile (serving/"
        "runner.py). For SmolLM2 on 2 CPU cores it measured faster than eager at 8 rows x 128 tokens of context "
        "but 1.6-3x slower at 512 (benchmarks/results/decode_compiled.md), after about 2 minutes of compiling "
        "per step kind."
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="Causal LMs: continuous batching, or one static batch per @serve.batch."
    )
    max_running: int = Field(
        32, ge=1, le=4096, description="Continuous batching: most sequences decoding at once (see kv_cache_gib)."
    )
    kv_cache_len: int | None = Field(
        None, ge=16, le=131_072,
        description="Continuous batching: KV cache positions per sequence (prompt + new tokens); "
        "default: the model's own context.",
    )
    kv_cache_gib: float = Field(
        4.0, gt=0, description="Continuous batching: memory for the KV cache; fewer rows run if it would be exceeded."
    )
    max_waiting: int = Field(256, ge=1, description="Continuous batching: generations queued to start (503 beyond).")
    prefill_chunk_tokens: int | None = Field(
        128, ge=8, le=131_072,
        description="Continuous batching: a longer prompt is prefilled this many tokens at a time, with a decode "
        "step of the running sequences between chunks; None: in one piece.",
    )
    max_input_tokens: int | None = Field(
        None, ge=8, le=131_072, description="Context cap per input; default: the model's own context."
    )


class TenantQuota(BaseModel):
    """One tenant's share of a replica; None switches a limit off."""

    model_config = ConfigDict(extra="forbid")

    requests_per_s: float | None = Field(None, gt=0, description="Sustained requests per second.")
    burst: int = Field(20, ge=1, description="Requests a tenant may send at once above its rate.")
    tokens_per_min: int | None = Field(None, ge=1, description="Input + output tokens per minute.")
    max_concurrent: int | None = Field(64, ge=1, description="Requests of this tenant in flight at once.")


class LimitsConfig(BaseModel):
    """Request limits enforced at the HTTP edge (4xx beyond them)."""

    model_config = ConfigDict(extra="forbid")

    max_inputs_per_request: int = Field(64, ge=1, le=10_000)
    max_input_chars: int = Field(4_000, ge=1, le=1_000_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_new_tokens: int = Field(256, ge=1, le=131_072, description="Most tokens one completion may ask for.")
    max_choices: int = Field(8, ge=1, le=1024, description="Most choices (prompts x n) in one completion request.")
    max_queued_requests: int = Field(512, ge=1, description="Beyond this, 503 with Retry-After.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="A classify call, or a generation's first token, not there by then answers 504.")
    stream_idle_timeout_s: float = Field(
        30.0, gt=0, description="A stream that gets no new token for this long ends with a timeout event.")
    seconds_per_token: float = Field(
        0.5, gt=0, description="A generation's whole bound: request_timeout_s plus this per token of its max_tokens "
        "(0.5 s is about 4x a 32-row SmolLM2 decode step on 2 CPU cores; a GPU needs far less).")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown (SIGTERM to `dcft serve`), how long requests already running may take "
        "to finish while new ones answer 503; a stream still running then ends with an error event.")
    tenant_quota: TenantQuota = Field(default_factory=TenantQuota, description="Every tenant's default quota.")
    tenant_quotas: dict[str, TenantQuota] = Field(default_factory=dict, description="Quotas of named tenants.")


def generation_timeout_s(limits: LimitsConfig, max_tokens: int) -> float:
    """How long a whole generation of `max_tokens` may take before it answers 504."""
    return limits.request_timeout_s + limits.seconds_per_token * max_tokens


class AutoscalingSpec(BaseModel):
    """Serve's autoscaling for the model replicas: replicas follow the requests in flight each holds."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Never fewer (a replica holds the backbone: no scale to zero).")
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(
        32, gt=0, description="Requests in flight per replica to aim for; about one full batch."
    )
    upscale_delay_s: float = Field(10, ge=0, description="Load must stay above target this long to add one.")
    downscale_delay_s: float = Field(120, ge=0, description="Load must stay below target this long to remove one.")
    look_back_period_s: float = Field(10, gt=0, description="Window the in-flight average is taken over.")
    metrics_interval_s: float = Field(2, gt=0, description="How often replicas report their load.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class RoutingConfig(BaseModel):
    """How the ingress picks a model replica for each request (see serving/routing.py)."""

    model_config = ConfigDict(extra="forbid")

    adapter_affinity: bool = Field(
        True, description="Send an adapter's requests to a replica that holds it; off: Serve's power of two choices."
    )
    max_imbalance: int = Field(
        16, ge=0, description="Requests in flight a preferred replica may hold beyond the least loaded one before "
        "its adapter's requests spill to others.",
    )
    stats_period_s: float = Field(1.0, gt=0, description="How often each replica reports what it holds.")
    converge_timeout_s: float = Field(
        15.0, ge=0, description="Admin changes wait this long for every replica to apply them, then answer with "
        "each replica's state.",
    )


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys_file: str | None = Field(None, description="JSON {key: tenant}; or set DCFT_API_KEYS.")
    admin_tenant: str = Field("admin", description="Tenant allowed to manage and see all adapters.")
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)
    watch_interval_s: float = Field(
        2.0, ge=0, description="Poll the registry for new versions and the fleet's placements; 0 = off (admin "
        "changes then reach only the replica that ran them, and wait converge_timeout_s for the others).",
    )
    num_replicas: int | Literal["auto"] = 1
    autoscaling: AutoscalingSpec | None = Field(None, description="Autoscale the model replicas (num_replicas unused).")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    replica_num_cpus: float = Field(0, ge=0)
    replica_num_gpus: float = Field(0, ge=0)
    ingress_replicas: int = Field(
        1, ge=1, description="HTTP Ingress replicas; each enforces its share of every tenant quota.",
    )
    fine_tuning: FineTuningConfig | None = Field(
        default_factory=FineTuningConfig, description="The files and fine-tuning routes' limits (jobs are kept in "
        "the hub's store and run by training/job_scheduler.py); None turns the routes off.",
    )
    ingress_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each Ingress replica asks for: a resource only "
        "some nodes have, e.g. {\"head\": 0.001}, keeps the Ingress on them.",
    )
