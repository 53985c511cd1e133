"""DPOJob through the real operator with the real trainer, at tiny size on the CPU.

* offline: a fresh one-layer GPT-2 on preference pairs whose chosen and rejected answers always differ the same
  way. At the first step the policy is its own reference (no margin, loss log 2); the job ends Succeeded having
  learned to rank every chosen answer first, on the held-out pairs too, and its status says so;
* online: two rounds scored by the rule `count:<text>`; each round's pairs on the job's claim are a best and a
  worst sample whose rewards are the rule's counts, the status and the log show the round, and the exported
  model's metadata lists both rounds.
"""

from __future__ import annotations

import json

import pytest
from e2e_helpers import (
    assert_operator_healthy,
    configmap_dataset,
    create_configmap,
    jsonl,
    pair_rows,
    pod_log,
    prompt_rows,
    tiny_model,
    wait_phase,
)
from rlhf_operator import names
from rlhf_trainer import config as tc
from rlhf_trainer import contract as c

NEEDLE = "e"  # count:e - a character most word pieces of the MiniLM vocabulary carry now and then


def dpo_spec(dataset: dict, steps: int, **extra) -> dict:
    spec = {
        "policy": tiny_model(),
        "dataset": dataset,
        "training": {"maxSteps": steps, "batchSize": 4, "maxLength": 32, "learningRate": 0.002, "threads": 1,
                     "logEvery": 1},
        "dpo": {"beta": 0.5},
        "deepspeed": {"enabled": False},
        "resources": {"gpus": 0},
        "checkpoint": {"everySteps": 0, "size": "1Gi"},
    }
    spec.update(extra)
    return spec


def metric_rows(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{") and c.M_DPO_LOSS in line]


@pytest.mark.slow
def test_offline_dpo_learns_the_preference_and_reports_it(real_operator, jobs, cluster):
    create_configmap(jobs, "dpo-data", {"pairs.jsonl": jsonl(pair_rows(32))})
    jobs.create("DPOJob", "offline", dpo_spec(configmap_dataset("dpo-data", "pairs.jsonl", evalFraction=0.25), 12))
    st = wait_phase(jobs, "DPOJob", "offline", "Succeeded", 300)
    rows = metric_rows(pod_log(cluster, jobs.ns, st["trainerPod"]))
    assert [r["step"] for r in rows] == list(range(1, 13))
    # At the first step the policy is its own reference: no margin, loss log 2 (sigmoid).
    assert abs(rows[0][c.M_DPO_MARGIN]) < 1e-3 and rows[0][c.M_DPO_LOSS] == pytest.approx(0.6931, abs=1e-3), rows[0]
    assert rows[-1][c.M_DPO_REWARD_ACCURACY] == 1.0 and rows[-1][c.M_DPO_MARGIN] > 0.5, rows[-1]
    assert rows[-1][c.M_DPO_ROUND] == 0.0 and rows[-1][c.M_DPO_ROUNDS] == 0.0
    p = st["progress"]
    assert p["summary"] == "12/12" and p["rewardAccuracy"] == 1.0 and p["rounds"] == 0 and p["margin"] > 0.5
    meta = json.loads((jobs.claim_dir(names.pvc_name("DPOJob", "offline")) / "final" / tc.METADATA_FILE).read_text())
    assert meta["stage"] == "dpo" and meta["metrics"][c.M_DPO_EVAL_REWARD_ACCURACY] == 1.0  # the held-out pairs too
    assert_operator_healthy(real_operator)


@pytest.mark.slow
def test_online_dpo_rounds_pair_the_best_and_worst_sample_and_show_the_round(real_operator, jobs, cluster):
    create_configmap(jobs, "dpo-prompts", {"prompts.jsonl": jsonl(prompt_rows(16))})
    online = {"rounds": 2, "promptsPerRound": 8, "samplesPerPrompt": 4, "rewardFn": f"count:{NEEDLE}",
              "maxPromptLength": 16, "maxNewTokens": 12, "temperature": 1.0}
    spec = dpo_spec(configmap_dataset("dpo-prompts", "prompts.jsonl", format="prompt", evalFraction=0.0), 4,
                    online=online)
    jobs.create("DPOJob", "online", spec)
    st = wait_phase(jobs, "DPOJob", "online", "Succeeded", 300)
    assert st["progress"]["summary"] == "round 2/2, step 4/4", st["progress"]
    assert (st["progress"]["round"], st["progress"]["rounds"]) == (2, 2)

    log = pod_log(cluster, jobs.ns, st["trainerPod"])
    rows = metric_rows(log)
    assert [(r["step"], r[c.M_DPO_ROUND]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)], log[-3000:]
    claim = jobs.claim_dir(names.pvc_name("DPOJob", "online"))
    for rnd in (1, 2):
        pairs = [json.loads(line) for line in (claim / "rounds" / f"{rnd:02d}" / "pairs.jsonl").read_text().splitlines()]
        assert 1 <= len(pairs) <= 8
        for p in pairs:  # the rule's scores, best above worst (no length penalty)
            assert p["chosen_reward"] == p["chosen"].count(NEEDLE) > p["rejected_reward"] == p["rejected"].count(NEEDLE)
        best = [r[c.M_DPO_BEST_REWARD_MEAN] for r in rows if r[c.M_DPO_ROUND] == rnd]
        worst = [r[c.M_DPO_WORST_REWARD_MEAN] for r in rows if r[c.M_DPO_ROUND] == rnd]
        assert len(set(best)) == 1 and len(set(worst)) == 1 and best[0] > worst[0]
    meta = json.loads((claim / "final" / tc.METADATA_FILE).read_text())
    assert meta["stage"] == "dpo" and meta["rounds"] == 2 and sorted(meta["round_summaries"]) == ["1", "2"]
    assert_operator_healthy(real_operator)
