"""The objects a check returns. Renderers read them; nothing here computes or prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass
class Sample:
    prompt: str
    reference: str
    engine: str


@dataclass
class ModuleResult:
    """One LoRA-targeted module: what the engine holds compared with W0 + ΔW."""

    module: str
    effective_scale: float
    residual: float
    divergence: float
    verdict: str = "ok"
    # The engine's two parts, read apart: how much of a merged sync its base weight holds (0
    # unmerged, 1 merged in the engine's dtype) and how much ΔW its LoRA slot holds (0 none,
    # 1 loaded), each with its residual over ‖ΔW‖.
    base_part: float | None = None
    slot_part: float | None = None
    base_residual: float | None = None
    slot_residual: float | None = None
    # The part of ΔW a merge in the engine's dtype keeps (1 in float32), and the rounding noise it
    # adds beside it, over ‖ΔW‖.
    merge_kept: float | None = None
    merge_noise: float | None = None
    # One ulp of every element of W0 in the engine's dtype, over ‖ΔW‖: how far two correct roundings
    # of the same merge may differ.
    rounding: float | None = None
    # ‖ΔW‖/‖W0‖ of this module.
    delta_ratio: float | None = None


@dataclass
class PhaseResult:
    """Measurements after one sync phase, and the verdict they give."""

    index: int
    name: str
    with_adapter: bool
    verdict: str
    explanation: str
    effective_scale: float
    kl_at_scale: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    greedy_match: float
    layers: list[ModuleResult] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    kl_per_token: list[list[float]] = field(default_factory=list)
    # Mean KL(previous adapter's reference ‖ engine), when a previous checkpoint was given.
    kl_previous: float | None = None
    # Wall seconds per step of the measurement (engine requests, scale fit, per-layer read).
    seconds: dict[str, float] = field(default_factory=dict)
    # The mean KL above which the logits call this phase unhealthy (None when they cannot resolve
    # the LoRA at this precision), and what decided the verdict: "logits", "modules",
    # "logits and modules" or "nothing" (unresolved).
    kl_limit: float | None = None
    decided_by: str = "logits"
    # Mean over modules of the part of ΔW a merged sync in the engine's dtype keeps.
    merge_kept: float | None = None
    # Things worth knowing that do not fail the phase (e.g. a bf16 merge that loses much of ΔW).
    warnings: list[str] = field(default_factory=list)
    # LoRA-targeted modules the per-module read has no figures for, each {"module", "reason"}.
    modules_not_read: list[dict] = field(default_factory=list)
    # What the engine or the run did not allow measuring (e.g. "layers"; "stale_cache" when the
    # logits cannot resolve the LoRA or no prompt reaches the prefix cache), and why.
    not_measured: dict[str, str] = field(default_factory=dict)
    # What the phase measured: "engine" (a sync replayed or probed) or "export" (a merged export on
    # disk, `audit`); it chooses the causes a report names, whatever the phase is called.
    measured: str = "engine"
    # The decode path (what the rollouts see): the engine's log-probs of the tokens it generated,
    # reading the prefix cache as the plan left it, against the reference teacher-forced on them.
    # Mean and max KL(reference ‖ engine) and |log-prob difference| of the generated tokens.
    decode_kl_mean: float | None = None
    decode_kl_max: float | None = None
    decode_logprob_diff_mean: float | None = None
    decode_logprob_diff_max: float | None = None
    decode_positions: int = 0
    # The decode KL of the same requests made without reading the prefix cache (measured only when
    # the decode path disagreed): the A/B that tells stale KV blocks apart.
    decode_kl_no_cache: float | None = None
    # Full KV blocks of the prompts the decode requests can read from the prefix cache (0: prefix
    # caching off, or no prompt longer than a block; then stale KV blocks cannot reach them).
    decode_cache_blocks: int | None = None
    # With an adapter loaded: mean KL(W0 ‖ engine) of requests that do not name it (the base route).
    base_route_kl: float | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def failed(self) -> bool:
        """A measured failure: not ok, and the engine was measured (a probe of a sleeping or stalled
        engine that measured nothing is no failed sync)."""
        return not self.ok and "engine" not in self.not_measured


@dataclass
class Report:
    tool: dict
    environment: dict
    checkpoint: dict
    plan: dict
    thresholds: dict
    phases: list[PhaseResult]
    verdict: str
    exit_code: int
    # Wall seconds of the check's stages (reference load, engine start, plan).
    seconds: dict[str, float] = field(default_factory=dict)
    # Pre-flight findings on the checkpoint (code, severity, message, fix, subjects).
    preflight: list[dict] = field(default_factory=list)
    # The run's logit noise and signal and what follows from them (see noise.Resolution.as_dict).
    resolution: dict = field(default_factory=dict)
    # Why the check stopped before measuring anything (then `phases` is empty), or None.
    stopped: str | None = None
    # The engine's settings ("options", e.g. enable_prefix_caching, block_size), the ones the trainer
    # gave ("given", --engine-option) and whether the prompts reached the prefix cache
    # ("cache_blocks": full KV blocks their requests can read; "cache_exercised").
    engine: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict:
        data = asdict(self)
        ordered = {"schema_version": data.pop("schema_version")}
        ordered.update(data)
        return ordered

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {data.get('schema_version')!r}")
        phases = []
        for phase in data["phases"]:
            phase = dict(phase)
            if "measured" not in phase and data.get("plan", {}).get("name") == "audit":
                phase["measured"] = "export"  # an audit's report saved before the key existed
            phase["layers"] = [ModuleResult(**layer) for layer in phase.get("layers", [])]
            phase["samples"] = [Sample(**sample) for sample in phase.get("samples", [])]
            phases.append(PhaseResult(**phase))
        fields_ = {k: v for k, v in data.items() if k not in ("phases", "schema_version")}
        return cls(phases=phases, **fields_)
