"""The watch's limits, each with the reason for its number (one home; the JSON lines carry the figures).

None is a log-prob threshold from another machine: the gap's floor and the per-token noise are learned
on the run (`calibration.Floor`); these say how far from them a step may go.
"""

# How many standard errors of α̂ make its band: a step is flagged when |α̂ − 1| exceeds the band.
# Three standard errors keep a healthy run's false flags near 0.3 % of its steps under a normal law
# (an escalation costs one full probe), and still tell 1 from 0 or 2 once the band is under 0.5.
SCALE_BAND_SIGMAS = 3.0

# α̂ is "not measurable yet" while it rests on fewer distinct tokens (distinct (t − b, e − b) pairs)
# than this: its band is SCALE_BAND_SIGMAS standard errors under a normal law, and a residual estimated
# from a handful of points is no estimate (with one degree of freedom a 3σ band covers ~80 %, not
# 99.7 %; with nine, ~98.5 %). ms-swift's first step after a resume fitted two identical one-token
# completions: a residual of 1e-15, and α̂ = 1 + 3e-8 "left 1".
MIN_FIT_TOKENS = 10

# α̂ is "not measurable yet" while its band from the run's noise alone is wider than this: a band of
# 0.5 around 1 still separates a missing LoRA (0) and a double count (2) from a right one.
MEASURABLE_BAND = 0.5

# The gap (mean |e − t|) may grow with the run (a healthy bf16 run's doubled over six steps of the
# fixture run at lr 1e-3: 0.0056 → 0.0107): a step is flagged when it exceeds this many times the
# largest gap of the run's healthy steps so far. The breaks of the fixture run moved it 6× (a push
# skipped: 0.035 over 0.0056) to 700× (W0 + 2ΔW: 3.8).
GAP_JUMP = 4.0

# On a flagged step, the share of the engine's difference from the policy (‖e − t‖²) that the fitted
# scale explains: below this, whatever the engine computes is not the LoRA at some scale (a stale
# engine, a stale cache, a wrong route). Measured on the fixture runs: a double count of the 1e-2
# adapter 0.69–0.90; a push skipped 0.00–0.06, a stale prefix cache 0.00–0.01.
SCALE_EXPLAINS = 0.5

# Input checks. A log-prob above this is no log-prob (float rounding of a near-certain token stays
# under 1e-6 in float32 and bf16 log-softmax); probabilities or logits passed by mistake are far above.
POSITIVE_LOGPROB = 1e-3
# Engine log-probs exactly 0.0 on at least this share of the completion tokens: zero-filled (a
# framework that pads the log-probs it did not get), not a certain engine (an exact 0.0 needs a logit
# margin above ~17 nats, which a handful of tokens may have, not half of a sampled completion).
ZERO_FILLED_SHARE = 0.5
