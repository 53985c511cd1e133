"""One planning pass: what status.plan() observed, the status it builds, and the actions policies share.

A :class:`Pass` is made from the job, its pods and its upstream jobs; each policy in
:mod:`rlhf_operator.policies` reads it and either edits it and lets the next policy decide, or ends
the pass (fail the job, start a trainer pod, wait) with :meth:`Pass.finish`. Nothing here talks to
the API: the reconciler executes the resulting :class:`Plan`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any

from rlhf_operator import names, progress
from rlhf_operator.conditions import Conditions, fmt_time, parse_time, phase_of
from rlhf_operator.crd_schema import DEFAULT_BACKOFF_LIMIT, KINDS
from rlhf_operator.observed import DepState, PodView
from rlhf_operator.patches import prune_empty
from rlhf_operator.policies import children, restart_backoff, resume_report, running_spec


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create_pod: tuple[int, int] | None = None  # (attempt, restart count)
    delete_pods: list[str] = dataclasses.field(default_factory=list)
    delete_job: bool = False
    requeue_at: dt.datetime | None = None
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, reason, message)
    restarted: bool = False
    claim_owned: bool | None = None  # set the claim's owner reference (True) or remove it (False)
    handoff_from: dt.datetime | None = None  # latest dependency completion, when the first pod starts
    # pod name -> the scheduling gates it keeps: a multi-node job's gang released together (policies.gang)
    release_pods: dict[str, list[str]] = dataclasses.field(default_factory=dict)


class Pass:
    """The state of one plan() call. `scraped`: fresh trainer progress (status.progress keys)."""

    def __init__(self, job: dict[str, Any], pods: list[PodView], deps: list[DepState], now: dt.datetime,
                 invalid: str | None = None, scraped: dict[str, Any] | None = None, cycle: str | None = None,
                 observed: children.Observed | None = None,
                 backoff_base: float = restart_backoff.DEFAULT_BASE_SECONDS):
        self.job, self.meta, self.spec = job, job["metadata"], job.get("spec") or {}
        self.kind, self.name, self.uid = job["kind"], self.meta["name"], self.meta.get("uid", "")
        self.old = job.get("status") or {}
        self.st = copy.deepcopy(self.old)
        self.now, self.stamp, self.generation = now, fmt_time(now), self.meta.get("generation")
        self.conds = Conditions(self.st.get("conditions"), self.stamp, self.generation)
        self.plan = Plan(status=self.st)
        self.deps, self.invalid, self.cycle, self.observed = deps, invalid, cycle, observed
        self.backoff_base = backoff_base
        self.own = [x for x in pods if x.owner_uid == self.uid]
        self.active = [x.name for x in self.own if not x.deleting and x.phase in ("Pending", "Running", "Unknown")]
        self.claim_name = names.pvc_name(self.kind, self.name)
        self.retain_policy = (self.spec.get("checkpoint") or {}).get("retainPolicy", "Retain")
        self.own_claim = observed.claim if observed else None
        self.claim_check: tuple[str, str, str] | None = None  # policies.claim_loss
        self.in_run = running_spec.in_run(self.old)  # a run whose spec is recorded goes on
        # pods per attempt (spec.resources.nodes) of the run in progress, else of the next one
        run_spec = self.old["runningSpec"] if self.in_run else self.spec
        self.nodes = int((run_spec.get("resources") or {}).get("nodes", 1) or 1)
        self.resuming = self.conds.is_true("Suspended")
        self.stage = KINDS[self.kind].stage
        # The current attempt, set by policies.restart.count (after the checks that may end the pass first).
        self.restarts, self.backoff, self.next_attempt = 0, DEFAULT_BACKOFF_LIMIT, 0
        self.current, self.pod = "", None
        self.st["observedGeneration"] = self.generation
        progress.merge_into(self.st, progress.for_stage(scraped or {}, self.stage))

    # --- ending the pass -------------------------------------------------------------------------
    def finish(self) -> Plan:
        st, p = self.st, self.plan
        st["conditions"] = self.conds.items
        st["phase"] = phase_of(self.conds)
        p.status = prune_empty(st)
        p.events.extend(self.conds.events())
        if reported := resume_report.event(self.old.get("progress"), st.get("progress"), st.get("trainerPod", "")):
            p.events.append(reported)
        return p

    def fail(self, reason: str, message: str) -> Plan:
        self.conds.set("Failed", True, reason, message)
        self.conds.clear("Running", reason, "the job failed")
        self.conds.clear("Restarting", reason, "the job failed")
        self.st["completionTime"] = fmt_time(self.now, precise=True)
        self.st["trainerPod"] = ""
        self.st.pop("nextAttemptTime", None)
        self.plan.delete_pods = self.active
        return self.finish()

    def announce(self, ctype: str, kind: str, reason: str, message: str) -> None:
        """An Event for a condition's new message, unless its transition makes one already."""
        if not any(t[0] == ctype for t in self.conds.transitions):
            self.plan.events.append((kind, reason, message))

    def requeue(self, due: dt.datetime) -> None:
        self.plan.requeue_at = min(self.plan.requeue_at or due, due)

    # --- starting a trainer pod ------------------------------------------------------------------
    def inputs_lost(self) -> str:
        """Why a (re)started trainer could not read its inputs ('' when it can); checked before every start."""
        if self.observed is None:
            return ""
        return children.lost_input(self.deps, self.old.get("dependencies") or [], self.observed.inputs)

    def start(self, attempt: int, restart_count: int) -> None:
        st, conds, generation = self.st, self.conds, self.generation
        self.plan.create_pod = (attempt, restart_count)
        nodes = self.nodes
        name = names.gang_pod_names(self.kind, self.name, attempt, nodes)[0]  # a gang's: rank 0 (it reports)
        if nodes > 1:
            st["gang"] = {"attempt": attempt, "size": nodes, "ready": 0, "summary": f"0/{nodes}"}
        else:
            st.pop("gang", None)
        st.update(attempt=attempt, trainerPod=name, restartCount=restart_count)
        st.pop("nextAttemptTime", None)
        (st.get("progress") or {}).pop(resume_report.KEY, None)  # the new pod reports its own
        if not self.in_run:  # a new run takes the spec as it is now
            st.update(runningSpec=running_spec.snapshot(self.spec), runningGeneration=generation)
            conds.clear("SpecChangeRefused", "SpecApplied", f"pod {name} runs the spec of generation {generation}")
        if not st.get("checkpoint", {}).get("claim"):
            st.setdefault("checkpoint", {}).update(claim=self.claim_name, retainPolicy=self.retain_policy)
        if self.resuming or not st.get("startTime"):
            st["startTime"] = self.stamp
        if not conds.is_true("Created"):
            config = names.configmap_name(self.kind, self.name)
            conds.set("Created", True, "TrainerPodCreated",
                      f"created claim {self.claim_name}, config {config} and pod {name}")
        if self.resuming:
            conds.set("Suspended", False, "JobResumed", f"resumed with pod {name}")
        if attempt == 0 and self.deps:
            times = [parse_time(d.completion_time) for d in self.deps if d.completion_time]
            self.plan.handoff_from = max(times) if times else None
