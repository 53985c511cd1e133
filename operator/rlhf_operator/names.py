"""The names of a job's child objects: the one place that makes them.

A name is `<job>-<kind>-<what>` (`dup-rm-checkpoints`, `dup-sft-trainer-0`): jobs of different kinds
may share a name, their children must not. Names are deterministic, so a pass repeated after an
operator restart finds the same objects. Every name is a DNS-1123 label (<= 63 characters, so it also
serves as a pod's hostname): when `<job>-<kind>-<what>` would be longer, or the job name has a dot,
the job part is cut and an 8-hex-digit hash of (kind, job) keeps the names of different jobs apart.
"""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 63
KIND_ABBREVIATIONS = {"SFTJob": "sft", "RewardModelJob": "rm", "PPOJob": "ppo", "DPOJob": "dpo"}
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def kind_abbreviation(kind: str) -> str:
    try:
        return KIND_ABBREVIATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(KIND_ABBREVIATIONS)}") from None


def child_name(kind: str, job: str, what: str) -> str:
    """`<job>-<kind abbreviation>-<what>`, shortened with a stable hash when it is not a valid label."""
    tail = f"-{kind_abbreviation(kind)}-{what}"
    full = job + tail
    if len(full) <= MAX_LENGTH and _LABEL.match(full):
        return full
    digest = hashlib.sha256(f"{kind}/{job}".encode()).hexdigest()[:8]
    room = MAX_LENGTH - len(tail) - len(digest) - 1
    head = re.sub(r"[^a-z0-9-]", "-", job.lower())[:room].strip("-")
    return f"{head}-{digest}{tail}" if head else f"{digest}{tail}"


def pvc_name(kind: str, job: str) -> str:
    """The job's checkpoint claim (checkpoints and the final model)."""
    return child_name(kind, job, "checkpoints")


def configmap_name(kind: str, job: str) -> str:
    """The job's rendered trainer config."""
    return child_name(kind, job, "config")


def pod_name(kind: str, job: str, attempt: int, rank: int | None = None) -> str:
    """The trainer pod of one attempt; of one rank of it for a multi-node job (`trainer-<attempt>-<rank>`)."""
    return child_name(kind, job, f"trainer-{attempt}" if rank is None else f"trainer-{attempt}-{rank}")


def gang_pod_names(kind: str, job: str, attempt: int, nodes: int) -> list[str]:
    """The pods of one attempt, by rank: one pod named as always for nodes == 1, else one per rank."""
    if nodes <= 1:
        return [pod_name(kind, job, attempt)]
    return [pod_name(kind, job, attempt, rank) for rank in range(nodes)]


def service_name(kind: str, job: str) -> str:
    """The headless Service of a multi-node job: its pods' DNS subdomain (`<host>.<service>`)."""
    return child_name(kind, job, "workers")


def worker_hostname(kind: str, job: str, rank: int) -> str:
    """A multi-node job's pod hostname for one rank: the same in every attempt, so rank 0's DNS name
    (`<hostname>.<service>`) does not change when the gang restarts (the old pods are gone by then)."""
    return child_name(kind, job, f"worker-{rank}")
