"""Evaluation: evaluators (one per test-metric family: evaluators.py) run as a stage
with progress, timings, notes for what does not apply and their estimator settings
(stage.py); `vaelab evaluate` runs them later on finished runs (later.py); plan.py
describes an evaluation without torch, for `--dry-run`. Import the submodules: this
package imports nothing, so the plan stays fast."""
