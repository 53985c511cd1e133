"""The job's status, computed from what is observed: a pure function of (job, pods, dependencies).

:func:`plan` returns the new status and the actions that bring the children in line (create the
next trainer pod, delete pods, delete the finished job). It never talks to the API, so every
transition is unit-tested; the reconciler executes the plan. Conditions follow the Kubernetes API
conventions: keyed by type, lastTransitionTime kept while the status does not change, and the
terminal ones (Succeeded, Failed) never revert.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
from typing import Any

from rlhf_trainer import config as tc
from rlhf_trainer import contract

from rlhf_operator import builders, names
from rlhf_operator.crd_schema import DEFAULT_BACKOFF_LIMIT, KINDS
from rlhf_operator.policies import children as child_policy
from rlhf_operator.policies import disruption, oom, restart_backoff, resume_report, running_spec

EXIT_REASONS = {
    contract.EXIT_CONFIG_ERROR: "InvalidConfig",
    contract.EXIT_DATA_ERROR: "DataError",
    contract.EXIT_MODEL_ERROR: "ModelError",
    contract.EXIT_CHECKPOINT_ERROR: "CheckpointInvalid",
}
WARNING_TRANSITIONS = {("Failed", "True"), ("Restarting", "True"), ("PodScheduled", "False"), ("SpecChangeRefused", "True")}
# Transitions worth an Event besides every condition becoming True (PodScheduled=True is the pod's own event).
EVENT_FALSE_TRANSITIONS = {"PodScheduled", "Suspended", "WaitingForDependencies", "SpecChangeRefused"}
# status.progress keys that mean something for each stage.
STAGE_PROGRESS = {
    "sft": {"step", "totalSteps", "loss", "checkpointStep", "resumedFromStep"},
    "reward": {"step", "totalSteps", "loss", "accuracy", "checkpointStep", "resumedFromStep"},
    "ppo": {"step", "totalSteps", "loss", "reward", "kl", "checkpointStep", "resumedFromStep"},
}
TERMINAL = ("Succeeded", "Failed")


def fmt_time(t: dt.datetime, precise: bool = False) -> str:
    t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


# --- observed pods ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PodView:
    """What the planner needs to know about one trainer pod."""

    name: str
    attempt: int
    owner_uid: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    deleting: bool = False
    restart_count: int = 0
    pod_ip: str = ""
    exit_code: int | None = None
    reason: str = ""  # terminated reason (Error, OOMKilled) or pod reason (Evicted)
    message: str = ""  # termination message
    unschedulable: str = ""  # the scheduler's message while the pod cannot be placed
    scheduled: bool = False
    pod_reason: str = ""  # status.reason of the pod itself (Evicted, Preempting, Shutdown, NodeLost)
    pod_message: str = ""
    disruption: str = ""  # "reason: message" of a DisruptionTarget=True condition
    finished_at: str = ""  # when the trainer container terminated


def pod_view(pod: dict[str, Any]) -> PodView:
    meta, spec_status = pod.get("metadata") or {}, pod.get("status") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    owners = [o.get("uid", "") for o in meta.get("ownerReferences") or [] if o.get("controller")]
    exit_code, reason, message = None, spec_status.get("reason", ""), spec_status.get("message", "")
    finished_at = ""
    for cs in spec_status.get("containerStatuses") or []:
        if cs.get("name") != builders.CONTAINER:
            continue
        term = (cs.get("state") or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            reason = term.get("reason") or reason
            message = (term.get("message") or message or "").strip()
            finished_at = term.get("finishedAt") or ""
    unschedulable, scheduled, disrupted = "", False, ""
    for cond in spec_status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disrupted = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x) or "DisruptionTarget"
        if cond.get("type") == "PodScheduled":
            scheduled = cond.get("status") == "True"
            if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                unschedulable = cond.get("message") or "the scheduler found no node for the pod"
    try:
        attempt = int(labels.get(builders.LABEL_ATTEMPT, "0"))
        restarts = int(ann.get(builders.ANN_RESTART_COUNT, "0"))
    except ValueError:
        attempt, restarts = 0, 0
    return PodView(
        name=meta.get("name", ""),
        attempt=attempt,
        owner_uid=owners[0] if owners else "",
        phase=spec_status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        restart_count=restarts,
        pod_ip=spec_status.get("podIP") or "",
        exit_code=exit_code,
        reason=reason or "",
        message=message or "",
        unschedulable=unschedulable,
        scheduled=scheduled,
        pod_reason=spec_status.get("reason") or "",
        pod_message=spec_status.get("message") or "",
        disruption=disrupted,
        finished_at=finished_at,
    )


@dataclasses.dataclass(frozen=True)
class DepState:
    """An upstream job as seen now."""

    roles: tuple[str, ...]
    kind: str
    name: str
    exists: bool
    uid: str = ""
    phase: str = ""
    message: str = ""
    claim: str = ""
    completion_time: str = ""


# --- conditions ---------------------------------------------------------------------------

class Conditions:
    """Edits a status.conditions list, remembering transitions (for Events)."""

    def __init__(self, items: list[dict[str, Any]] | None, now: str, generation: int | None):
        self.items = [dict(c) for c in items or []]
        self.now, self.generation = now, generation
        self.transitions: list[tuple[str, str, str, str]] = []  # (type, status, reason, message)

    def get(self, ctype: str) -> dict[str, Any] | None:
        return next((c for c in self.items if c.get("type") == ctype), None)

    def is_true(self, ctype: str) -> bool:
        c = self.get(ctype)
        return bool(c and c.get("status") == "True")

    def set(self, ctype: str, status: bool, reason: str, message: str) -> None:
        value = "True" if status else "False"
        c = self.get(ctype)
        if c is None:
            c = {"type": ctype}
            self.items.append(c)
        if c.get("status") != value:
            c["lastTransitionTime"] = self.now
            self.transitions.append((ctype, value, reason, message))
        c.update(status=value, reason=reason, message=message, observedGeneration=self.generation)

    def clear(self, ctype: str, reason: str, message: str) -> None:
        """Set False only if the condition was ever set (keeps the list short)."""
        if self.get(ctype) is not None:
            self.set(ctype, False, reason, message)


# --- the plan -----------------------------------------------------------------------------

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


def phase_of(conds: Conditions) -> str:
    for ctype, phase in (("Failed", "Failed"), ("Succeeded", "Succeeded"), ("Suspended", "Suspended"),
                         ("WaitingForDependencies", "Waiting"), ("Restarting", "Restarting"), ("Running", "Running")):
        if conds.is_true(ctype):
            return phase
    return "Pending"


def with_summary(progress: dict[str, Any]) -> dict[str, Any]:
    out = dict(progress)
    step, total = out.get("step"), out.get("totalSteps")
    if step is not None and total:
        out["percent"] = round(100.0 * min(step, total) / total, 1)
        out["summary"] = f"{step}/{total}"
    elif step is not None:
        out["summary"] = str(step)
    return out


def plan(
    job: dict[str, Any],
    pods: list[PodView],
    deps: list[DepState],
    now: dt.datetime,
    invalid: str | None = None,
    progress: dict[str, Any] | None = None,
    cycle: str | None = None,
    observed: child_policy.Observed | None = None,
    backoff_base: float = restart_backoff.DEFAULT_BASE_SECONDS,
) -> Plan:
    """Compute the next status and actions. `invalid` is a spec error found before planning;
    `progress` is freshly scraped trainer progress (status.progress keys); `cycle` describes a
    dependency cycle through this job (dependencies.cycle_message); `observed`: the job's claims
    and its inputs' claims as seen now (policies.children); `backoff_base`: seconds before the first
    restart after a failure (policies.restart_backoff)."""
    meta, spec = job["metadata"], job.get("spec") or {}
    old = job.get("status") or {}
    st = copy.deepcopy(old)
    stamp = fmt_time(now)
    conds = Conditions(st.get("conditions"), stamp, meta.get("generation"))
    p = Plan(status=st)
    own = [x for x in pods if x.owner_uid == meta.get("uid")]
    active = [x.name for x in own if not x.deleting and x.phase in ("Pending", "Running", "Unknown")]
    st["observedGeneration"] = meta.get("generation")
    keys = STAGE_PROGRESS[KINDS[job["kind"]].stage]
    progress = {k: v for k, v in (progress or {}).items() if k in keys}
    if progress:
        st["progress"] = with_summary({**st.get("progress", {}), **progress})
        if progress.get("checkpointStep") is not None:
            st.setdefault("checkpoint", {})["latestStep"] = progress["checkpointStep"]

    def finish() -> Plan:
        st["conditions"] = conds.items
        st["phase"] = phase_of(conds)
        p.status = prune_empty(st)
        for ctype, value, reason, message in conds.transitions:
            if (value == "True" and ctype != "PodScheduled") or (value == "False" and ctype in EVENT_FALSE_TRANSITIONS):
                kind = "Warning" if (ctype, value) in WARNING_TRANSITIONS else "Normal"
                p.events.append((kind, reason, message))
        if reported := resume_report.event(old.get("progress"), st.get("progress"), st.get("trainerPod", "")):
            p.events.append(reported)
        return p

    def announce(ctype: str, kind: str, reason: str, message: str) -> None:
        """An Event for a condition's new message, unless its transition makes one already."""
        if not any(t[0] == ctype for t in conds.transitions):
            p.events.append((kind, reason, message))

    def fail(reason: str, message: str) -> Plan:
        conds.set("Failed", True, reason, message)
        conds.clear("Running", reason, "the job failed")
        conds.clear("Restarting", reason, "the job failed")
        st["completionTime"] = fmt_time(now, precise=True)
        st["trainerPod"] = ""
        st.pop("nextAttemptTime", None)
        p.delete_pods = active
        return finish()

    # spec.checkpoint.retainPolicy may change at any time; the claim follows it.
    policy = (spec.get("checkpoint") or {}).get("retainPolicy", "Retain")
    cp = st.get("checkpoint") or {}
    own_claim = observed.claim if observed else None
    claim_ours = child_policy.owns_claim(own_claim, meta.get("uid", ""))  # never own a claim it did not create
    if cp.get("claim") and cp.get("retainPolicy", "Retain") != policy and claim_ours:
        p.claim_owned = policy == "Delete"
        cp["retainPolicy"] = policy

    # Finished jobs only wait for their TTL.
    if conds.is_true("Succeeded") or conds.is_true("Failed"):
        p.delete_pods = active  # e.g. a pod that outlived a deadline failure
        ttl, done = spec.get("ttlSecondsAfterFinished"), parse_time(st.get("completionTime"))
        if ttl is not None and done is not None:
            due = done + dt.timedelta(seconds=ttl)
            if now >= due:
                p.delete_job = True
            else:
                p.requeue_at = due
        return finish()

    if invalid:
        return fail("InvalidSpec", invalid)
    if observed and observed.conflict:
        return fail("ChildNameConflict", observed.conflict)
    claim_check = child_policy.claim_verdict(
        job["kind"], meta["name"], meta.get("uid", ""), bool(cp.get("claim")), own_claim,
        (spec.get("checkpoint") or {}).get("onClaimLoss", "Fail"))
    if claim_check and claim_check[0] == "fail":
        return fail(claim_check[1], claim_check[2])

    started = st.get("attempt") is not None or bool(own)
    if cycle and not started:
        return fail("DependencyCycle", cycle)
    if not started and deps:
        recorded = {(d.get("kind"), d.get("name")): d for d in old.get("dependencies") or []}
        waiting: list[str] = []
        seen: list[dict[str, Any]] = []
        for d in deps:
            rec = recorded.get((d.kind, d.name)) or {}
            label = f"{d.kind} {d.name} ({' and '.join(d.roles)})"
            if not d.exists and rec.get("uid"):
                return fail("DependencyDeleted", f"{label} was deleted before this job could start; recreate it or change spec.{d.roles[0]}")
            if d.exists and rec.get("uid") and rec["uid"] != d.uid:
                return fail("DependencyDeleted", f"{label} was deleted and created again; this job will not use a different run's output")
            if d.exists and d.phase == "Failed":
                why = f": {d.message}" if d.message else ""
                return fail("DependencyFailed", f"{label} failed{why}")
            if not d.exists:
                waiting.append(f"{d.kind} {d.name} (not found)")
            elif d.phase != "Succeeded":
                waiting.append(f"{d.kind} {d.name} ({d.phase or 'Pending'})")
            seen.append({"role": " ".join(d.roles), "kind": d.kind, "name": d.name, "uid": d.uid or rec.get("uid", ""),
                         "phase": d.phase if d.exists else "NotFound"})
        st["dependencies"] = seen
        if waiting:
            conds.set("WaitingForDependencies", True, "DependenciesNotReady", "waiting for " + ", ".join(waiting))
            return finish()
        conds.set("WaitingForDependencies", False, "DependenciesSucceeded",
                  "upstream jobs succeeded: " + ", ".join(f"{d.kind} {d.name}" for d in deps))

    if spec.get("suspend"):
        p.delete_pods = active
        conds.set("Suspended", True, "JobSuspended", "spec.suspend is true: trainer pod stopped, checkpoints kept")
        conds.clear("Running", "JobSuspended", "the job is suspended")
        conds.clear("Restarting", "JobSuspended", "the job is suspended")
        conds.clear("PodScheduled", "JobSuspended", "the job is suspended")
        conds.clear("SpecChangeRefused", "JobSuspended", "the job is suspended: spec changes apply when it resumes")
        st["trainerPod"] = ""
        st.pop("nextAttemptTime", None)
        return finish()
    resuming = conds.is_true("Suspended")

    # A run keeps the spec it started with; edits of fields it cannot take are refused (policies.running_spec).
    generation = meta.get("generation")
    in_run = running_spec.in_run(old)
    refused = running_spec.refused_fields(old["runningSpec"], spec) if in_run else []
    if refused:
        conds.set("SpecChangeRefused", True, "ImmutableWhileRunning",
                  running_spec.refused_message(refused, generation, old.get("runningGeneration")))
    elif in_run:
        st.update(runningSpec=running_spec.snapshot(spec), runningGeneration=generation)
        conds.clear("SpecChangeRefused", "SpecMatchesRun", f"the trainer runs the current spec (generation {generation})")

    deadline = spec.get("activeDeadlineSeconds")
    started_at = parse_time(st.get("startTime"))
    if deadline and started_at and not resuming:
        due = started_at + dt.timedelta(seconds=deadline)
        if now >= due:
            return fail("DeadlineExceeded", f"the job ran longer than spec.activeDeadlineSeconds ({deadline}s)")
        p.requeue_at = due

    # Pods newer than the recorded attempt were made by a pass whose status write was lost; the
    # same pass is planned again below (same name: the create is answered 409 and adopts it).
    last_attempt = st["attempt"] if st.get("attempt") is not None else -1
    restarts = max([st.get("restartCount") or 0] + [x.restart_count for x in own if x.attempt <= last_attempt])
    st["restartCount"] = restarts
    backoff = spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)
    current = st.get("trainerPod") or ""
    pod = next((x for x in own if x.name == current), None)
    next_attempt = 0 if st.get("attempt") is None else st["attempt"] + 1

    claim_name = names.pvc_name(job["kind"], meta["name"])

    def inputs_lost() -> str:  # checked whenever a pod is to be (re)started
        return child_policy.lost_input(deps, old.get("dependencies") or [], observed.inputs) if observed else ""

    def start(attempt: int, restart_count: int) -> None:
        p.create_pod = (attempt, restart_count)
        name = names.pod_name(job["kind"], meta["name"], attempt)
        st.update(attempt=attempt, trainerPod=name, restartCount=restart_count)
        st.pop("nextAttemptTime", None)
        (st.get("progress") or {}).pop(resume_report.KEY, None)  # the new pod reports its own
        if not in_run:  # a new run takes the spec as it is now
            st.update(runningSpec=running_spec.snapshot(spec), runningGeneration=generation)
            conds.clear("SpecChangeRefused", "SpecApplied", f"pod {name} runs the spec of generation {generation}")
        if not st.get("checkpoint", {}).get("claim"):
            st.setdefault("checkpoint", {}).update(claim=claim_name, retainPolicy=policy)
        if resuming or not st.get("startTime"):
            st["startTime"] = stamp
        if not conds.is_true("Created"):
            conds.set("Created", True, "TrainerPodCreated",
                      f"created claim {claim_name}, config {names.configmap_name(job['kind'], meta['name'])} and pod {name}")
        if resuming:
            conds.set("Suspended", False, "JobResumed", f"resumed with pod {name}")
        if attempt == 0 and deps:
            times = [parse_time(d.completion_time) for d in deps if d.completion_time]
            p.handoff_from = max(times) if times else None

    def replace(why: str, exit_code: int | None, failed_at: str = "") -> Plan:
        if exit_code in contract.PERMANENT_EXIT_CODES:
            return fail(EXIT_REASONS[exit_code], f"{why}; this error is permanent, fix the spec or the inputs")
        if restarts >= backoff:
            return fail("BackoffLimitExceeded", f"{why}; spec.backoffLimit ({backoff}) restarts used up")
        if lost := inputs_lost():
            return fail("DependencyDeleted", f"{why}; {lost}")
        n, wait = restarts + 1, restart_backoff.delay_seconds(restarts + 1, backoff_base)
        conds.clear("Running", "PodFailed", why)
        due = parse_time(st.get("nextAttemptTime"))
        if any(x.attempt == next_attempt for x in own):  # made by a pass whose status write was lost: adopt it
            due = now
        elif due is None:  # first sight of this failure: the back-off counts from the pod's end
            due = restart_backoff.next_attempt(parse_time(failed_at) or now, n, backoff_base)
            st["nextAttemptTime"] = fmt_time(due, precise=True)
        if now < due:
            conds.set("Restarting", True, "PodFailed",
                      f"{why}; restart {n} of {backoff} at {fmt_time(due)} (back-off {wait:g}s)")
            p.requeue_at = min(p.requeue_at or due, due)
            return finish()
        start(next_attempt, n)
        p.restarted = True
        conds.set("Restarting", True, "PodFailed", f"{why}; started {st['trainerPod']} (restart {n} of {backoff})")
        announce("Restarting", "Normal", "TrainerRestarted",
                 f"started {st['trainerPod']} (restart {n} of {backoff}) after a {wait:g}s back-off")
        return finish()

    def replace_disrupted(why: str) -> Plan:
        """A disruption (policies.disruption): a new pod at once, restarts not used."""
        if lost := inputs_lost():
            return fail("DependencyDeleted", f"{why}; {lost}")
        count = (st.get("disruptionCount") or 0) + 1
        st["disruptionCount"] = count
        start(next_attempt, restarts)
        message = disruption.announce(why, st["trainerPod"], count)
        conds.set("Restarting", True, "PodDisrupted", message)
        conds.clear("Running", "PodDisrupted", why)
        announce("Restarting", "Warning", "PodDisrupted", message)
        return finish()

    if claim_check:  # a claim in the way is going away, or (onClaimLoss StartOver) the job's own claim is
        p.delete_pods, soon = active, now + dt.timedelta(seconds=5)
        p.requeue_at = min(p.requeue_at or soon, soon)
        action, reason, message = claim_check
        if action == "wait":
            conds.set("Created", False, reason, message)
            return finish()
        conds.set("Restarting", True, reason, message)
        conds.clear("Running", reason, message)
        if not (own_claim and own_claim.exists) and not active and not any(x.deleting for x in own):
            st.pop("progress", None)
            st["checkpoint"] = {}  # start() records the new claim
            start(next_attempt, restarts)
            p.events.append(("Warning", reason, f"starting over from step 0 with a new claim {claim_name} and pod {st['trainerPod']}"))
        return finish()
    if current and pod is None:
        if st.get("nextAttemptTime"):  # a failed pod removed while its replacement waits out the back-off
            return replace(f"trainer pod {current} failed (and was then removed)", None)
        return replace_disrupted(disruption.disruption(None, current) or "")
    if pod is None:
        # A stopping pod (suspend) may still be writing its SIGTERM checkpoint: start after it is gone.
        if not any(x.deleting for x in own):
            if lost := inputs_lost():
                return fail("DependencyDeleted", lost)
            start(next_attempt, restarts)
        return finish()
    if pod.deleting:
        return finish()

    if pod.phase == "Pending":
        if pod.unschedulable:
            conds.set("PodScheduled", False, "Unschedulable", f"pod {pod.name}: {pod.unschedulable}")
        elif pod.scheduled:
            conds.set("PodScheduled", True, "Scheduled", f"pod {pod.name} is bound to a node")
    elif pod.phase == "Running":
        conds.set("PodScheduled", True, "Scheduled", f"pod {pod.name} is bound to a node")
        conds.set("Running", True, "TrainerRunning", f"trainer pod {pod.name} is running")
        conds.clear("Restarting", "TrainerRunning", f"trainer pod {pod.name} is running")
    elif pod.phase == "Succeeded":
        final = {k: v for k, v in final_progress(pod.message).items() if k in keys}
        if final:
            st["progress"] = with_summary({**st.get("progress", {}), **final})
            if final.get("checkpointStep") is not None:
                st.setdefault("checkpoint", {})["latestStep"] = final["checkpointStep"]
        conds.set("Succeeded", True, "TrainingComplete", f"trainer pod {pod.name} finished; the model is in "
                  f"claim {claim_name} at {tc.FINAL_SUBDIR}/")
        conds.clear("Running", "TrainingComplete", "the trainer finished")
        conds.clear("Restarting", "TrainingComplete", "the trainer finished")
        st["completionTime"] = fmt_time(now, precise=True)
        st["output"] = {"claim": claim_name, "path": tc.FINAL_SUBDIR}
        return finish()
    elif pod.phase == "Failed":
        if disrupted := disruption.disruption(pod, pod.name):
            return replace_disrupted(disrupted)
        if oom.is_oom(pod):
            kept = (st.get("checkpoint") or {}).get("claim", claim_name) if policy == "Retain" else ""
            return fail(oom.REASON, oom.message(pod.name, pod.exit_code, spec, kept))
        code = f"exit code {pod.exit_code}" if pod.exit_code is not None else (pod.reason or "no exit code")
        detail = f" ({pod.reason})" if pod.reason and pod.exit_code is not None and pod.reason != "Error" else ""
        msg = f": {short_message(pod.message)}" if pod.message else ""
        return replace(f"trainer pod {pod.name} failed with {code}{detail}{msg}", pod.exit_code, pod.finished_at)
    return finish()


def short_message(text: str, lines: int = 3, limit: int = 800) -> str:
    """The end of a termination message (or of the log tail kubelet puts there): the last few
    non-empty lines, where the error usually is."""
    tail = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    out = " / ".join(tail)
    # Keep both ends: the head names the field (e.g. "model.init_from_config: ..."), the tail the detail.
    return out if len(out) <= limit else out[: limit // 2] + " ... " + out[-limit // 2:]


def prune_empty(obj: Any) -> Any:
    """Drop empty strings (and the emptied dicts) from a status: "unset" is an absent key, which
    keeps the status small (and the embedded 1.20 API server refuses "" in custom resources)."""
    if isinstance(obj, dict):
        out = {k: prune_empty(v) for k, v in obj.items() if v != "" and v is not None}
        return {k: v for k, v in out.items() if v != {}}
    if isinstance(obj, list):
        return [prune_empty(v) for v in obj]
    return obj


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns `old` into `new` (removed keys become null)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


def final_progress(message: str) -> dict[str, Any]:
    """Progress from a trainer's termination message, when it is the JSON object of final metric
    values (keyed by contract metric names) that the trainer writes on success."""
    try:
        data = json.loads(message) if message and message.lstrip().startswith("{") else None
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, metric in contract.PROGRESS_FIELDS.items():
        value = data.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = int(value) if key in ("step", "totalSteps", "checkpointStep", "resumedFromStep") else float(value)
    return out
