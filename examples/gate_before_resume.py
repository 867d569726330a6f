"""Top of a training script: refuse to resume when the sync path would corrupt the policy.

    python examples/gate_before_resume.py output/checkpoint-500 swift-colocate-lora
"""

import os
import sys

# The script's own choice, before torch loads: OpenMP's idle threads wait passively instead of
# spinning beside the engine on CPU (importing lora_doctor sets nothing; see the README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lora_doctor  # noqa: E402

checkpoint, plan = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "swift-fixed"
try:
    lora_doctor.gate(checkpoint, plan=plan)
except lora_doctor.LoraDoctorError as error:  # ProblemDetected (1), BadInput (2), EnvironmentProblem (3)
    print(f"refusing to resume: {error}", file=sys.stderr)
    sys.exit(error.exit_code)

print(f"resuming from {checkpoint}")
