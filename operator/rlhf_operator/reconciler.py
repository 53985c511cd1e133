"""Level-triggered reconciliation of one job: observe, plan (pure), act, write status once.

Triggers come from the job's own watch events, its pods' events, its upstream jobs' events and a
periodic resync (progress scrape, deadlines, TTL). Triggers for a job that is being reconciled are
coalesced into one more pass, so a burst of pod events costs one or two passes, never a queue.
Observed pods and upstream jobs come from kopf's in-memory indices (filled before any handler
runs, so a restarted operator sees every existing child first); the job itself is read fresh.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from rlhf_trainer.config import ConfigError

from rlhf_operator import builders, dependencies, jobspec, metrics, progress
from rlhf_operator import status as status_mod
from rlhf_operator.crd_schema import KINDS
from rlhf_operator.kube import ApiError, Kube
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
        self.phases = metrics.PhaseTracker()
        self.seen_phases: dict[str, str] = {}  # uid -> phase in the job's latest watch event
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

    def pods_of(self, namespace: str, kind: str, name: str) -> list[status_mod.PodView]:
        key = (namespace, kind, name)
        if self.pod_index is None or key not in self.pod_index:
            return []
        return list(self.pod_index[key])

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

    def forget(self, key: JobKey, uid: str = "") -> None:
        handle = self._wakeups.pop(key, None)
        if handle:
            handle.cancel()
        if uid:
            self.phases.remove(uid)

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
        job = await self.kube.get_job(kind, namespace, name)
        if job is None:
            self.forget(key)
            return
        job["kind"] = kind
        spec, old = job.get("spec") or {}, job.get("status") or {}
        finished = old.get("phase") in ("Succeeded", "Failed")
        deps: list[status_mod.DepState] = []
        invalid, config_yaml, mounts = None, "", []
        if not finished:
            deps = dependencies.resolve(kind, spec, self.lookup(namespace))
            errors = jobspec.validate(kind, name, spec, self.settings.max_gpus_per_pod)
            if not errors:
                try:
                    cfg, mounts = builders.render_config(job, self.settings, {d.name: d.claim for d in deps if d.claim})
                    config_yaml = cfg.to_yaml()
                except ConfigError as e:
                    errors = [str(e)]
            invalid = "; ".join(errors) or None

        pods = self.pods_of(namespace, kind, name)
        current = old.get("trainerPod")
        if current and not finished and current not in {p.name for p in pods}:
            obj = await self.kube.get("pods", namespace, current)  # the index may lag behind a fresh pod
            if obj is not None:
                pods.append(status_mod.pod_view(obj))

        scraped = None
        if scrape and not finished and self.session is not None:
            running = next((p for p in pods if p.name == current and p.phase == "Running" and p.pod_ip), None)
            if running is not None:
                scraped = await progress.scrape(self.session, running.pod_ip, self.settings.trainer_metrics_port)

        now = dt.datetime.now(dt.UTC)
        p = status_mod.plan(job, pods, deps, now, invalid, scraped)
        for pod in p.delete_pods:
            await self.kube.delete("pods", namespace, pod)
        if p.create_pod is not None:
            if not await self._create_children(job, p, config_yaml, mounts, now):
                return
        if p.claim_owned is not None:
            owners = [builders.owner_reference(job)] if p.claim_owned else None
            await self.kube.patch("persistentvolumeclaims", namespace, builders.pvc_name(name), {"metadata": {"ownerReferences": owners}})
        new = p.status
        if new.get("progress") and new["progress"] != old.get("progress"):
            new["progress"]["updateTime"] = status_mod.fmt_time(now)
        patch = status_mod.merge_patch(old, new)
        if patch:
            await self.kube.patch_job_status(kind, namespace, name, patch)
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

    async def _create_children(self, job: dict[str, Any], p: status_mod.Plan, config_yaml: str,
                               mounts: list[builders.Mount], now: dt.datetime) -> bool:
        """Claim, config and pod of the planned attempt; a 409 adopts what is there. On any other
        API error the job keeps its old status plus a Created=False condition, and is retried."""
        assert self.kube is not None and p.create_pod is not None
        kind, meta = job["kind"], job["metadata"]
        attempt, restarts = p.create_pod
        try:
            await self.kube.create("persistentvolumeclaims", builders.build_pvc(job, self.settings))
            await self.kube.ensure_configmap(builders.build_configmap(job, config_yaml))
            pod = builders.build_pod(job, self.settings, attempt, restarts, builders.config_hash(config_yaml), mounts)
            created = await self.kube.create("pods", pod)
        except ApiError as e:
            old = job.get("status") or {}
            conds = status_mod.Conditions(old.get("conditions"), status_mod.fmt_time(now), meta.get("generation"))
            conds.set("Created", False, "CreateFailed", str(e)[:500])
            await self.kube.patch_job_status(kind, meta["namespace"], meta["name"], {"conditions": status_mod.prune_empty(conds.items)})
            self.spawn(self.kube.post_event(job, "Warning", "CreateFailed", str(e)))
            self.wake_at((meta["namespace"], kind, meta["name"]), time.time() + RETRY_SECONDS * 2)
            return False
        if created:
            log.info("created pod %s/%s", meta["namespace"], pod["metadata"]["name"])
            if p.restarted:
                metrics.POD_RESTARTS.labels(kind).inc()
            if p.handoff_from is not None:
                waited = dt.datetime.now(dt.UTC) - p.handoff_from
                metrics.HANDOFF_SECONDS.labels(kind).observe(max(0.0, waited.total_seconds()))
        return True
