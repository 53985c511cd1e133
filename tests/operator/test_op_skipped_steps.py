"""Skipped optimizer steps as the operator sees them: the per-model counters of a scrape add up to
status.progress.skippedSteps (of every stage), and the trainer's exit code for repeated non-finite
gradients fails a job at once with reason NonFiniteGradients."""

from __future__ import annotations

import json

from rlhf_operator import progress
from rlhf_operator.policies.restart import EXIT_REASONS
from rlhf_trainer import contract

SCRAPE = """# TYPE rlhf_trainer_skipped_steps counter
rlhf_trainer_skipped_steps_total{namespace="a",job="p",stage="ppo",model="actor"} 3.0
rlhf_trainer_skipped_steps_total{namespace="a",job="p",stage="ppo",model="critic"} 2.0
rlhf_trainer_step{namespace="a",job="p",stage="ppo"} 9.0
"""


def test_the_models_skipped_steps_add_up_in_progress():
    assert progress.parse(SCRAPE) == {"skippedSteps": 5, "step": 9}
    assert progress.from_termination_message(json.dumps({contract.M_SKIPPED_STEPS: 5.0})) == {"skippedSteps": 5}
    assert all("skippedSteps" in contract.stage_progress_keys(s) for s in ("sft", "reward", "ppo"))
    assert contract.SKIPPED_STEPS_LABELS == (*contract.LABELS, "model")


def test_repeated_nonfinite_gradients_are_a_permanent_failure():
    assert contract.EXIT_NONFINITE in contract.PERMANENT_EXIT_CODES
    assert EXIT_REASONS[contract.EXIT_NONFINITE] == "NonFiniteGradients"
    assert len(set(EXIT_REASONS)) == len(EXIT_REASONS) and contract.EXIT_NONFINITE not in (
        contract.EXIT_REWARD_ENDPOINT_ERROR, contract.EXIT_REWARD_ENDPOINT_REFUSED, contract.EXIT_PREEMPTED)
