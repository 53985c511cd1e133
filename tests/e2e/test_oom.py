"""A real out-of-memory kill, end to end: the embedded node enforces the pod's memory limit in a
cgroup, the kernel kills the real trainer, the node reports OOMKilled, and the operator fails the job
at once saying what to change (no restart burnt on a run that would run out of memory again)."""

from __future__ import annotations

from e2e_helpers import conditions, configmap_dataset, create_configmap, jsonl, real_spec, sft_rows, wait_phase
from rlhf_operator import names


def test_trainer_over_its_memory_limit_fails_the_job_as_out_of_memory(real_operator, jobs):
    create_configmap(jobs, "data", {"sft.jsonl": jsonl(sft_rows())})
    # Importing torch alone needs several hundred MiB: 128Mi is a limit the trainer cannot live in.
    spec = real_spec(configmap_dataset("data", "sft.jsonl"), steps=10, every=0, backoffLimit=3)
    spec["resources"] = {"gpus": 0, "memory": "128Mi"}
    jobs.create("SFTJob", "oom", spec)

    st = wait_phase(jobs, "SFTJob", "oom", "Failed", 180)
    failed = conditions(st)["Failed"]
    assert failed["reason"] == "OOMKilled", failed
    assert "ran out of memory" in failed["message"] and "spec.resources.memory=128Mi" in failed["message"], failed
    assert "spec.training.batchSize" in failed["message"], failed
    assert st.get("restartCount", 0) == 0, st  # not retried: it would run out of memory again

    pod = jobs.core.read_namespaced_pod(names.pod_name("SFTJob", "oom", 0), jobs.ns)
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "OOMKilled")  # what the node agent reported
    assert [p.metadata.name for p in jobs.pods("oom")] == [pod.metadata.name]
    assert "OOMKilled" in {e.reason for e in jobs.events("oom")}
