"""The library where users meet the bug: a probe on their own engine, a trainer callback, a gate."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch
from conftest import BASE, CHECKPOINT, PROMPTS, ROOT, subprocess_env, sync_weights
from processes import run_process

from lora_doctor import probe
from lora_doctor.callback import LoraDoctorCallback

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

SCALE_TOLERANCE = 0.05
GATE_SCRIPT = ROOT / "examples" / "gate_before_resume.py"


@pytest.fixture
def llm(user_llm):
    """The user's own engine, with lora-doctor's worker extension for per-module figures."""
    return user_llm


def policy(trainable: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(CHECKPOINT), is_trainable=trainable)


def base_weights():
    from safetensors.torch import load_file

    return load_file(str(BASE / "model.safetensors"))


def merged_weights(model):
    """What a trainer's merge pushes: W0 + ΔW for every LoRA module, W0 elsewhere."""
    from peft.tuners.lora import LoraLayer

    weights = base_weights()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            weights[key] = weights[key] + module.get_delta_weight("default").detach()
    return list(weights.items())


def lora_request(path, int_id):
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"policy-{int_id}", int_id, str(path))


def test_probe_catches_a_double_count_synced_by_hand(llm):
    model = policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sync_weights(llm, merged_weights(model))
    result = probe(llm, model, lora_request=lora_request(CHECKPOINT, 11), prompts=PROMPTS)
    assert result.verdict == "double_counted"
    assert result.effective_scale == pytest.approx(2.0, abs=SCALE_TOLERANCE)
    assert len(result.layers) == 14 and all(layer.verdict == "double_counted" for layer in result.layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the policy is untouched


def test_probe_is_ok_after_a_correct_sync(llm):
    model = policy()
    sync_weights(llm, list(base_weights().items()))
    result = probe(llm, model, lora_request=lora_request(CHECKPOINT, 12), prompts=PROMPTS)
    assert result.verdict == "ok", result.explanation
    assert result.effective_scale == pytest.approx(1.0, abs=SCALE_TOLERANCE)
    assert result.kl_mean < 1e-4
    # Everything but the prefix cache, which these short prompts (under one 128-token KV block) never read.
    assert set(result.not_measured) == {"stale_cache"} and "KV block" in result.not_measured["stale_cache"]


def test_probe_takes_the_bare_llm_engine_a_trainer_holds(llm):
    """ms-swift's colocated wrapper holds a `vllm.LLMEngine`, not a `vllm.LLM`: same figures through it."""
    model = policy()
    sync_weights(llm, merged_weights(model))
    result = probe(llm.llm_engine, model, lora_request=None, prompts=PROMPTS)
    assert result.verdict == "ok", result.explanation
    assert result.effective_scale == pytest.approx(1.0, abs=SCALE_TOLERANCE)
    assert len(result.layers) == 14 and all(layer.verdict == "ok" for layer in result.layers)


def test_probe_says_what_it_did_not_measure(llm):
    model = policy()
    sync_weights(llm, merged_weights(model))
    result = probe(llm, model, prompts=PROMPTS, module_read=False)
    assert result.verdict == "ok", result.explanation
    assert result.layers == [] and "module_read=False" in result.not_measured["layers"]


def test_callback_logs_the_figures_and_stops_a_wrongly_synced_run(llm, tmp_path):
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    texts = [f"Question: what is {a} plus {b}?\nAnswer: <think>{a} plus {b} is {a + b}</think><answer>{a + b}</answer>" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)] * 4]
    dataset = [dict(input_ids=ids, labels=ids) for ids in (tokenizer(t).input_ids for t in texts)]

    class WrongSync(TrainerCallback):
        """The ms-swift #8233 sync: merged weights pushed as the base, then the adapter on top."""

        request = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            folder = tmp_path / f"step-{state.global_step + 1}"
            model.save_pretrained(str(folder))
            sync_weights(llm, merged_weights(model))
            WrongSync.request = lora_request(folder, 100 + state.global_step)

    model = policy(trainable=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    class Logger(TrainerCallback):
        """Stands for W&B / TensorBoard: a logger sees what reaches the trainer's `on_log`."""

        seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            Logger.seen.append(dict(logs or {}))

    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[WrongSync(), Logger()])
    doctor = LoraDoctorCallback(trainer, llm, lora_request=lambda: WrongSync.request, prompts=PROMPTS, every_n_steps=1)
    trainer.add_callback(doctor)
    trainer.train()
    assert trainer.state.global_step == 1  # stopped after the first failed probe
    logged = [entry for entry in trainer.state.log_history if "lora_doctor/kl_mean" in entry]
    assert len(logged) == 1
    assert logged[0]["lora_doctor/effective_scale"] == pytest.approx(2.0, abs=SCALE_TOLERANCE)
    assert logged[0]["lora_doctor/kl_mean"] > 1e-2
    assert [entry["lora_doctor/ok"] for entry in Logger.seen if "lora_doctor/ok" in entry] == [0.0]
    assert doctor.results[0].verdict == "double_counted"


def test_gate_at_the_top_of_a_training_script_refuses_to_resume():
    """The recipe as a user runs it: a process of its own, whose exit code a pipeline reads."""
    done = run_process([sys.executable, str(GATE_SCRIPT), str(CHECKPOINT), "swift-colocate-lora"], env=subprocess_env(), timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "refusing to resume" in done.stderr


def test_gate_at_the_top_of_a_training_script_lets_a_healthy_path_resume(capsys):
    """The same script in this process (a training script's own), on the fixed path."""
    saved = sys.argv
    sys.argv = [str(GATE_SCRIPT), str(CHECKPOINT), "swift-fixed"]
    try:
        runpy.run_path(str(GATE_SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved
    assert f"resuming from {CHECKPOINT}" in capsys.readouterr().out


def test_probe_on_a_policy_whose_loss_diverged_is_non_finite(llm):
    """One lora_B of the trainer's policy went NaN (the engine still holds the last finite adapter). On
    CPU, torch's attention turns the NaN queries into finite but meaningless log-probs, so the logits
    alone would fit some α; the per-module read finds ΔW NaN. The probe names it (`non_finite`, the
    module listed) rather than crashing on round(NaN) or naming a scale."""
    model = policy()
    module = "model.layers.1.self_attn.q_proj"
    model.get_submodule(f"base_model.model.{module}").lora_B["default"].weight.data.fill_(float("nan"))
    sync_weights(llm, list(base_weights().items()))
    result = probe(llm, model, lora_request=lora_request(CHECKPOINT, 13), prompts=PROMPTS)
    assert result.verdict == "non_finite", result.explanation
    assert result.effective_scale is None
    assert len(result.layers) == 14
    assert [layer.module for layer in result.layers if layer.verdict == "non_finite"] == [module]


def fresh_policy():
    """A policy before its first optimizer step: PEFT's LoRA as created (B = 0), on the fixture's targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), config)


def test_probe_of_a_fresh_policy_says_there_is_nothing_to_tell_apart(llm):
    # B = 0: merged or not, once or twice, every sync serves W0. Not "unresolved, problem found": the
    # engine computes the policy, and the result says the LoRA is not measurable before the first step.
    model = fresh_policy()
    sync_weights(llm, merged_weights(model))
    result = probe(llm, model, prompts=PROMPTS)
    assert result.verdict == "ok" and result.ok, result.explanation
    assert "B = 0" in result.explanation
    assert result.effective_scale is None
    assert result.kl_mean <= result.kl_limit


def test_probe_of_a_fresh_policy_on_an_engine_holding_another_policy_is_not_ok(llm):
    # The engine still serves the checkpoint's trained LoRA, merged: not the fresh policy's W0.
    sync_weights(llm, merged_weights(policy()))
    result = probe(llm, fresh_policy(), prompts=PROMPTS)
    assert result.verdict == "diverged" and not result.ok, result.explanation
    assert "B = 0" in result.explanation and result.kl_mean > result.kl_limit


@pytest.mark.parametrize(("rollouts_name_the_adapter", "verdict"), [(True, "ok"), (False, "adapter_not_requested")])
def test_the_callback_probes_the_route_the_trainers_rollouts_took(llm, tmp_path, rollouts_name_the_adapter, verdict):
    # The trainer syncs its adapter correctly; its rollouts then either name it or not (ms-swift #9855).
    # The integration's own guess (`lora_request=`) is always the right request: only the recorded
    # route can tell the second run apart.
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from vllm import SamplingParams

    from lora_doctor.live import RouteRecorder

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    dataset = [dict(input_ids=ids, labels=ids) for ids in (tokenizer(f"{a} plus {a} is {2 * a}").input_ids for a in range(4))]
    sync_weights(llm, list(base_weights().items()))

    class SyncThenRollouts(TrainerCallback):
        request = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            folder = tmp_path / f"step-{state.global_step + 1}"
            model.save_pretrained(str(folder))
            SyncThenRollouts.request = lora_request(folder, 200 + state.global_step + (0 if rollouts_name_the_adapter else 50))
            llm.llm_engine.add_lora(SyncThenRollouts.request)
            named = SyncThenRollouts.request if rollouts_name_the_adapter else None
            llm.generate(["1 plus 1 is"], SamplingParams(max_tokens=4, temperature=0.0), lora_request=named, use_tqdm=False)

    model = policy(trainable=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=1, learning_rate=1e-6,
        report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    doctor = LoraDoctorCallback(
        trainer, llm, lora_request=lambda: SyncThenRollouts.request, prompts=PROMPTS, route=lambda: RouteRecorder(llm, "generate")
    )
    trainer.add_callback(doctor)  # before the rollouts' callback: the recorder is installed first
    trainer.add_callback(SyncThenRollouts())
    trainer.train()
    assert "generate" not in vars(llm)  # the run's end put the engine's own method back
    assert doctor.routes == ["the trainer's rollouts"]
    (result,) = doctor.results
    assert result.verdict == verdict, result.explanation
