"""Watching an embedded cluster from the benchmark: first-arrival times of pods and job phases, and
the operator as a child process whose memory is sampled."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import _benchlib as bl
import psutil

GROUP, VERSION = "rlhf.io", "v1alpha1"
PLURALS = {"SFTJob": "sftjobs", "RewardModelJob": "rewardmodeljobs", "PPOJob": "ppojobs"}
STANDIN = bl.REPO / "tests" / "support" / "standin_trainer.py"
LABEL_JOB = "rlhf.io/job"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, fn, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


class Recorder:
    """Watch streams of pods and jobs in some namespaces; first arrival time of each fact."""

    def __init__(self, kubeconfig: str, namespaces: list[str]):
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.pod_added: dict[tuple[str, str], float] = {}  # (ns, pod) -> t
        self.pod_phase: dict[tuple[str, str, str], float] = {}  # (ns, pod, phase) -> t
        self.job_phase: dict[tuple[str, str, str, str], float] = {}  # (ns, kind, job, phase) -> t
        self.job_pod: dict[tuple[str, str], float] = {}  # (ns, job) -> first trainer pod seen
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Recorder:
        for ns in self.namespaces:
            self._spawn(self._watch_pods, ns)
            for kind in PLURALS:
                self._spawn(self._watch_jobs, ns, kind)
        time.sleep(1.0)  # the streams are open before anything is created
        return self

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=self._loop, args=(fn, *args), daemon=True)
        t.start()
        self._threads.append(t)

    def _loop(self, fn, *args) -> None:
        from kubernetes import client

        api = client.ApiClient(kube_configuration(self.kubeconfig))
        while not self._stop.is_set():
            try:
                fn(api, *args)
            except Exception:  # a dropped stream (410 Gone, reset): open a new one
                time.sleep(0.1)

    def _watch_pods(self, api, ns: str) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(api)
        for ev in watch.Watch().stream(core.list_namespaced_pod, ns, timeout_seconds=5):
            now = time.monotonic()
            pod = ev["object"]
            key = (ns, pod.metadata.name)
            self.pod_added.setdefault(key, now)
            job = (pod.metadata.labels or {}).get(LABEL_JOB)
            if job:
                self.job_pod.setdefault((ns, job), now)
            if pod.status and pod.status.phase:
                self.pod_phase.setdefault((ns, pod.metadata.name, pod.status.phase), now)
            if self._stop.is_set():
                return

    def _watch_jobs(self, api, ns: str, kind: str) -> None:
        from kubernetes import client, watch

        co = client.CustomObjectsApi(api)
        for ev in watch.Watch().stream(co.list_namespaced_custom_object, GROUP, VERSION, ns, PLURALS[kind],
                                       timeout_seconds=5):
            now = time.monotonic()
            obj = ev["object"]
            phase = (obj.get("status") or {}).get("phase")
            if phase:
                self.job_phase.setdefault((ns, kind, obj["metadata"]["name"], phase), now)
            if self._stop.is_set():
                return

    def job_pod_added(self, ns: str, job: str) -> float | None:
        return self.job_pod.get((ns, job))

    def stop(self) -> None:
        self._stop.set()


def kube_configuration(kubeconfig: str):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    return cfg


class OperatorProcess:
    """``python -m rlhf_operator`` with the stand-in trainer; RSS sampled while it runs."""

    def __init__(self, kubeconfig: str, namespaces: list[str], log_path: Path):
        self.metrics_port = free_port()
        self.env = {
            **os.environ, "KUBECONFIG": kubeconfig, "RLHF_WATCH_NAMESPACES": ",".join(namespaces),
            "RLHF_TRAINER_COMMAND": json.dumps([bl.python(), str(STANDIN)]),
            "RLHF_METRICS_PORT": str(self.metrics_port), "RLHF_HEALTH_PORT": "0", "RLHF_CHECKPOINT_SIZE": "1Gi",
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path = log_path
        self.peak_rss_mib = 0.0
        self._sampling = threading.Event()

    def start(self) -> OperatorProcess:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([bl.python(), "-m", "rlhf_operator"], env=self.env, cwd=bl.REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_until("the operator to start", lambda: self.proc.poll() is not None
                   or "Initial authentication has finished" in self.log_path.read_text(), 60)
        if self.proc.poll() is not None:
            raise SystemExit(f"the operator exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        self.ps = psutil.Process(self.proc.pid)
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while self.proc.poll() is None:
            try:
                rss = self.ps.memory_info().rss / 2**20
            except psutil.Error:
                return
            if self._sampling.is_set():
                self.peak_rss_mib = max(self.peak_rss_mib, rss)
            time.sleep(0.1)

    def measure_peak(self, on: bool) -> None:
        if on:
            self.peak_rss_mib = 0.0
            self._sampling.set()
        else:
            self._sampling.clear()

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def metric_delta(before: str, after: str, name: str) -> float:
    """Growth of a counter (summed over its label sets) between two scrapes."""
    return sum(v for _, v in metric_samples(after, name)) - sum(v for _, v in metric_samples(before, name))
