"""The progress contract (rlhf_trainer.contract.PROGRESS) is the one source of the progress keys: the metrics
scrape and the termination message parse through one parser, and the CRD schema and printer columns follow it."""

from __future__ import annotations

import json

import pytest
from rlhf_operator import crd_schema, progress
from rlhf_trainer import contract


@pytest.mark.parametrize("field", contract.PROGRESS, ids=lambda f: f.key)
def test_scrape_and_termination_message_read_each_field_alike(field):
    scraped = progress.parse(f"{field.metric}{{stage=\"x\"}} 7.0\n")
    final = progress.from_termination_message(json.dumps({field.metric: 7.0}))
    assert scraped == final == {field.key: field.type(7)} and type(scraped[field.key]) is field.type
    schema = crd_schema.status_schema("SFTJob")["properties"]["progress"]["properties"][field.key]
    assert schema["type"] == ("integer" if field.type is int else "number") and schema["description"] == field.help


def test_non_finite_and_non_numbers_are_dropped_by_both_readers():
    assert progress.parse("rlhf_trainer_loss NaN\nrlhf_trainer_step +Inf\n") == {}
    assert progress.from_termination_message('{"rlhf_trainer_loss": NaN, "rlhf_trainer_step": true, '
                                             '"rlhf_ppo_kl": "x"}') == {}


def test_each_stage_reports_its_keys_and_shows_one_column():
    assert {"step", "totalSteps", "loss", "checkpointStep", "resumedFromStep"} <= contract.stage_progress_keys("sft")
    assert not {"accuracy", "reward", "kl"} & contract.stage_progress_keys("sft")
    assert {"accuracy"} <= contract.stage_progress_keys("reward") and "reward" not in contract.stage_progress_keys("reward")
    assert {"reward", "kl"} <= contract.stage_progress_keys("ppo")
    assert progress.for_stage({"step": 1, "reward": 2.0, "accuracy": 0.5}, "ppo") == {"step": 1, "reward": 2.0}
    for kind, k in crd_schema.KINDS.items():
        field = contract.printer_column(k.stage)
        assert field.key in contract.stage_progress_keys(k.stage)
        column = next(c for c in crd_schema.printer_columns(k) if c["name"] == field.column)
        assert column["jsonPath"] == f".status.progress.{field.key}" and column["type"] == "number", kind
    assert [contract.printer_column(s).column for s in ("sft", "reward", "ppo")] == ["Loss", "Accuracy", "Reward"]


def test_a_summed_field_adds_its_series_and_the_others_take_the_first():
    summed = [f for f in contract.PROGRESS if f.summed]
    assert [f.key for f in summed] == ["skippedSteps"]
    text = "".join(f'{f.metric}{{model="a"}} 2.0\n{f.metric}{{model="b"}} 3.0\n' for f in contract.PROGRESS)
    parsed = progress.parse(text)
    assert parsed["skippedSteps"] == 5 and parsed["step"] == 2 and parsed["loss"] == 2.0
