"""Worker settings: CLI > topology file > EDGESPLIT_* environment > defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from shared.config import BusSettings
from shared.errors import ConfigError
from shared.model.shard_fetch import check_url


class WorkerSettings(BusSettings):
    """One worker process (one emulated edge node). Units in field names."""

    node_id: str = Field(description="this node's id (a topic level)")
    shards_dir: Path | None = Field(default=None, description="folder written by `edgesplit shard`")
    shards_url: str | None = Field(
        default=None, description="http(s) URL of such a folder (any static file server; "
        "`edgesplit serve-shards`): files are fetched, verified against the manifest, cached",
    )
    shard_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "edgesplit" / "shards",
        description="where shards fetched from shards_url are kept, one folder per manifest sha256",
    )
    manifest_sha256: str = Field(
        default="", pattern=r"^([0-9a-f]{64})?$",
        description="refuse a shard store whose manifest.json has another sha256 (empty: the "
        "plan's pin alone decides)",
    )
    shard_fetch_timeout_s: float = Field(default=30.0, gt=0, description="per socket operation")
    shard_fetch_attempts: int = Field(default=3, ge=1, le=100,
                                      description="tries per file, each resuming the last")
    trust: int = Field(default=0, ge=0, le=10)
    memory_bytes: int = Field(default=4_000_000_000, ge=0)
    threads: int = Field(default=1, ge=1, le=64)
    device: str = "cpu"
    slowdown: float = Field(default=1.0, ge=1.0, description="emulated compute slowdown factor")
    link_shapes: dict[str, tuple[float | None, float]] = Field(
        default_factory=dict,
        description="emulated egress per destination: {node: (bytes_per_s or null, latency_s)}",
    )
    private_blocks: int = Field(default=0, ge=0, le=65_536, description="blocks [0, k) need trusted_level")
    trusted_level: int = Field(default=0, ge=0, le=1_000, description="trust the entry and private blocks need")
    max_in_flight: int | None = Field(
        default=None, ge=1, description="entry: requests run at once; None: from this node's "
        "measured decode speed, the streams that each still get a token every in_flight_tpot_s "
        "(1-64; 8 until measured; services/worker/admission.py)",
    )
    in_flight_tpot_s: float = Field(
        default=0.5, gt=0, description="entry: the time per output token the default "
        "max_in_flight keeps each stream within",
    )
    max_queued_requests: int | None = Field(
        default=None, ge=0, description="entry: requests that may wait (FIFO) for a slot; more "
        "are refused busy; None: the typical requests (128 + 64 tokens) the pipeline's KV "
        "budgets hold at once, 64-1024",
    )
    stage_timeout_s: float = Field(default=30.0, gt=0,
                                   description="entry: longest wait for a pipeline pass (cap)")
    kv_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="free a request's KV cache unused this long (>= a pass)"
    )
    kv_partial_timeout_s: float = Field(
        default=10.0, gt=0, description="free K/V moved here whose other blocks never came after"
    )
    kv_budget_bytes: int | None = Field(
        default=None, ge=0, description="KV caches this node may hold; None: its memory left "
        "after its blocks' weights, at least 64 MiB (services/worker/kv_budget.py)",
    )
    activation_precision: str = Field(
        default="fp32", pattern=r"^(fp32|fp16|int8)$",
        description="how this node's activation frames travel: fp32 (exact), fp16, int8 with a "
        "scale per row (shared/tensor_frame.py)",
    )
    max_prompt_tokens: int = Field(default=8192, ge=1)
    max_prompt_chars: int | None = Field(
        default=None, ge=1,
        description="entry: longest prompt text (characters) it tokenizes; None: 16 per token "
        "the prompt may have (services/worker/prompt.py: CHARS_PER_TOKEN_BOUND)",
    )
    failover_wait_s: float = Field(
        default=10.0, gt=0, description="entry: how long to wait for a re-plan after a node dies"
    )
    max_replays: int = Field(
        default=4, ge=0, le=100, description="entry: retries (replays) one request may spend"
    )
    stage_min_s: float = Field(
        default=2.0, gt=0, description="entry: the adaptive pass deadline is never shorter"
    )
    stage_factor: float = Field(
        default=10.0, ge=1, description="entry: pass deadline = factor x the expected pass time"
    )
    stall_s: float = Field(
        default=3.0, gt=0, description="an event-loop gap this long (SIGSTOP) resets KV state"
    )
    duplicate_frames: bool = Field(
        default=False, description="fault injection for tests: send every activation frame twice"
    )
    batch_frames: bool = Field(
        default=True, description="decode steps of several requests bound for the same next hop "
        "travel as one batch frame (False: one frame per step)",
    )
    kv_handoff: bool = Field(
        default=True, description="move KV caches when split points move (else replay)"
    )
    shard_cache_bytes: int = Field(
        default=2_000_000_000, ge=0, description="recently used block weights kept in memory"
    )
    warm_shard_bytes: int | None = Field(
        default=None, ge=0,
        description="block weights loaded into the shard cache ahead of any plan, so a migration "
        "here loads nothing (None: half of memory_bytes; 0: off)",
    )
    # monitoring and emulation (docs/MONITOR.md)
    telemetry_period_s: float = Field(default=1.0, gt=0, description="telemetry (heartbeat) period")
    benchmark: bool = Field(default=True, description="time one block at start-up")
    probe_period_s: float = Field(default=1.0, ge=0, description="link probe rounds per peer (0: off)")
    probe_budget_fraction: float = Field(default=0.02, gt=0, le=0.05,
                                         description="share of a link's time probes may use")
    probe_burst_s: float = Field(default=0.1, gt=0, description="link-seconds of probe credit at most")
    probe_dispersion_s: float = Field(default=0.02, gt=0, description="link time a sized probe targets")
    probe_min_bytes: int = Field(default=4096, ge=256)
    probe_max_bytes: int = Field(default=131072, ge=256, le=4 * 1024 * 1024)
    probe_timeout_s: float = Field(default=3.0, gt=0, description="an echo later than this is lost")
    probe_peers: tuple[str, ...] | None = Field(
        default=None, description="nodes to probe (None: every online node; a topology: its links)"
    )

    @model_validator(mode="after")
    def _one_shard_source(self) -> WorkerSettings:
        if (self.shards_dir is None) == (self.shards_url is None):
            raise ValueError("give exactly one of shards_dir (--shards) and shards_url (--shards-url)")
        if self.shards_url is not None:
            try:
                check_url(self.shards_url)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return self
