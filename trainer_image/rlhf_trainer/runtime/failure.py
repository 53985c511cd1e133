"""How a run ends badly: typed errors with exit codes, the termination message, graceful SIGTERM.

Kubernetes shows the container's termination message (``/dev/termination-log``) in the pod status,
so the operator can put the reason of a failed run into the job's conditions without reading logs.
A failure's message ends with a line recording the trainer's own exit code (``[exit 3, rank 1]``): under
torchrun the container ends with torchrun's exit code (1 for any failed worker), and the operator must still
tell a permanent error from a retryable one. The local ranks of a pod share the file: the first failure
recorded wins (see :func:`record_failure`).
"""

from __future__ import annotations

import fcntl
import os
import re
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


_RECORD = re.compile(r"\n?\[exit (\d+)(?:, rank (\d+))?\]\s*\Z")
_LIMIT = 4000  # bytes; Kubernetes keeps at most 4096 of a termination message


def parse_failure(message: str) -> tuple[int | None, int | None, str]:
    """(exit code, rank, reason) of a termination message that records a failure; (None, None, message)
    for anything else (a success's metrics, a log tail)."""
    m = _RECORD.search(message or "")
    if m is None:
        return None, None, message
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None), message[:m.start()]


def _write(message: str, record: str = "") -> bool:
    """Write `message` (cut to fit) and `record` as the termination message unless a failure is recorded
    there already. The check and the write hold an exclusive lock on the file, so of several ranks failing at
    once exactly one is recorded. Best effort: outside a pod the default path is usually not writable."""
    body = message.encode("utf-8", "replace")[:_LIMIT - len(record)].decode("utf-8", "ignore")
    data = (body + record).encode("utf-8")
    try:
        fd = os.open(termination_log_path(), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the close
        if parse_failure(os.pread(fd, _LIMIT, 0).decode("utf-8", "replace"))[0] is not None:
            return False  # the first failure is the cause; later ones (peers, SIGTERM, a bug) are consequences
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_termination_message(message: str) -> bool:
    """A message that records no failure (a success's final metrics); never replaces a recorded failure."""
    return _write(message)


def record_failure(exit_code: int, message: str) -> bool:
    """Record ``message`` with a last line ``[exit N, rank R]`` as the termination message, unless a failure
    of this pod is recorded already (then False): the first failing rank's code and reason stay."""
    # The rank matters only among several processes (a single one may carry RANK=0 for DeepSpeed's sake).
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "1")
    who = f", rank {rank}" if rank.isdigit() and world.isdigit() and int(world) > 1 else ""
    return _write(message, f"\n[exit {exit_code}{who}]")


def fail(exit_code: int, message: str) -> NoReturn:
    """Print ``message`` to stderr, record it and ``exit_code`` as the termination message and exit with
    ``exit_code``."""
    print(f"rlhf-trainer: {message}", file=sys.stderr, flush=True)
    record_failure(exit_code, message)
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
