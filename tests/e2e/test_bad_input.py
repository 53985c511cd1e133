"""Bad input, table-driven: each bad spec or file is either rejected at apply time with an API error
naming the field, or ends as a job condition whose message names the problem. File problems run the
real trainer, so its real error path (exit code + termination message -> condition) is exercised.
Meanwhile a healthy job in the same namespace keeps running and succeeds, and the operator never
crashes."""

from __future__ import annotations

import base64
import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from e2e_helpers import (
    MINILM,
    assert_operator_healthy,
    conditions,
    configmap_dataset,
    create_configmap,
    jsonl,
    pair_rows,
    prompt_rows,
    real_spec,
    sft_rows,
    wait_for,
    wait_phase,
)
from kubernetes.client.rest import ApiException
from rlhf_operator import names

REJECTED = "rejected"  # by the API server at apply time (422)
UNSCHEDULABLE = "Unschedulable"  # PodScheduled=False with the scheduler's reason


@dataclass(frozen=True)
class Bad:
    name: str
    kind: str
    change: dict[str, Any]  # dotted spec path -> value (DELETE removes the field)
    outcome: str  # REJECTED, UNSCHEDULABLE, or the reason of the Failed condition
    says: tuple[str, ...]  # in the API error body, or in the condition message
    job_name: str = ""  # default: the case name
    meta: dict[str, Any] = field(default_factory=dict)


DELETE = object()
LONG_NAME = "n" * 64

BAD: list[Bad] = [
    # --- the schema: wrong types, missing fields, out-of-range values, unknown enums ----------------
    Bad("max-steps-string", "SFTJob", {"training.maxSteps": "ten"}, REJECTED, ("spec.training.maxSteps",)),
    Bad("lr-string", "SFTJob", {"training.learningRate": "fast"}, REJECTED, ("spec.training.learningRate",)),
    Bad("suspend-string", "SFTJob", {"suspend": "yes"}, REJECTED, ("spec.suspend",)),
    Bad("env-not-a-list", "SFTJob", {"env": "DEBUG=1"}, REJECTED, ("spec.env",)),
    Bad("no-dataset", "SFTJob", {"dataset": DELETE}, REJECTED, ("spec.dataset", "Required")),
    Bad("ppo-no-actor", "PPOJob", {"actor": DELETE}, REJECTED, ("spec.actor", "Required")),
    Bad("fromjob-no-name", "PPOJob", {"actor": {"fromJob": {"kind": "SFTJob"}}}, REJECTED, ("spec.actor.fromJob.name",)),
    Bad("configmap-no-key", "SFTJob", {"dataset": {"configMap": {"name": "data"}}}, REJECTED, ("spec.dataset.configMap.key",)),
    Bad("negative-gpus", "SFTJob", {"resources.gpus": -1}, REJECTED, ("spec.resources.gpus",)),
    Bad("zero-batch", "SFTJob", {"training.batchSize": 0}, REJECTED, ("spec.training.batchSize",)),
    Bad("short-max-length", "SFTJob", {"training.maxLength": 4}, REJECTED, ("spec.training.maxLength",)),
    Bad("zero-deadline", "SFTJob", {"activeDeadlineSeconds": 0}, REJECTED, ("spec.activeDeadlineSeconds",)),
    Bad("eval-fraction-1.5", "SFTJob", {"dataset.evalFraction": 1.5}, REJECTED, ("spec.dataset.evalFraction",)),
    Bad("gamma-1.5", "PPOJob", {"ppo.gamma": 1.5}, REJECTED, ("spec.ppo.gamma",)),
    Bad("top-p-0", "PPOJob", {"ppo.topP": 0}, REJECTED, ("spec.ppo.topP",)),
    Bad("zero-stage-4", "SFTJob", {"deepspeed.zeroStage": 4}, REJECTED, ("spec.deepspeed.zeroStage",)),
    Bad("lr-schedule-enum", "SFTJob", {"training.lrSchedule": "cosine2"}, REJECTED, ("spec.training.lrSchedule",)),
    Bad("dataset-format-enum", "SFTJob", {"dataset.format": "csv"}, REJECTED, ("spec.dataset.format",)),
    Bad("reward-head-enum", "RewardModelJob", {"reward.head": "mlp"}, REJECTED, ("spec.reward.head",)),
    Bad("retain-policy-enum", "SFTJob", {"checkpoint.retainPolicy": "Keep"}, REJECTED, ("spec.checkpoint.retainPolicy",)),
    Bad("fromjob-kind-enum", "RewardModelJob", {"model": {"fromJob": {"name": "x", "kind": "Job"}}}, REJECTED,
        ("spec.model.fromJob.kind",)),
    Bad("memory-quantity", "SFTJob", {"resources.memory": "lots"}, REJECTED, ("spec.resources.memory",)),
    Bad("max-steps-int64", "SFTJob", {"training.maxSteps": 2**63 - 1}, REJECTED,
        ("spec.training.maxSteps", "less than or equal to 10000000")),
    # --- paths that would leave their volume (the schema's patterns; jobspec and builders refuse them too) ----
    Bad("claim-path-traversal", "SFTJob", {"model": {"claim": "inputs", "path": "../../../etc/passwd"}}, REJECTED,
        ("spec.model.path",)),
    Bad("tokenizer-traversal", "SFTJob", {"model.claim": "inputs", "model.tokenizerPath": "tok/../../x"}, REJECTED,
        ("spec.model.tokenizerPath",)),
    Bad("configmap-key-traversal", "SFTJob", {"dataset.configMap.key": "../../etc/passwd"}, REJECTED,
        ("spec.dataset.configMap.key",)),
    Bad("dataset-claim-traversal", "SFTJob", {"dataset": {"claim": "inputs", "path": "a/../../b"}}, REJECTED, ("spec.dataset.path",)),
    # --- rules beyond the schema (the webhook's rules; without it an InvalidSpec condition) ------------
    Bad("fromjob-wrong-kind", "PPOJob", {"rewardModel": {"fromJob": {"name": "policy", "kind": "SFTJob"}}}, "InvalidSpec",
        ("spec.rewardModel.fromJob.kind", "SFTJob cannot be used as rewardModel")),
    Bad("depends-on-itself", "SFTJob", {"model": {"fromJob": {"name": "depends-on-itself"}}}, "InvalidSpec",
        ("spec.model.fromJob.name", "cannot depend on itself")),
    # (cross-field rules the CRDs also carry as CEL rules: refused at apply time, naming the field)
    Bad("no-model-source", "SFTJob", {"model": {}}, REJECTED, ("spec.model: set one of path",)),
    Bad("two-model-sources", "SFTJob", {"model.hubId": "gpt2", "model.path": "/models/x"}, REJECTED,
        ("spec.model: set only one of",)),
    Bad("init-without-tokenizer", "SFTJob", {"model.tokenizerPath": DELETE}, REJECTED, ("spec.model.tokenizerPath",)),
    Bad("claim-and-configmap", "SFTJob", {"dataset.claim": "inputs"}, REJECTED,
        ("spec.dataset: claim and configMap cannot be combined",)),
    Bad("three-gpus", "SFTJob", {"resources.gpus": 3}, "InvalidSpec", ("spec.resources.gpus: 3 GPUs per pod cannot be used",)),
    Bad("bf16-and-fp16", "SFTJob", {"deepspeed": {"bf16": True, "fp16": True}}, REJECTED,
        ("spec.deepspeed: bf16 and fp16 are both true",)),
    Bad("offload-params-zero-2", "SFTJob", {"deepspeed": {"zeroStage": 2, "offloadParams": True}}, REJECTED,
        ("spec.deepspeed.offloadParams", "zeroStage 3")),
    Bad("minibatch-over-rollout", "PPOJob", {"ppo.minibatchSize": 8}, REJECTED,
        ("spec.ppo.minibatchSize: is larger than ppo.rolloutBatchSize",)),
    Bad("unknown-reward-fn", "PPOJob", {"ppo.rewardFn": "bogus"}, "InvalidSpec", ("spec.ppo.rewardFn", "'bogus' is not a known rule")),
    Bad("reserved-env", "SFTJob", {"env": [{"name": "RLHF_CONFIG", "value": "/tmp/x.yaml"}]}, "InvalidSpec",
        ("spec.env[0].name: RLHF_CONFIG is set by the operator",)),
    Bad("long-name", "SFTJob", {}, "InvalidSpec", ("metadata.name: at most 63 characters",), job_name=LONG_NAME),
    # --- what a job may grant (operator settings; default: the trainer image only, no Secrets, no code-loading env)
    Bad("image-not-allowed", "SFTJob", {"image": "docker.io/evil/miner:1"}, "InvalidSpec",
        ("spec.image: 'docker.io/evil/miner:1' is not an allowed trainer image",)),
    Bad("pythonpath-env", "SFTJob", {"env": [{"name": "PYTHONPATH", "value": "/mnt/claims/x"}]}, "InvalidSpec",
        ("spec.env[0].name: PYTHONPATH changes which code the trainer runs",)),
    Bad("secret-env", "SFTJob", {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]},
        "InvalidSpec", ("spec.env[0].valueFrom.secretKeyRef: jobs may not read Secrets",)),
    # --- the scheduler ---------------------------------------------------------------------------------
    Bad("more-gpus-than-any-node", "SFTJob", {"resources.gpus": 8}, UNSCHEDULABLE, ("Insufficient nvidia.com/gpu",)),
    # --- files, found by the real trainer ------------------------------------------------------------
    Bad("missing-dataset", "SFTJob", {"dataset": {"path": "/nonexistent/e2e/train.jsonl"}}, "DataError",
        ("dataset.path /nonexistent/e2e/train.jsonl does not exist",)),
    Bad("corrupt-line", "SFTJob", {"dataset.configMap.key": "corrupt.jsonl"}, "DataError", ("corrupt.jsonl:3: not valid JSON",)),
    Bad("unknown-row-schema", "SFTJob", {"dataset.configMap.key": "unknown.jsonl"}, "DataError",
        ("unknown.jsonl:1: cannot detect the row format from fields ['answer', 'question']",)),
    Bad("empty-dataset", "SFTJob", {"dataset.configMap.key": "empty.jsonl"}, "DataError", ("empty.jsonl has no rows",)),
    Bad("no-usable-pairs", "RewardModelJob", {"dataset.configMap.key": "ties.jsonl"}, "DataError",
        ("ties.jsonl: the train split has 0 pairs",)),
    Bad("sft-data-for-reward", "RewardModelJob", {"dataset.configMap.key": "sft.jsonl"}, "DataError",
        ("format prompt_response cannot feed the reward stage",)),
    Bad("batch-larger-than-data", "SFTJob", {"dataset.configMap.key": "three.jsonl", "training.batchSize": 64}, "DataError",
        ("the train split has 2 examples, fewer than one optimizer step needs",)),
    Bad("utf16-dataset", "SFTJob", {"dataset.configMap": {"name": "bindata", "key": "utf16.jsonl"}}, "DataError",
        ("utf16.jsonl:1: byte offset 0", "the file is UTF-16", "expected UTF-8 JSON lines")),
    Bad("binary-dataset", "SFTJob", {"dataset.configMap": {"name": "bindata", "key": "binary.jsonl"}}, "DataError",
        ("binary.jsonl:2: byte offset 65", "expected UTF-8 JSON lines")),
    Bad("missing-model-path", "SFTJob", {"model": {"path": "/nonexistent/e2e/model"}}, "ModelError",
        ("model.path /nonexistent/e2e/model does not exist",)),
    Bad("missing-tokenizer", "SFTJob", {"model.tokenizerPath": "/nonexistent/e2e/tokenizer"}, "ModelError",
        ("model.tokenizer_path /nonexistent/e2e/tokenizer does not exist",)),
    Bad("not-a-reward-model", "PPOJob", {}, "ModelError", ("is not a reward model",)),
    Bad("unknown-architecture", "SFTJob", {"model.initFromConfig": {"model_type": "no-such-arch"}}, "InvalidConfig",
        ("model.init_from_config", "no-such-arch")),
    Bad("offload-optimizer-zero-0", "SFTJob", {"deepspeed": {"enabled": True, "zeroStage": 0, "offloadOptimizer": True}},
        REJECTED, ("spec.deepspeed.offloadOptimizer: optimizer offload needs zeroStage 1, 2 or 3",)),
    # --- DPOJob: what cannot work is refused at apply time (CEL rules), the rest by the webhook rules or the trainer --
    Bad("dpo-online-no-scorer", "DPOJob", {"online": {"rounds": 2}}, REJECTED,
        ("spec.online.rewardModel: online DPO scores its samples with a reward model",)),
    Bad("dpo-one-sample", "DPOJob", {"online": {"rounds": 2, "rewardFn": "count:a", "samplesPerPrompt": 1}}, REJECTED,
        ("spec.online.samplesPerPrompt",)),
    Bad("dpo-zero-rounds", "DPOJob", {"online": {"rounds": 0, "rewardFn": "count:a"}}, REJECTED,
        ("spec.online.rounds: 0 rounds is offline DPO",)),
    Bad("dpo-reward-model-from-sft", "DPOJob", {"online": {"rounds": 2, "rewardModel": {"fromJob": {
        "name": "policy", "kind": "SFTJob"}}}}, REJECTED,
        ("spec.online.rewardModel.fromJob.kind: a SFTJob cannot be used as online.rewardModel",)),
    Bad("dpo-smoothing-ipo", "DPOJob", {"dpo": {"loss": "ipo", "labelSmoothing": 0.1}}, REJECTED,
        ("spec.dpo.labelSmoothing: only the sigmoid loss has label smoothing",)),
    Bad("dpo-offline-prompt-rows", "DPOJob", {"dataset.format": "prompt"}, REJECTED,
        ("spec.dataset.format: offline DPO trains on preference pairs, not prompt rows",)),
    Bad("dpo-steps-not-whole-rounds", "DPOJob", {"online": {"rounds": 3, "rewardFn": "count:a"}}, REJECTED,
        ("spec.training.maxSteps: online DPO runs maxSteps / rounds steps per round",)),
    Bad("dpo-unknown-reward-fn", "DPOJob", {"online": {"rounds": 2, "rewardFn": "bogus"}}, "InvalidSpec",
        ("spec.online.rewardFn", "'bogus' is not a known rule")),
    Bad("dpo-not-a-reward-model", "DPOJob", {"online": {"rounds": 2, "samplesPerPrompt": 2, "promptsPerRound": 8,
                                                        "maxPromptLength": 16, "maxNewTokens": 8,
                                                        "rewardModel": {"path": MINILM}}}, "ModelError",
        ("is not a reward model",)),
    Bad("dpo-offline-on-prompts", "DPOJob", {"dataset.configMap.key": "prompts.jsonl"}, "DataError",
        ("format prompt cannot feed",)),
]


def data_files() -> dict[str, str]:
    ties = [{"user_input": f"question {i // 2}", "completion": f" answer {i}", "score": 1.0} for i in range(40)]
    return {
        "sft.jsonl": jsonl(sft_rows()), "pairs.jsonl": jsonl(pair_rows()), "prompts.jsonl": jsonl(prompt_rows()),
        "corrupt.jsonl": jsonl(sft_rows(2)) + '{"prompt": "cut off", "respo\n' + jsonl(sft_rows(10)),
        "unknown.jsonl": jsonl([{"question": "q", "answer": "a"}] * 10),
        "empty.jsonl": "",
        "ties.jsonl": jsonl(ties),  # scored completions with equal scores give no preference pair
        "three.jsonl": jsonl(sft_rows(3)),
    }


def binary_files() -> dict[str, str]:
    """ConfigMap binaryData (base64): files that are not UTF-8 JSON lines."""
    utf16 = jsonl(sft_rows()).encode("utf-16")  # with a byte-order mark
    binary = jsonl(sft_rows(1)).encode() + bytes(range(256)) * 4  # a valid first row, then bytes that are no text
    return {"utf16.jsonl": base64.b64encode(utf16).decode(), "binary.jsonl": base64.b64encode(binary).decode()}


def base_spec(kind: str) -> dict[str, Any]:
    """A valid spec for the real trainer (the cases change one thing in it)."""
    dataset = {"SFTJob": "sft.jsonl", "RewardModelJob": "pairs.jsonl", "PPOJob": "prompts.jsonl", "DPOJob": "pairs.jsonl"}[kind]
    spec = real_spec(configmap_dataset("data", dataset), steps=10, every=0)
    if kind == "PPOJob":
        spec["actor"] = spec.pop("model")
        spec["rewardModel"] = {"path": MINILM}  # a plain encoder: passes every rule, but is no trained reward model
        spec["dataset"].update(format="prompt", evalFraction=0.0)
        spec["ppo"] = {"rolloutBatchSize": 4, "minibatchSize": 2, "maxPromptLength": 16, "maxNewTokens": 8}
    if kind == "DPOJob":  # offline on the pairs; a case's spec.online makes it online
        spec["policy"] = spec.pop("model")
    return spec


def apply_change(spec: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


def test_table_is_large_and_varied():
    outcomes = {b.outcome for b in BAD}
    assert len(BAD) >= 25 and len({b.name for b in BAD}) == len(BAD)
    assert {REJECTED, "InvalidSpec", UNSCHEDULABLE, "DataError", "ModelError", "InvalidConfig"} <= outcomes


def settled(jobs, case: Bad) -> dict[str, Any] | None:
    """The condition that ends the case, once it is there (a job that succeeded ends it too)."""
    st = jobs.status(case.kind, case.job_name or case.name)
    conds = conditions(st)
    if st.get("phase") == "Failed":
        return conds["Failed"]
    if st.get("phase") == "Succeeded":  # a bad input that went through
        return {"reason": "Succeeded", "message": "the job succeeded"}
    if case.outcome == UNSCHEDULABLE:
        # The scheduler's first answer may be about the checkpoint claim not being bound yet.
        c = conds.get("PodScheduled")
        return c if c and c["reason"] == "Unschedulable" and all(s in c["message"] for s in case.says) else None
    return None


def apply_all(jobs, cases: list[Bad]) -> tuple[list[Bad], list[str]]:
    """Apply every case; returns the ones the API server accepted and the problems seen at apply time."""
    created, problems = [], []
    for case in cases:
        try:
            jobs.create(case.kind, case.job_name or case.name, apply_change(base_spec(case.kind), case.change))
        except ApiException as e:
            if case.outcome != REJECTED:
                problems.append(f"{case.name}: rejected at apply time ({e.status}), expected {case.outcome}: {e.body[:300]}")
            elif e.status != 422 or not all(s in e.body for s in case.says):
                problems.append(f"{case.name}: API error {e.status} does not say {case.says}: {e.body[:500]}")
            continue
        if case.outcome == REJECTED:
            problems.append(f"{case.name}: accepted, expected a rejection naming {case.says}")
        else:
            created.append(case)
    return created, problems


def await_outcomes(jobs, cases: list[Bad], timeout: float) -> dict[str, dict[str, Any]]:
    """case name -> the condition that ended it, for every case that ended within `timeout`."""
    outcomes: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(cases) and time.monotonic() < deadline:
        for case in cases:
            if case.name not in outcomes and (cond := settled(jobs, case)):
                outcomes[case.name] = cond
        time.sleep(1.0)
    return outcomes


def outcome_problems(jobs, case: Bad, cond: dict[str, Any] | None, pods: list[str]) -> list[str]:
    name = case.job_name or case.name
    if cond is None:
        return [f"{case.name}: no {case.outcome} condition in time; status {json.dumps(jobs.status(case.kind, name))[:600]}"]
    problems = []
    if cond["reason"] != case.outcome:
        problems.append(f"{case.name}: ended with reason {cond['reason']}, expected {case.outcome}: {cond['message']}")
    if not all(s in cond["message"] for s in case.says):
        problems.append(f"{case.name}: condition message does not say {case.says}: {cond['message']}")
    if case.outcome == UNSCHEDULABLE and (phase := jobs.status(case.kind, name).get("phase")) != "Pending":
        problems.append(f"{case.name}: phase {phase}, expected Pending")
    mine = [p for p in pods if p.startswith(names.pod_name(case.kind, name, 0)[:-1])]
    expected = 0 if case.outcome == "InvalidSpec" else 1  # permanent errors are not retried
    if len(mine) != expected:
        problems.append(f"{case.name}: trainer pods {mine}, expected {expected}")
    return problems


@pytest.mark.slow
def test_bad_specs_and_files(real_operator, jobs):
    create_configmap(jobs, "data", data_files())
    jobs.core.create_namespaced_config_map(jobs.ns, {"metadata": {"name": "bindata"}, "binaryData": binary_files()})
    jobs.create("SFTJob", "healthy", real_spec(configmap_dataset("data", "sft.jsonl"), steps=600, every=100))
    wait_phase(jobs, "SFTJob", "healthy", "Running", 120)

    created, problems = apply_all(jobs, BAD)
    assert jobs.status("SFTJob", "healthy").get("phase") == "Running"  # still going while the bad jobs arrive
    outcomes = await_outcomes(jobs, created, 240)
    pods = [p.metadata.name for p in jobs.core.list_namespaced_pod(jobs.ns).items]
    for case in created:
        problems += outcome_problems(jobs, case, outcomes.get(case.name), pods)
    print("\n" + "\n".join(f"{c.name:28} {c.outcome:13} {outcomes.get(c.name, {}).get('message', '')[:150]}" for c in created))
    assert not problems, "\n".join(problems)

    st = wait_phase(jobs, "SFTJob", "healthy", "Succeeded", 240)
    assert st["restartCount"] == 0 and [p.metadata.name for p in jobs.pods("healthy")] == [names.pod_name("SFTJob", "healthy", 0)]
    assert st["progress"]["step"] == 600
    reasons = lambda: {e.reason for e in jobs.core.list_namespaced_event(jobs.ns).items}  # noqa: E731
    wait_for("an event per failure kind", lambda: {"InvalidSpec", "DataError", "ModelError", "InvalidConfig"} <= reasons(), 30)
    assert_operator_healthy(real_operator)
