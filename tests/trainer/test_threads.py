"""The trainer's torch threads follow the pod's CPU request (or CPU quota), not the node's core count."""

import pytest
from rlhf_trainer.runtime import threads


def test_configured_threads_win():
    assert threads.choose_threads(3, {"RLHF_CPU_REQUEST": "1"}, cgroup=2, available=8) == (3, "training.threads")


def test_cpu_request_sets_threads_and_is_capped_by_the_cores_we_may_use():
    assert threads.choose_threads(0, {"RLHF_CPU_REQUEST": "1"}, cgroup=0, available=2)[0] == 1
    n, why = threads.choose_threads(0, {"RLHF_CPU_REQUEST": "4"}, cgroup=0, available=2)
    assert n == 2 and "RLHF_CPU_REQUEST=4" in why


def test_torchrun_processes_share_the_request():
    env = {"RLHF_CPU_REQUEST": "4", "LOCAL_WORLD_SIZE": "2"}
    assert threads.choose_threads(0, env, cgroup=0, available=8)[0] == 2
    assert threads.choose_threads(0, {"RLHF_CPU_REQUEST": "1", "LOCAL_WORLD_SIZE": "2"}, cgroup=0, available=8)[0] == 1


def test_without_a_request_the_cgroup_quota_then_torch_default_applies():
    assert threads.choose_threads(0, {}, cgroup=3, available=8) == (3, "cgroup CPU quota 3")
    assert threads.choose_threads(0, {"RLHF_CPU_REQUEST": "0"}, cgroup=0, available=8) == (0, "torch default")
    assert threads.choose_threads(0, {"RLHF_CPU_REQUEST": "x"}, cgroup=0, available=8) == (0, "torch default")


@pytest.mark.parametrize(("cpu_max", "v1", "want"), [
    ("150000 100000", None, 2), ("max 100000", None, 0), ("", ("50000", "100000"), 1), ("", ("-1", "100000"), 0),
])
def test_cgroup_quota_is_read_from_v2_or_v1(tmp_path, cpu_max, v1, want):
    v2 = tmp_path / "cpu.max"
    if cpu_max:
        v2.write_text(cpu_max)
    quota, period = tmp_path / "quota", tmp_path / "period"
    if v1:
        quota.write_text(v1[0])
        period.write_text(v1[1])
    assert threads.cgroup_cpus(str(v2), str(quota), str(period)) == want


def test_apply_sets_torch_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("RLHF_CPU_REQUEST", "1")
    try:
        assert threads.apply(0).startswith("1 CPU threads (pod CPU request")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
