"""runtime.loop.run_loop, the one resumable loop of every stage, with a stage whose state is one number:
resume, periodic and final checkpoints, the checkpoint on a stop request and after a retryable error,
the plan check, the skipped-step counters and the step/metrics plumbing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from rlhf_trainer.config import ConfigError, from_dict  # noqa: E402
from rlhf_trainer.runtime.failure import GracefulStop, Preempted  # noqa: E402
from rlhf_trainer.runtime.loop import Resumable, run_loop  # noqa: E402
from rlhf_trainer.runtime.metrics import TrainerMetrics  # noqa: E402
from rlhf_trainer.runtime.nonfinite import StepGuard  # noqa: E402


class Flaky(Exception):
    pass


class Counter:
    """A stage whose state is the sum of the step indices it ran."""

    def __init__(self, fail_at: int | None = None):
        self.total, self.fail_at, self.ran = 0, fail_at, []
        self.guard = StepGuard("sft", "policy", limit=10)

    def step(self, index: int, log: bool) -> dict[str, float]:
        if index == self.fail_at:
            raise Flaky(f"step {index}")
        self.total += index
        self.ran.append(index)
        self.guard.steps += 1
        return {"loss": float(index), "samples": 2.0, "tokens": 5.0}

    def resumable(self, plan=None) -> Resumable:
        def save(d):
            (d / "state.json").write_text(json.dumps({"total": self.total}))

        def load(d):
            self.total = json.loads((d / "state.json").read_text())["total"]

        return Resumable(save, load, plan or {"n": 1}, guards=[self.guard])


def cfg_of(tmp_path, every=2, **training):
    return from_dict({"stage": "sft", "model": {"path": "/m"}, "dataset": {"path": "/d"},
                      "training": {"log_every": 1, **training}, "metrics": {"port": 0},
                      "checkpoint": {"dir": str(tmp_path), "every_steps": every, "keep_last": 5}})


def run(cfg, stage: Counter, total: int, stop_at: int | None = None, plan=None, save_on=(Flaky,)):
    metrics = TrainerMetrics(cfg, is_main=True)
    with GracefulStop(stop_at_step=stop_at, install=False) as stop:
        return run_loop(cfg, None, stage.resumable(plan), total, stage.step, metrics, stop, save_on=save_on)


def steps_saved(tmp_path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*"))


def test_stop_checkpoints_and_the_next_start_continues(tmp_path, capsys):
    cfg = cfg_of(tmp_path, every=2)
    first = Counter()
    with pytest.raises(Preempted, match=r"at step 3 of 6"):
        run(cfg, first, 6, stop_at=3)
    assert first.ran == [0, 1, 2] and steps_saved(tmp_path) == [2, 3]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{") and '"loss"' in x]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(x["loss"] == x["step"] - 1 for x in lines)
    second = Counter()
    result = run(cfg, second, 6)
    assert second.ran == [3, 4, 5] and second.total == 0 + 1 + 2 + 3 + 4 + 5
    assert (result.step, result.resumed_from, result.values) == (6, 3, {"loss": 5.0})
    assert second.guard.steps == 6  # the skipped-step counters carried across the restart
    assert steps_saved(tmp_path) == [2, 3, 4, 6]


def test_a_retryable_error_checkpoints_the_step_boundary_then_propagates(tmp_path):
    cfg = cfg_of(tmp_path, every=0)
    with pytest.raises(Flaky):
        run(cfg, Counter(fail_at=2), 5)
    assert steps_saved(tmp_path) == [2]
    again = Counter()
    assert run(cfg, again, 5).resumed_from == 2 and again.ran == [2, 3, 4] and steps_saved(tmp_path) == [2, 5]


def test_an_error_not_listed_writes_nothing(tmp_path):
    with pytest.raises(Flaky):
        run(cfg_of(tmp_path, every=0), Counter(fail_at=2), 5, save_on=())
    assert not (tmp_path / "checkpoints").exists() or steps_saved(tmp_path) == []


def test_a_different_plan_is_refused(tmp_path):
    cfg = cfg_of(tmp_path, every=1)
    run(cfg, Counter(), 2)
    with pytest.raises(ConfigError, match=r"was written with the plan \{'n': 1\} but this run has \{'n': 2\}; "
                                          r"resume with the same dataset"):
        run(cfg, Counter(), 4, plan={"n": 2})
