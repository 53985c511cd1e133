"""Level-triggered reconciliation of one job: observe, plan (pure), act, write status once.

Triggers come from the job's own watch events, its pods' events, its upstream jobs' events and a
periodic resync (progress scrape, deadlines, TTL). Triggers for a job that is being reconciled are
coalesced into one more pass, so a burst of pod events costs one or two passes, never a queue.
Observed pods, claims and upstream jobs come from kopf's in-memory indices (filled before any
handler runs, so a restarted operator sees every existing child first), with a GET where an index
may lag behind a fresh object. The job itself is the newest body seen (its watch events and the
answers to our own status writes, by resourceVersion): a GET only when neither has been seen.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import yaml
from rlhf_trainer.config import ConfigError, TrainerConfig

from rlhf_operator import builders, dependencies, jobspec, metrics, names, progress, queueing
from rlhf_operator import status as status_mod
from rlhf_operator.conditions import Conditions, fmt_time
from rlhf_operator.crd_schema import KINDS
from rlhf_operator.kube import ApiError, Kube, core_path
from rlhf_operator.observed import DepState, PodView, pod_view
from rlhf_operator.patches import merge_patch, prune_empty
from rlhf_operator.policies import children as child_policy
from rlhf_operator.policies import running_spec, status_rejection
from rlhf_operator.settings import Settings

log = logging.getLogger(__name__)
JobKey = tuple[str, str, str]  # (namespace, kind, name)
RETRY_SECONDS = 5.0


class Reconciler:
    def __init__(self, settings: Settings, kube: Kube | None = None):
        self.settings = settings
        self.kube = kube
        self.job_indices: dict[str, Any] = {}  # kind -> kopf.Index[(namespace, name)] of summaries
        self.pod_index: Any = None  # kopf.Index[(namespace, kind, job)] of PodView
        self.claim_index: Any = None  # kopf.Index[(namespace, kind, job)] of child_policy.ObjectView
        self.phases = metrics.PhaseTracker()
        self.seen_phases: dict[str, str] = {}  # uid -> phase in the job's latest watch event
        self.bodies: dict[JobKey, dict[str, Any]] = {}  # the newest body seen of each job (see remember)
        self.session: aiohttp.ClientSession | None = None
        self._active: set[JobKey] = set()
        self._again: dict[JobKey, bool] = {}  # key -> scrape requested
        self._wakeups: dict[JobKey, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._resync: asyncio.Task | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, indices: dict[str, Any]) -> None:
        self.kube = self.kube or Kube()
        self.job_indices = {kind: indices[f"{KINDS[kind].plural}_index"] for kind in KINDS}
        self.pod_index = indices["trainer_pods_index"]
        self.claim_index = indices.get("checkpoint_claims_index")
        self.session = aiohttp.ClientSession()
        self._resync = asyncio.create_task(self._resync_loop())

    async def stop(self) -> None:
        if self._resync:
            self._resync.cancel()
        for handle in self._wakeups.values():
            handle.cancel()
        if self.session:
            await self.session.close()

    def spawn(self, coro: Any) -> None:
        """Run in the background, keeping a reference (asyncio only keeps weak ones)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- index views -------------------------------------------------------------------------
    def lookup(self, namespace: str):
        def find(kind: str, name: str) -> dict[str, Any] | None:
            index = self.job_indices.get(kind)
            if index is None or (namespace, name) not in index:
                return None
            return next(iter(index[(namespace, name)]), None)
        return find

    def all_jobs(self) -> Iterator[dict[str, Any]]:
        for index in self.job_indices.values():
            for key in list(index):
                yield from list(index[key])

    def pods_of(self, namespace: str, kind: str, name: str) -> list[PodView]:
        key = (namespace, kind, name)
        if self.pod_index is None or key not in self.pod_index:
            return []
        return list(self.pod_index[key])

    async def claim_view(self, namespace: str, kind: str, job: str, claim: str,
                         fresh: bool) -> child_policy.ObjectView | None:
        """A job's claim from the index; with `fresh`, a GET when the index does not show it (it may lag)."""
        key = (namespace, kind, job)
        indexed = self.claim_index[key] if self.claim_index is not None and key in self.claim_index else []
        view = next((v for v in indexed if v.name == claim), None)
        if view is not None or not fresh:
            return view
        assert self.kube is not None
        obj = await self.kube.get("persistentvolumeclaims", namespace, claim)
        return child_policy.object_view(obj) if obj is not None else child_policy.missing(claim)

    async def observe_claims(self, job: dict[str, Any], deps: list[DepState], finished: bool) -> child_policy.Observed:
        """The job's own claim and its inputs' claims. A GET backs the index only where the answer
        matters: a claim the job recorded (lost?), or one whose ownership is about to change."""
        meta, kind, old = job["metadata"], job["kind"], job.get("status") or {}
        cp = old.get("checkpoint") or {}
        wanted = ((job.get("spec") or {}).get("checkpoint") or {}).get("retainPolicy", "Retain")
        policy_change = cp.get("retainPolicy", "Retain") != wanted
        claim = names.pvc_name(kind, meta["name"])
        view = await self.claim_view(meta["namespace"], kind, meta["name"], claim, False)
        if bool(cp.get("claim")) and (not finished or policy_change) and not child_policy.owns_claim(view, meta["uid"]):
            view = await self.claim_view(meta["namespace"], kind, meta["name"], claim, True)
        inputs = {}
        for d in deps:
            if d.claim and d.exists:
                found = await self.claim_view(meta["namespace"], d.kind, d.name, d.claim, True)
                if found is not None:
                    inputs[d.claim] = found
        return child_policy.Observed(claim=view, inputs=inputs)

    # --- triggers ----------------------------------------------------------------------------
    async def trigger(self, key: JobKey, scrape: bool = False) -> None:
        if key in self._active:
            self._again[key] = self._again.get(key, False) or scrape
            return
        self._active.add(key)
        try:
            again = True
            while again:
                try:
                    await self._reconcile(key, scrape)
                except Exception as e:  # keep the operator alive; retry this job soon
                    metrics.RECONCILE_ERRORS.labels(key[1]).inc()
                    log.exception("reconcile of %s %s/%s failed: %s", key[1], key[0], key[2], e)
                    self.wake_at(key, time.time() + RETRY_SECONDS)
                again = key in self._again
                scrape = self._again.pop(key, False)
        finally:
            self._active.discard(key)

    def wake_at(self, key: JobKey, when: float) -> None:
        """Reconcile again at a wall-clock time (deadlines, TTL, retries); keeps the earliest."""
        loop = asyncio.get_running_loop()
        old = self._wakeups.get(key)
        delay = max(0.0, when - time.time())
        if old is not None and old.when() <= loop.time() + delay:
            return
        if old is not None:
            old.cancel()
        self._wakeups[key] = loop.call_later(delay, self._wake, key)

    def _wake(self, key: JobKey) -> None:
        self._wakeups.pop(key, None)
        self.spawn(self.trigger(key))

    def trigger_dependents(self, namespace: str, kind: str, name: str) -> None:
        for key in dependencies.dependents(namespace, kind, name, self.all_jobs()):
            self.spawn(self.trigger(key))

    def remember(self, key: JobKey, body: dict[str, Any] | None) -> None:
        """Keep a job's body if it is at least as new as the one kept: from a watch event, or the answer to a
        status write (newer than any event before it). A pass reads it instead of GETting the job. None: the
        job is gone (a 404)."""
        if not body:
            self.bodies.pop(key, None)
            return
        old = self.bodies.get(key)
        if old is None or _resource_version(body) >= _resource_version(old):
            self.bodies[key] = body

    def forget(self, key: JobKey, uid: str = "") -> None:
        self.bodies.pop(key, None)
        handle = self._wakeups.pop(key, None)
        if handle:
            handle.cancel()
        if uid:
            self.phases.remove(uid)
            self.seen_phases.pop(uid, None)

    # --- watch events (handlers.py only routes them here) -----------------------------------------
    async def on_job_event(self, kind: str, event: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        """A job's watch event. Its phase feeds the jobs gauge and wakes the jobs waiting for it; a pass
        only for first sight and new specs (our own status writes come back as events too)."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        namespace, name, uid = meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", "")
        key = (namespace, kind, name)
        if event.get("type") == "DELETED":
            self.forget(key, uid)
            self.trigger_dependents(namespace, kind, name)
            return
        self.remember(key, copy.deepcopy(dict(body)))
        phase = status.get("phase", "")
        self.phases.update(uid, kind, phase)
        if self.seen_phases.get(uid) != phase:
            self.seen_phases[uid] = phase
            self.trigger_dependents(namespace, kind, name)  # they wait for this job, or must fail
            if phase in ("Succeeded", "Failed", "Suspended"):  # its stopped pods may be held by Kueue
                self.release_queue_holds(key, self.pods_of(namespace, kind, name))
        if event.get("type") in (None, "ADDED") or status.get("observedGeneration") != meta.get("generation"):
            await self.trigger(key)

    async def on_pod_event(self, body: Mapping[str, Any]) -> None:
        """Any change of a trainer pod: a pass of its job (and Kueue's hold lifted where nothing replaces it)."""
        if key := _child_job(body):
            self.release_queue_holds(key, [pod_view(dict(body))])
            await self.trigger(key)

    def release_queue_holds(self, key: JobKey, pods: list[PodView]) -> None:
        """Take Kueue's finalizer off stopped pods that no replacement will follow (queueing.release_hold)."""
        namespace, kind, name = key
        job = self.lookup(namespace)(kind, name)
        attempt = ((self.bodies.get(key) or {}).get("status") or {}).get("attempt")
        for pod in pods:
            if queueing.release_hold(pod, job, attempt):
                self.spawn(self._remove_finalizer(namespace, pod.name))

    async def _remove_finalizer(self, namespace: str, pod: str) -> None:
        assert self.kube is not None
        obj = await self.kube.get("pods", namespace, pod)
        held = ((obj or {}).get("metadata") or {}).get("finalizers") or []
        if queueing.FINALIZER in held:  # a JSON patch that removes exactly that entry, or fails if it moved
            i = held.index(queueing.FINALIZER)
            ops = [{"op": "test", "path": f"/metadata/finalizers/{i}", "value": queueing.FINALIZER},
                   {"op": "remove", "path": f"/metadata/finalizers/{i}"}]
            await self.kube.request("PATCH", core_path("pods", namespace, pod), ops, "application/json-patch+json",
                                    ok=(404, 409, 422))

    async def on_claim_event(self, event: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        """A checkpoint claim going away: a pass of its job and of the jobs reading it."""
        key = _child_job(body)
        if key and (event.get("type") == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp")):
            self.trigger_dependents(*key)
            await self.trigger(key)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for job in list(self.all_jobs()):
                if job["phase"] in ("Succeeded", "Failed") and job["ttl"] is None:
                    continue
                self.spawn(self.trigger((job["namespace"], job["kind"], job["name"]), scrape=True))

    # --- one pass ----------------------------------------------------------------------------
    async def _reconcile(self, key: JobKey, scrape: bool) -> None:
        namespace, kind, name = key
        started = time.perf_counter()
        assert self.kube is not None
        if scrape or key not in self.bodies:  # resync passes read fresh: a deletion the watch missed ends here
            self.remember(key, await self.kube.get_job(kind, namespace, name))
            if key not in self.bodies:
                self.forget(key)
                return
        job = copy.deepcopy(self.bodies[key])
        job["kind"] = kind
        spec, old = job.get("spec") or {}, job.get("status") or {}
        run_job = job  # what the pods are built from: a run keeps its spec (policies.running_spec)
        if running_spec.in_run(old):
            run_job = {**job, "spec": running_spec.effective_spec(old["runningSpec"], spec)}
        finished = old.get("phase") in ("Succeeded", "Failed")
        deps: list[DepState] = []
        invalid, cycle, cfg, mounts = None, None, None, []
        if not finished:
            deps = dependencies.resolve(kind, spec, self.lookup(namespace))
            loop = dependencies.cycle(kind, name, spec, self.lookup(namespace)) if old.get("attempt") is None else None
            cycle = dependencies.cycle_message(loop) if loop else None
            errors = jobspec.check(kind, name, run_job["spec"], self.settings)
            if not errors:
                try:
                    cfg, mounts = builders.render_config(run_job, self.settings)
                except ConfigError as e:
                    errors = [str(e)]
            invalid = "; ".join(errors) or None

        pods = self.pods_of(namespace, kind, name)
        current = old.get("trainerPod")
        if current and not finished:  # the current attempt's pods (a gang's: every rank)
            nodes = builders.nodes_of(run_job.get("spec") or {})
            wanted = names.gang_pod_names(kind, name, old.get("attempt") or 0, nodes) if nodes > 1 else [current]
            for missing in [w for w in wanted if w not in {p.name for p in pods}]:
                obj = await self.kube.get("pods", namespace, missing)  # the index may lag behind a fresh pod
                if obj is not None:
                    pods.append(pod_view(obj))

        scraped = None
        if scrape and not finished and self.session is not None:
            running = next((p for p in pods if p.name == current and p.phase == "Running" and p.pod_ip), None)
            if running is not None:
                scraped = await progress.scrape(self.session, running.pod_ip, self.settings.trainer_metrics_port)

        observed = await self.observe_claims(job, deps, finished)
        now, backoff = dt.datetime.now(dt.UTC), self.settings.restart_backoff_seconds
        p = status_mod.plan(job, pods, deps, now, invalid, scraped, cycle, observed, backoff)
        # A gang's pods are stopped and released together: one round trip, not one per pod.
        await asyncio.gather(*(self.kube.delete("pods", namespace, pod) for pod in p.delete_pods))
        gated = {x.name: x.gates for x in pods if builders.GANG_GATE in x.gates}
        await asyncio.gather(*(  # a gang starts together (policies.gang); a 422 = gone or moved: the next pass sees
            self.kube.remove_scheduling_gate(namespace, pod, builders.GANG_GATE, gated[pod].index(builders.GANG_GATE))
            for pod in p.release_pods if pod in gated))
        if p.create_pod is not None:
            made = await self._create_children(run_job, p, _config_yaml(cfg), mounts, now)
            if made is False:
                return
            if isinstance(made, str):  # an object under a child's name that is not the job's: fail, touch nothing
                observed = child_policy.Observed(observed.claim, observed.inputs, conflict=made)
                p = status_mod.plan(job, pods, deps, now, invalid, scraped, cycle, observed, backoff)
                for pod in p.delete_pods:
                    await self.kube.delete("pods", namespace, pod)
        if p.claim_owned is not None:
            owners = [builders.owner_reference(job)] if p.claim_owned else None
            claim = names.pvc_name(kind, name)
            await self.kube.patch("persistentvolumeclaims", namespace, claim, {"metadata": {"ownerReferences": owners}})
        new = p.status
        if new.get("progress") and new["progress"] != old.get("progress"):
            new["progress"]["updateTime"] = fmt_time(now)
        await self._write_status(job, old, new, now)
        for type_, reason, message in p.events:
            self.spawn(self.kube.post_event(job, type_, reason, message))
        self.phases.update(job["metadata"]["uid"], kind, new.get("phase", ""))
        if p.delete_job:
            log.info("deleting %s %s/%s: ttlSecondsAfterFinished passed", kind, namespace, name)
            await self.kube.delete_job(kind, namespace, name, job["metadata"]["uid"])
        elif p.requeue_at is not None:
            self.wake_at(key, p.requeue_at.timestamp())
        metrics.RECONCILES.labels(kind).inc()
        metrics.RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

    async def _write_status(self, job: dict[str, Any], old: dict[str, Any], new: dict[str, Any],
                            now: dt.datetime) -> None:
        """Merge-patch the planned status. A 422 (a value the schema refuses) must not lock the status: write it
        again without the refused fields, then (last resort) phase and conditions alone (policies.status_rejection)."""
        assert self.kube is not None
        kind, meta = job["kind"], job["metadata"]
        namespace, name, stamp, gen = meta["namespace"], meta["name"], fmt_time(now), meta.get("generation")
        patch = merge_patch(old, status_rejection.accepted(new, stamp, gen))
        if not patch:
            return
        key = (namespace, kind, name)
        try:
            self.remember(key, await self.kube.patch_job_status(kind, namespace, name, patch))
            return
        except ApiError as e:
            if e.status != 422:
                raise
            refused = e.body
        trimmed, message = status_rejection.trimmed(new, refused, stamp, gen)
        log.warning("%s %s/%s: %s", kind, namespace, name, message)
        before = next((c for c in old.get("conditions") or [] if c.get("type") == status_rejection.CONDITION), {})
        if before.get("status") != "True" or before.get("message") != message:
            self.spawn(self.kube.post_event(job, "Warning", "StatusRejected", message))
        patch = merge_patch(old, trimmed)
        try:
            if patch:
                self.remember(key, await self.kube.patch_job_status(kind, namespace, name, patch))
        except ApiError as e:
            if e.status != 422:
                raise
            log.error("%s %s/%s: status refused again (%s); writing phase and conditions only",
                      kind, namespace, name, e)
            self.remember(key, await self.kube.patch_job_status(kind, namespace, name, {
                "phase": trimmed.get("phase"), "conditions": trimmed.get("conditions")}))

    async def _create_children(self, job: dict[str, Any], p: status_mod.Plan, config_yaml: str,
                               mounts: list[builders.Mount], now: dt.datetime) -> bool | str:
        """Claim and config map of the planned attempt (at once), then its pods (at once: a gang of N pods costs
        one round trip, not N). The pods come only after both: a pod must never mount a claim or config map that
        is not the job's. An object already under a child's name is used only if the job created it; else the
        answer is why not (a conflict: the job fails), or False while it is on its way out. On an API error, or
        while waiting, the job keeps its old status plus a Created=False condition, and is retried."""
        assert self.kube is not None and p.create_pod is not None
        kind, meta = job["kind"], job["metadata"]
        pods = self._pods_of_attempt(job, p, config_yaml, mounts)
        cm = builders.build_configmap(job, config_yaml)
        try:
            first = [("persistentvolumeclaims", "claim", builders.build_pvc(job, self.settings)),
                     ("configmaps", "config map", cm)]
            if len(pods) > 1:  # a gang's DNS names: rank 0 is the rendezvous
                first.append(("services", "service", builders.build_service(job)))
            for batch in (first, [("pods", "pod", pod) for pod in pods]):
                answers = await asyncio.gather(*(self._ensure_child(job, r, what, obj, cm) for r, what, obj in batch))
                for state, why in answers:
                    if state == child_policy.CONFLICT:
                        return why
                    if state == child_policy.WAIT:
                        return await self._not_created(job, now, "ChildNameInUse", why)
        except ApiError as e:
            return await self._not_created(job, now, "CreateFailed", str(e))
        if any(state == "created" for state, _ in answers):
            log.info("created pod %s/%s", meta["namespace"], ", ".join(pod["metadata"]["name"] for pod in pods))
            if p.restarted:
                metrics.POD_RESTARTS.labels(kind).inc()
            if p.handoff_from is not None:
                waited = dt.datetime.now(dt.UTC) - p.handoff_from
                metrics.HANDOFF_SECONDS.labels(kind).observe(max(0.0, waited.total_seconds()))
        return True

    def _pods_of_attempt(self, job: dict[str, Any], p: status_mod.Plan, config_yaml: str,
                         mounts: list[builders.Mount]) -> list[dict[str, Any]]:
        """The planned attempt's pods, each with the job's Kueue labels when it names a queue (queueing.py)."""
        assert p.create_pod is not None
        attempt, restarts = p.create_pod
        pods = builders.build_pods(job, self.settings, attempt, restarts, builders.config_hash(config_yaml), mounts)
        return [queueing.apply(job, pod) for pod in pods]

    async def _ensure_child(self, job: dict[str, Any], resource: str, what: str, obj: dict[str, Any],
                            cm: dict[str, Any]) -> tuple[str, str]:
        """Create one child: ("created", ""), ("ours", "") when the job's own is there already, else the
        ownership state and why (policies.children)."""
        assert self.kube is not None
        kind, meta = job["kind"], job["metadata"]
        existing = await self.kube.create(resource, obj)
        if existing is None:
            return "created", ""
        view = child_policy.object_view(existing) if existing else child_policy.missing(obj["metadata"]["name"])
        by_label = resource == "persistentvolumeclaims"  # a retained claim has no owner reference
        state, why = child_policy.ownership(view, what, kind, meta["name"], meta["uid"], by_label=by_label)
        if not existing or (state == child_policy.OURS and view.deleting):
            state, why = child_policy.WAIT, f"{what} {view.name} is being deleted; waiting for it to go"
        if state == child_policy.OURS and resource == "configmaps" and existing.get("data") != cm["data"]:
            # the spec changed while the job was suspended
            await self.kube.patch("configmaps", meta["namespace"], view.name, {"data": cm["data"]})
        return state, why

    async def _not_created(self, job: dict[str, Any], now: dt.datetime, reason: str, message: str) -> bool:
        assert self.kube is not None
        kind, meta = job["kind"], job["metadata"]
        old = job.get("status") or {}
        conds = Conditions(old.get("conditions"), fmt_time(now), meta.get("generation"))
        conds.set("Created", False, reason, message[:500])
        patch = {"conditions": prune_empty(conds.items)}
        key = (meta["namespace"], kind, meta["name"])
        self.remember(key, await self.kube.patch_job_status(kind, meta["namespace"], meta["name"], patch))
        self.spawn(self.kube.post_event(job, "Warning", reason, message))
        self.wake_at((meta["namespace"], kind, meta["name"]), time.time() + RETRY_SECONDS * 2)
        return False


def _config_yaml(cfg: TrainerConfig | None) -> str:
    """The rendered trainer config as the ConfigMap's text: TrainerConfig.to_yaml's output, through libyaml's
    emitter where PyYAML has it (the same text, ~4x faster: the pure-Python emitter took ~36 ms per pass on the
    critical path from a new job to its pod). Rendered only when children are created."""
    if cfg is None:
        return ""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(cfg.to_dict(), Dumper=dumper, sort_keys=False)


def _resource_version(body: dict[str, Any]) -> int:
    """The object's resourceVersion as a number (the API server's are etcd revisions); -1 if it is not one."""
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:
        return -1


def _child_job(body: Mapping[str, Any]) -> JobKey | None:
    """The job a labelled child (pod, claim) belongs to, by its rlhf.io/kind and rlhf.io/job labels."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    kind, job = labels.get(builders.LABEL_KIND), labels.get(builders.LABEL_JOB)
    return (meta.get("namespace", ""), kind, job) if kind in KINDS and job else None
