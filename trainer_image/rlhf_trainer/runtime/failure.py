"""How a run ends badly: typed errors with exit codes, the termination message, graceful SIGTERM.

Kubernetes shows the container's termination message (``/dev/termination-log``) in the pod status,
so the operator can put the reason of a failed run into the job's conditions without reading logs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

from .. import contract


class TrainerError(Exception):
    """An error that ends the run with a specific exit code (see ``contract``)."""

    exit_code = 1


class DataError(TrainerError):
    """The dataset is missing, malformed or too small (permanent: retrying will not help)."""

    exit_code = contract.EXIT_DATA_ERROR


class ModelError(TrainerError):
    """A model or tokenizer cannot be loaded from the configured path (permanent)."""

    exit_code = contract.EXIT_MODEL_ERROR


class NumericError(TrainerError):
    """The loss became NaN or infinite."""

    exit_code = contract.EXIT_NUMERIC_ERROR


class NonFiniteGradients(TrainerError):
    """``training.max_skipped_steps`` consecutive optimizer steps had NaN/Inf gradients (permanent: the same
    data and weights would produce them again)."""

    exit_code = contract.EXIT_NONFINITE


class CheckpointError(TrainerError):
    """A checkpoint's files do not match its manifest or hold more than tensors and plain data (permanent)."""

    exit_code = contract.EXIT_CHECKPOINT_ERROR


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was written and the run stops to be resumed later."""

    exit_code = contract.EXIT_PREEMPTED


def termination_log_path() -> str:
    return os.environ.get(contract.ENV_TERMINATION_LOG, contract.DEFAULT_TERMINATION_LOG)


def write_termination_message(message: str) -> None:
    """Best effort: outside a pod the default path is usually not writable, which is fine."""
    try:
        with open(termination_log_path(), "w") as f:
            f.write(message[:4000])  # Kubernetes keeps at most 4096 bytes
    except OSError:
        pass


def fail(exit_code: int, message: str) -> NoReturn:
    """Print ``message`` to stderr, record it as the termination message and exit with ``exit_code``."""
    print(f"rlhf-trainer: {message}", file=sys.stderr, flush=True)
    write_termination_message(message)
    sys.exit(exit_code)


def check_finite(value: float, what: str, step: int) -> None:
    """Raise NumericError when a loss is NaN or infinite (the run cannot recover from that)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise NumericError(
            f"{what} is {value} at step {step}; lower training.learning_rate, enable gradient clipping "
            f"(training.max_grad_norm) or check the data for empty/degenerate rows"
        )


class GracefulStop:
    """Turns SIGTERM into a flag that the training loop polls between steps.

    The loop then writes a checkpoint and exits with 143 well inside the pod's grace period.
    ``stop_at_step`` (or env ``RLHF_STOP_AT_STEP``) makes the loop behave as if SIGTERM arrived at that
    step: a deterministic preemption, used to test resume and to time-slice a run.
    """

    def __init__(self, stop_at_step: int | None = None, install: bool = True):
        env = os.environ.get("RLHF_STOP_AT_STEP", "")
        self.stop_at_step = stop_at_step if stop_at_step is not None else (int(env) if env else None)
        self.requested = False
        self._previous = None
        if install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        print("rlhf-trainer: SIGTERM received; checkpointing at the end of this step", file=sys.stderr, flush=True)

    def should_stop(self, step: int, strategy=None) -> bool:
        """True when this process (or, with ``strategy``, any process) was asked to stop."""
        local = self.requested or (self.stop_at_step is not None and step >= self.stop_at_step)
        if strategy is not None and strategy.world_size > 1:
            return strategy.any_true(local)
        return local

    def close(self) -> None:
        """Restore the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> GracefulStop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
