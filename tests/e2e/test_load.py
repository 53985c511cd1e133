"""Load: 100 jobs applied at once all reach Succeeded, each with exactly one trainer pod and a complete
status. Prints the wall time and the operator's peak memory; the bounds asserted are generous."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from e2e_helpers import assert_operator_healthy, conditions, metric_value, op, wait_for
from rlhf_operator.names import pod_name, pvc_name

N_JOBS = 100
STEPS = 3
KINDS = ("SFTJob", "RewardModelJob", "PPOJob")


def standin_spec(kind: str) -> dict:
    spec = {"dataset": {"path": "/etc/hostname"}, "training": {"maxSteps": STEPS}, "resources": {"gpus": 0},
            "checkpoint": {"everySteps": 0}, "env": [{"name": "STANDIN_STEP_SECONDS", "value": "0.02"}]}
    if kind == "PPOJob":
        spec.update(actor={"path": "/tmp"}, rewardModel={"path": "/tmp"}, ppo={"rolloutBatchSize": 4, "minibatchSize": 2})
    else:
        spec["model"] = {"path": "/tmp"}
    return spec


class PeakMemory:
    """Samples a process's resident memory in a thread; `.peak` in bytes."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self.start_rss = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_hundred_jobs_at_once(operator_factory, jobs):
    # The chart's resync period is 10 s; 5 s keeps the test short without a scrape storm on 2 cores.
    operator = operator_factory(RLHF_RESYNC_SECONDS="5")
    names = {f"load-{i:03d}": KINDS[i % len(KINDS)] for i in range(N_JOBS)}
    cpu_before = psutil.Process(operator.proc.pid).cpu_times()

    def listed() -> dict[str, dict]:
        out = {}
        for kind in KINDS:
            items = jobs.api.list_namespaced_custom_object(op.GROUP, op.VERSION, jobs.ns, op.PLURALS[kind])["items"]
            out.update({o["metadata"]["name"]: o for o in items})
        return out

    with PeakMemory(operator.proc.pid) as memory:
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: jobs.create(item[1], item[0], standin_spec(item[1])), names.items()))
        applied = time.monotonic() - t0
        done = wait_for("all jobs Succeeded", lambda: (objs := listed()) and all(
            (o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values()) and objs, 300, 1.0)
        wall = time.monotonic() - t0
    cpu_after = psutil.Process(operator.proc.pid).cpu_times()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    print(f"\nload: {N_JOBS} jobs applied in {applied:.1f} s, all finished {wall:.1f} s after the first apply; "
          f"operator RSS {memory.start_rss / 2**20:.0f} MiB at start, peak {memory.peak / 2**20:.0f} MiB; "
          f"operator CPU {cpu:.1f} s")

    assert set(done) == set(names)
    phases = Counter(o["status"]["phase"] for o in done.values())
    assert phases == {"Succeeded": N_JOBS}, phases
    for name, obj in done.items():  # no lost status: every field of a finished job is there
        st = obj["status"]
        assert st["trainerPod"] == pod_name(names[name], name, 0) and st["attempt"] == 0 and st["restartCount"] == 0, (name, st)
        assert st["progress"]["step"] == st["progress"]["totalSteps"] == STEPS, (name, st)
        assert st["output"] == {"claim": pvc_name(names[name], name), "path": "final"}, (name, st)
        assert st["observedGeneration"] == 1 and st["startTime"] and st["completionTime"], (name, st)
        assert st["checkpoint"]["latestStep"] == STEPS, (name, st)
        conds = conditions(st)
        assert conds["Succeeded"]["status"] == "True" and conds["Created"]["status"] == "True", (name, st)
        assert conds.get("Running", {}).get("status", "False") == "False", (name, st)  # a 0.1 s run may never be seen Running

    pods = jobs.core.list_namespaced_pod(jobs.ns, label_selector="app.kubernetes.io/managed-by=rlhf-operator").items
    per_job = Counter(p.metadata.labels["rlhf.io/job"] for p in pods)
    assert per_job == Counter(list(names)), {j: n for j, n in per_job.items() if n != 1}  # exactly one pod per job
    assert {p.metadata.name for p in pods} == {pod_name(k, n, 0) for n, k in names.items()}
    assert {p.status.phase for p in pods} == {"Succeeded"}
    claims = jobs.core.list_namespaced_persistent_volume_claim(jobs.ns).items
    assert sorted(c.metadata.name for c in claims) == sorted(pvc_name(k, n) for n, k in names.items())

    text = operator.metrics()
    for kind in KINDS:
        expected = sum(1 for k in names.values() if k == kind)
        assert metric_value(text, "rlhf_operator_jobs", kind=kind, phase="Succeeded") == expected, kind
        assert metric_value(text, "rlhf_operator_pod_restarts_total", kind=kind) == 0, kind
    assert_operator_healthy(operator)
    assert wall < 300 and memory.peak < 1024 * 2**20
