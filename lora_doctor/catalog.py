"""The catalog of verdicts: every name a check or an audit can give, what it means and its usual cause.

One entry per verdict, read by the check's measurer, the audit and every renderer. A check names
what the engine computes; an audit of a merged export (its one phase is `EXPORT_PHASE`) names what
the export holds, with causes of its own; `audit` is None for a verdict an audit never gives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """One verdict: its name, what it means and its usual cause (with the fix), in a check and in an audit."""

    name: str
    check: str
    cause: str | None = None
    audit: str | None = None
    audit_cause: str | None = None


OK = "ok"
DOUBLE_COUNTED = "double_counted"
MISSING = "missing"
STALE = "stale"
SCALED = "scaled"
PARTIAL = "partial"
DIVERGED = "diverged"
UNRESOLVED = "unresolved"
NON_FINITE = "non_finite"
# The decode path's own verdicts (measure/decode_path.py): weights and prompt log-probs agree, the
# generated tokens' log-probs do not.
STALE_CACHE = "stale_cache"
DECODE_DIVERGED = "decode_diverged"
# The route: an adapter is loaded, the rollouts are requested without it.
ADAPTER_NOT_REQUESTED = "adapter_not_requested"

# The run's verdict: pass when every phase is ok.
PASS = "pass"
FAIL = "fail"
HEALTHY = (OK, PASS)

# The phase an audit of a merged export records: its verdicts mean what the export holds.
EXPORT_PHASE = "export"

CATALOG: dict[str, Verdict] = {
    entry.name: entry
    for entry in (
        Verdict(
            OK,
            check="the engine computes the checkpoint's policy W0 + ΔW",
            audit="the export holds the checkpoint's policy W0 + ΔW (as far as its dtype can hold ΔW)",
        ),
        Verdict(
            DOUBLE_COUNTED,
            check="the engine applies the LoRA twice (W0 + 2ΔW): merged weights were loaded as the base "
            "and the adapter was added on top (ms-swift #8233)",
            cause="merged weights (W0 + ΔW) were pushed as the engine's base and the adapter was then added on top; "
            "fix: sync the unmerged base (or never add the adapter after a merged sync) — ms-swift >= 4.0.2 (PR #8275)",
            audit="the export holds the LoRA twice (W0 + 2ΔW): the merge was applied to weights that were already merged",
            audit_cause="the LoRA was merged twice: a merge run on an already merged model, or merged weights saved as the "
            "base and merged again; fix: merge once, from the unmerged base",
        ),
        Verdict(
            MISSING,
            check="the engine runs the base model without the LoRA (W0): the adapter was dropped or never loaded",
            cause="the engine lost the LoRA: a sleep-mode wake-up or reload restored the base from disk, or the adapter was "
            "never passed with the generate call; fix: re-sync after every reload and pass the LoRA request",
            audit="the export holds the base without the LoRA (W0): the merge wrote the base unchanged",
            audit_cause="the export holds the base weights: the merge was not applied or its result was not saved (verl #4553, "
            "#7285); fix: check that the merge step writes the merged weights",
        ),
        Verdict(
            STALE,
            check="the engine still holds an older adapter",
            cause="a new adapter was synced under an id the engine had already cached, without load_inplace=True; "
            "fix: use a fresh lora_int_id per sync or load_inplace=True",
        ),
        Verdict(
            SCALED,
            check="the engine applies the LoRA at the wrong scale (W0 + c·ΔW)",
            cause="trainer and engine compute the LoRA scaling differently (rsLoRA alpha/sqrt(r) vs alpha/r, alpha_pattern / "
            "rank_pattern); fix: make both read the same adapter_config",
            audit="the export holds the LoRA at the wrong scale (W0 + c·ΔW): the merge computed the LoRA scaling differently "
            "from PEFT",
            audit_cause="the merge used another scaling than PEFT's (alpha/r for an rsLoRA adapter as in verl PR #4704, or "
            "rank/alpha patterns ignored); fix: merge with PEFT's merge_and_unload, or the adapter_config's own scaling",
        ),
        Verdict(
            PARTIAL,
            check="only some LoRA modules are wrong in the engine (a sync that skipped or misnamed modules)",
            cause="some modules were not synced or were synced under a wrong name (prefix, packed q/k/v or gate/up slices); "
            "fix: compare the names your sync sends with the engine's module names",
            audit="only some LoRA modules are merged right in the export (a merge that skipped or misnamed modules)",
            audit_cause="some modules were not merged or were merged into a wrongly named weight; fix: compare the module names "
            "the merge writes with the adapter's",
        ),
        Verdict(
            DIVERGED,
            check="the engine's outputs are not explained by the checkpoint at any LoRA scale",
            cause="weights differ from W0 + ΔW in a way no LoRA scale explains: a different base, precision drift from "
            "repeated merge/unmerge in bf16, or corrupted tensors; fix: sync from a float32 master copy, check the base",
            audit="the export's weights are W0 + c·ΔW at no scale c: another base or adapter, or corrupted tensors",
            audit_cause="weights differ from W0 + ΔW in a way no LoRA scale explains, or a tensor the LoRA does not touch "
            "changed: another base, a corrupted or re-quantized export; fix: merge again from the exact base",
        ),
        Verdict(
            UNRESOLVED,
            check="at this precision the LoRA moves the logits less than the run's own noise, and no per-module "
            "figure decides: lora-doctor cannot tell a healthy sync from a broken one here",
            cause="the LoRA is small next to the weights and the check runs in half precision without the per-module "
            "read; fix: keep the per-module read (drop --no-module-read; build a probed engine with "
            "worker_extension_cls='lora_doctor.engine.worker.LoraDoctorWorker'), or check in float32",
        ),
        Verdict(
            NON_FINITE,
            check="NaN or Inf values: in what the engine holds or computes, or in the policy it is compared with",
            cause="the policy diverged (a NaN/Inf loss or gradient, an overflow in half precision) and its weights were "
            "synced, or the engine overflowed; fix: never sync a non-finite policy (check the adapter for NaN/Inf before "
            "each sync), lower the learning rate or the loss scale, resume from the last finite checkpoint",
            audit="NaN or Inf values in the adapter's ΔW or in the export's weights: no figure can be measured there",
            audit_cause="the adapter or the export holds NaN/Inf values: a policy whose training diverged was merged, or the "
            "merge overflowed the export's dtype; fix: merge from the last finite checkpoint",
        ),
        Verdict(
            STALE_CACHE,
            check="the weights and the prompt log-probs are right, but the rollouts read KV blocks of an earlier policy "
            "from the prefix cache: generated the same requests without reading the cache, the engine agrees",
            cause="the prefix cache was not reset after a weight or adapter sync, or an adapter was reloaded in place "
            "under the same name and folder with prefix caching on (vLLM #42125); fix: call reset_prefix_cache() after "
            "every sync (as TRL and ms-swift do), or publish each adapter under a new name (TRL's async GRPO)",
        ),
        Verdict(
            DECODE_DIVERGED,
            check="the weights and the prompt log-probs are right, but the generated tokens' log-probs are not, "
            "with or without the prefix cache: the engine's decode path computes another policy",
            cause="the engine's generation path differs from its prompt path (a sampler or logits-processor LoRA "
            "path, a kernel of the decode step); fix: compare with enable_prefix_caching=False and report it to vLLM with "
            "the engine options listed",
        ),
        Verdict(
            ADAPTER_NOT_REQUESTED,
            check="an adapter is loaded in the engine but the rollouts are requested without it: the base "
            "model generates (W0)",
            cause="the generate calls do not pass the LoRA request (ms-swift #9855, miles #2075); fix: pass "
            "lora_request= to every rollout's generate call",
        ),
    )
}

# Every phase verdict, in the order reports list them.
PHASE_VERDICTS = tuple(CATALOG)
# The verdicts an audit of a merged export can give.
AUDIT_VERDICTS = tuple(name for name, entry in CATALOG.items() if entry.audit is not None)


def explanation(verdict: str, measured: str | None = None) -> str:
    """What `verdict` means: in an audit's export phase (`measured` == EXPORT_PHASE) or in a check."""
    entry = CATALOG[verdict]
    return entry.audit if measured == EXPORT_PHASE else entry.check


def cause_for(phase) -> str | None:
    """The usual cause of an unhealthy phase's verdict and its fix (an export's own, for an audit)."""
    entry = CATALOG.get(phase.verdict)
    if entry is None:
        return None
    return entry.audit_cause if phase.measured == EXPORT_PHASE else entry.cause
