"""Online DPO rounds: the step plan across rounds and each round's pair file on the job's claim.

A run of R rounds has a fixed number of optimizer steps per round, so the whole run's steps (and its
learning-rate schedule, its ``round r/R`` progress) are known before the first sample is drawn. Step
``s`` belongs to round ``s // steps_per_round``; inside its round it takes a fixed slice of seeded epochs
over that round's pairs (a round with fewer pairs than a step needs cycles through them).

Each round's pairs are written once, atomically, to ``<checkpoint.dir>/rounds/NN/`` (NN 1-based):
``pairs.jsonl`` (one line per pair: prompt, chosen, rejected, their rewards and scores, the token ids
trained on and the reference log-probs) and ``round.json`` (the round's statistics and the run plan it
belongs to). A pod that resumes inside a round reads them back instead of sampling again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUNDS_SUBDIR = "rounds"
PAIRS_FILE = "pairs.jsonl"
ROUND_FILE = "round.json"


@dataclass
class RoundPlan:
    """The BatchPlan surface of runtime.loop for online rounds: ``indices`` yields ``(round, slot)`` items
    (round 0-based), resolved to pairs once the round's pairs exist."""

    rounds: int
    steps_per_round: int
    micro_batch: int
    world_size: int
    grad_accum: int
    seed: int
    identity: dict[str, Any] = field(default_factory=dict)  # run settings a resumed run must share

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def round_of(self, step: int) -> int:
        """0-based round of the (0-based) optimizer step."""
        return min(step // self.steps_per_round, self.rounds - 1)

    def indices(self, step: int, micro: int, rank: int) -> list[tuple[int, int]]:
        r, k = divmod(step, self.steps_per_round)
        start = k * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        return [(r, s) for s in range(start, start + self.micro_batch)]

    def epoch(self, step: int) -> float:
        """Rounds done (fractional), reported as the epoch."""
        return step / self.steps_per_round

    def state(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "steps_per_round": self.steps_per_round, "global_batch": self.global_batch,
                "seed": self.seed, **self.identity}


def steps_per_round(prompts_per_round: int, epochs_per_round: float, global_batch: int, max_steps: int,
                    rounds: int) -> int:
    """``training.max_steps / rounds`` when max_steps is set (a multiple of rounds), else
    ``epochs_per_round`` passes over a round's at most ``prompts_per_round`` pairs, at least one step."""
    if max_steps > 0:
        return max_steps // rounds
    return max(1, round(epochs_per_round * prompts_per_round / global_batch))


def checkpoint_every(every_steps: int, per_round: int) -> int:
    """Checkpoint interval of an online run: the largest divisor of ``per_round`` that is at most
    ``every_steps`` (every round's last step is then a checkpoint), ``per_round`` when every_steps is 0."""
    if every_steps <= 0 or every_steps >= per_round:
        return per_round
    return max(d for d in range(1, every_steps + 1) if per_round % d == 0)


def slot_pair(slot: int, n_pairs: int, seed: int, round_index: int) -> int:
    """The pair (of ``n_pairs``) that round-local ``slot`` trains on: seeded epochs over the round's pairs."""
    epoch, k = divmod(slot, n_pairs)
    order = list(range(n_pairs))
    random.Random(seed * 1_000_003 + round_index * 7_919 + epoch).shuffle(order)
    return order[k]


def round_dir(checkpoint_dir: str | Path, round_index: int) -> Path:
    """``<checkpoint dir>/rounds/NN`` of the 0-based ``round_index`` (NN is 1-based, as the status shows)."""
    return Path(checkpoint_dir) / ROUNDS_SUBDIR / f"{round_index + 1:02d}"


def write_round(directory: Path, pairs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write a round's pairs and summary aside, fsync, then rename into place (readers see all or nothing)."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / PAIRS_FILE, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / ROUND_FILE, "w") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_round(directory: Path, plan_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """A complete round written by this run's plan, or None (missing, torn, or from another plan)."""
    try:
        summary = json.loads((directory / ROUND_FILE).read_text())
        if summary.get("plan") != plan_state:
            return None
        pairs = [json.loads(line) for line in (directory / PAIRS_FILE).read_text().splitlines() if line]
    except (OSError, ValueError):
        return None
    return (pairs, summary) if len(pairs) == summary.get("pairs") else None


def remove_rounds_after(checkpoint_dir: str | Path, round_index: int) -> list[Path]:
    """Delete round directories after ``round_index`` (0-based): left by a run whose later checkpoints are
    gone, their pairs came from weights this run will not have. Returns what was removed."""
    root = Path(checkpoint_dir) / ROUNDS_SUBDIR
    removed = []
    for d in sorted(root.glob("[0-9]*")) if root.is_dir() else []:
        if d.is_dir() and d.name.isdigit() and int(d.name) - 1 > round_index:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
