"""One local Kubernetes cluster: etcd, API server, controller-manager, scheduler and the node agent.

Everything a cluster owns lives in its state directory (default ./.state/cluster or $RLHF_CLUSTER_DIR):

    cluster.json      name, ports, marker and the started processes (pid + start time)
    kubeconfig        admin kubeconfig (token auth; the API server's certificate is verified against certs/ca.crt)
    tokens.csv        static tokens of the API server
    certs/            CA, serving pair, service-account signing pair
    etcd/             etcd's data (kept across down/up; removed with `down --purge`)
    logs/<role>.log   output of each process
    dns/Corefile      the cluster DNS's configuration (CoreDNS on port 53 of the pod network's last address)
    node/             the node agent's state: pod logs under node/pods/<namespace>/<pod>/<container>.log

Ports are picked free on 127.0.0.1 at every `up`, so clusters in different state directories run side by side.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import certs, dns, kueue, processes, provision
from .nodeagent.addresses import default_pod_network
from .nodeagent.node import DEFAULT_NODES
from .processes import ProcRecord

STATE_FILE = "cluster.json"
DEFAULT_NAME = "rlhf-local"
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc"
PORT_NAMES = ("etcd", "etcd_peer", "apiserver", "dns_ready", "kueue_webhook", "kueue_health", "kueue_metrics")
ADDONS = ("kueue",)
# Kubernetes' defaults plus the webhooks, named so the operator's admission webhook visibly has what it needs.
# ServiceAccount admission stays off: there is no token controller, and pods get no API credentials anyway.
ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,DefaultStorageClass,DefaultTolerationSeconds,StorageObjectInUseProtection,"
    "ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
)
# Stop order: the watchdog, then the node agent (it ends its pods while the API server can still record it),
# then the controllers, the API server, and etcd last. Seconds of grace before SIGKILL per stage.
STOP_STAGES = (("watchdog",), ("node-agent",), ("kube-scheduler", "kube-controller-manager", "coredns", "kueue"),
               ("kube-apiserver",), ("etcd",))
STOP_GRACE = (5.0, 25.0, 10.0, 10.0, 10.0)

Log = Callable[[str], None]


class ClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped; the message says what to do."""


def default_state_dir() -> Path:
    return Path(os.environ.get("RLHF_CLUSTER_DIR") or Path(".state") / "cluster")


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def kubeconfig_dict(name: str, server: str, ca_pem: bytes, token: str) -> dict:
    user = f"{name}-admin"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user, "namespace": "default"}}],
        "current-context": name,
    }


def etcd_argv(etcd: str, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [etcd, f"--data-dir={data_dir}", f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--logger=zap", "--log-level=warn"]


def apiserver_argv(binary: Path, state: Path, etcd_port: int, port: int) -> list[str]:
    c = state / "certs"
    return [
        str(binary), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
        f"--tls-cert-file={c / 'apiserver.crt'}", f"--tls-private-key-file={c / 'apiserver.key'}",
        f"--token-auth-file={state / 'tokens.csv'}", "--anonymous-auth=false", "--authorization-mode=RBAC",
        f"--service-account-issuer={SA_ISSUER}", f"--service-account-key-file={c / 'sa.pub'}",
        f"--service-account-signing-key-file={c / 'sa.key'}", f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--enable-admission-plugins={ADMISSION_PLUGINS}", "--disable-admission-plugins=ServiceAccount",
        # The `kubernetes` service cannot point at 127.0.0.1 (loopback endpoints are invalid) and nothing in
        # the cluster needs it: no reconciler, no error loop.
        "--endpoint-reconciler-type=none", "--profiling=false",
    ]


def controller_manager_argv(binary: Path, state: Path, name: str) -> list[str]:
    return [
        str(binary), f"--kubeconfig={state / 'kubeconfig'}", f"--cluster-name={name}",
        f"--service-account-private-key-file={state / 'certs' / 'sa.key'}",
        f"--root-ca-file={state / 'certs' / 'ca.crt'}",
        "--controllers=*,-serviceaccount-token,-service,-cloud-node-lifecycle", "--leader-elect=false",
        "--bind-address=127.0.0.1", "--secure-port=0", "--profiling=false",
    ]


def scheduler_argv(binary: Path, state: Path) -> list[str]:
    return [str(binary), f"--kubeconfig={state / 'kubeconfig'}", "--leader-elect=false",
            "--bind-address=127.0.0.1", "--secure-port=0", "--profiling=false"]


def coredns_argv(binary: str, corefile: Path) -> list[str]:
    return [binary, "-conf", str(corefile)]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def node_agent_available() -> bool:
    return (Path(__file__).parent / "nodeagent" / "__main__.py").exists()


def _tail(path: str | Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:]) or "    (empty log)"


class Cluster:
    """A cluster in one state directory. Cheap to construct: it only reads the state file when asked."""

    def __init__(self, state_dir: str | Path | None = None, *, name: str | None = None,
                 nodes: Sequence[str] | None = None, bin_dir: str | Path | None = None, node_agent: bool = True,
                 addons: Sequence[str] = ()):
        self.state_dir = str(Path(state_dir or default_state_dir()).resolve())
        self._root = Path(self.state_dir)
        self._name = name
        self.nodes = list(nodes or DEFAULT_NODES)
        self.bin_dir = Path(bin_dir) if bin_dir else None  # None: the provisioned cache
        self.node_agent = node_agent
        unknown = sorted(set(addons) - set(ADDONS))
        if unknown:
            raise ClusterError(f"unknown add-on(s) {', '.join(unknown)}: choose from {', '.join(ADDONS)}")
        self.addons = tuple(addons)

    # -- paths and views --------------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> str:
        return str(self._root / "kubeconfig")

    @property
    def node_state_dir(self) -> str:
        return str(self._root / "node")

    @property
    def name(self) -> str:
        return self._name or self._load().get("name") or DEFAULT_NAME

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that should talk to this cluster (kubectl, kopf, the operator)."""
        env = {k: v for k, v in os.environ.items() if k != processes.MARKER_ENV}
        env["KUBECONFIG"] = self.kubeconfig
        return env

    @property
    def server(self) -> str:
        port = self._load().get("ports", {}).get("apiserver")
        if not port:
            raise ClusterError(f"no cluster was started in {self.state_dir}: run `python -m localcluster up`")
        return f"https://127.0.0.1:{port}"

    def _load(self) -> dict:
        try:
            return json.loads((self._root / STATE_FILE).read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ClusterError(f"{self._root / STATE_FILE} is not valid JSON ({exc}); "
                               "stop leftovers by hand and delete it") from exc

    def _save(self, state: dict) -> None:
        tmp = self._root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self._root / STATE_FILE)

    @contextmanager
    def _locked(self):
        """Serialises up/down on one state directory (a watchdog may call down while someone else does)."""
        self._root.mkdir(parents=True, exist_ok=True)
        with open(self._root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def records(self) -> list[ProcRecord]:
        return [ProcRecord.from_json(p) for p in self._load().get("processes", [])]

    def running(self) -> bool:
        """True when every process of the last `up` still runs."""
        recs = self.records()
        return bool(recs) and all(processes.record_alive(r) for r in recs)

    # -- HTTP checks ------------------------------------------------------------------------------------------

    def _token(self) -> str:
        return certs.ensure_admin_token(self._root / "tokens.csv")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET path from the API server as admin: (status, body); status 0 when it cannot be reached."""
        ctx = ssl.create_default_context(cafile=str(self._root / "certs" / "ca.crt"))
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self._token()}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return 0, ""

    def ready_nodes(self) -> list[str]:
        status, body = self.get("/api/v1/nodes")
        if status != 200:
            return []
        return [n["metadata"]["name"] for n in json.loads(body).get("items", [])
                if any(c.get("type") == "Ready" and c.get("status") == "True"
                       for c in n.get("status", {}).get("conditions", []))]

    # -- up ---------------------------------------------------------------------------------------------------

    def up(self, *, timeout: float = 90.0, node_timeout: float = 60.0, wait_node: bool = True,
           watch_pid: int | None = None, log: Log = print) -> float:
        """Start the cluster (a no-op when it already runs); returns the seconds until it was ready.

        Ready means: /readyz is ok and, with the node agent, every expected Node is Ready. On any failure what
        was started is stopped again and ClusterError says which process failed and shows its log.
        """
        with self._locked():
            if self.running():
                log(f"cluster '{self.name}' already runs in {self.state_dir}")
                return 0.0
            if self.records():  # leftovers of a crashed run
                self._stop(log)
            t0 = time.monotonic()
            for attempt in (1, 2):
                state = self._prepare(new_ports=attempt > 1, log=log)
                try:
                    self._start(state, timeout, node_timeout, wait_node, watch_pid, log)
                    break
                except BaseException as exc:
                    self._stop(lambda _msg: None)
                    # A port picked free can be taken before etcd or the API server binds it (another cluster
                    # starting at the same moment): try once more on new ports.
                    if attempt == 1 and "address already in use" in str(exc):
                        log("  a port was taken meanwhile; retrying on new ports")
                        continue
                    raise
            elapsed = time.monotonic() - t0
            state["ready_seconds"] = round(elapsed, 2)
            self._save(state)
        log(f"cluster '{state['name']}' ready in {elapsed:.1f} s: {self.server} "
            f"(export KUBECONFIG={self.kubeconfig})")
        return elapsed

    def _binaries(self) -> dict[str, str]:
        paths = provision.binary_paths(names=(*provision.DEFAULT_COMPONENTS, *self.addons))
        if self.bin_dir:  # binaries of one directory (tests, a hand-made build); the rest from the cache
            paths.update({n: self.bin_dir / n for n in paths if (self.bin_dir / n).exists()})
        found = {}
        for name, path in paths.items():
            if not os.access(path, os.X_OK):
                extra = "".join(f" --with {a}" for a in self.addons)
                raise ClusterError(f"{path} not found: build the cluster's binaries first with "
                                   f"`python -m localcluster provision{extra}` (cached afterwards)")
            found[name] = str(path)
        return found

    def _dns_wanted(self) -> bool:
        """Cluster DNS serves pods, so it runs with the node agent; port 53 needs root (as the agent does)."""
        return self.node_agent and os.geteuid() == 0

    def _retire_foreign_data(self, log: Log) -> None:
        """Moves aside etcd data written by other etcd/Kubernetes versions (an older checkout's v1.20 cluster
        left a v2 WAL that etcd 3.6 panics on); this cluster then starts with empty state."""
        data, stamp = self._root / "etcd", self._root / "etcd.version"
        want = f"etcd {provision.ETCD.version}, kubernetes {provision.K8S.version}"
        have = stamp.read_text().strip() if stamp.exists() else "an older version (no etcd.version)"
        if data.is_dir() and any(data.iterdir()) and have != want:
            aside = self._root / f"etcd.old-{time.strftime('%Y%m%d-%H%M%S')}"
            data.rename(aside)
            log(f"  the cluster data in {data} was written by {have}, not {want}: moved to {aside}; "
                "starting with an empty cluster (delete it when not needed)")
        data.mkdir(mode=0o700, exist_ok=True)
        stamp.write_text(want + "\n")

    def _prepare(self, new_ports: bool = False, log: Log = print) -> dict:
        self._root.mkdir(parents=True, exist_ok=True)
        self._root.chmod(0o700)
        self._binaries()
        self._retire_foreign_data(log)
        certs.ensure_certs(self._root / "certs")
        self._token()
        old = self._load()
        ports = old.get("ports") or {}
        # Reuse the last ports when free (etcd keeps its peer URL in its data); otherwise pick new ones.
        if new_ports or set(ports) != set(PORT_NAMES) or not all(port_free(p) for p in ports.values()):
            ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        network = default_pod_network(self.node_state_dir)
        state = {"name": self._name or old.get("name") or DEFAULT_NAME, "marker": uuid.uuid4().hex, "ports": ports,
                 "nodes": self.nodes, "pod_network": network,
                 "dns": dns.dns_address(network) if self._dns_wanted() else "",
                 "processes": [], "started_at": time.time()}
        self._save(state)
        return state

    def _spawn(self, state: dict, role: str, argv: list[str]) -> ProcRecord:
        env = {**self.env, processes.MARKER_ENV: state["marker"]}
        rec = processes.spawn(role, argv, self._root / "logs" / f"{role}.log", env)
        state["processes"].append(rec.to_json())
        self._save(state)
        return rec

    def _wait(self, what: str, rec: ProcRecord, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if not processes.record_alive(rec):
                raise ClusterError(f"{rec.role} exited while waiting for {what}; last lines of {rec.log}:\n"
                                   f"{_tail(rec.log)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{what}: not within {timeout:.0f} s; last lines of {rec.log}:\n{_tail(rec.log)}")
            time.sleep(0.2)

    def _start(self, state: dict, timeout: float, node_timeout: float, wait_node: bool, watch_pid: int | None,
               log: Log) -> None:
        bins, ports, root = self._binaries(), state["ports"], self._root
        t0 = time.monotonic()
        etcd = self._spawn(state, "etcd", etcd_argv(bins["etcd"], root / "etcd", ports["etcd"], ports["etcd_peer"]))

        def etcd_healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['etcd']}/health", timeout=2) as resp:
                    return json.loads(resp.read()).get("health") == "true"
            except (OSError, ValueError):
                return False

        self._wait("etcd /health", etcd, etcd_healthy, timeout)
        api = self._spawn(state, "kube-apiserver", apiserver_argv(Path(bins["kube-apiserver"]), root, ports["etcd"],
                                                                  ports["apiserver"]))
        self._write_kubeconfig(state)
        self._wait("kube-apiserver /readyz", api, lambda: self.get("/readyz", timeout=2) == (200, "ok"),
                   timeout - (time.monotonic() - t0))
        log(f"  API server ready after {time.monotonic() - t0:.1f} s on {self.server}")
        self._spawn(state, "kube-controller-manager",
                    controller_manager_argv(Path(bins["kube-controller-manager"]), root, state["name"]))
        self._spawn(state, "kube-scheduler", scheduler_argv(Path(bins["kube-scheduler"]), root))
        coredns = self._start_dns(state, bins) if state["dns"] else None
        if watch_pid:
            ticks = processes.start_ticks(watch_pid)
            self._spawn(state, "watchdog", [sys.executable, "-m", "localcluster", "_watch", "--state-dir",
                                            self.state_dir, "--pid", str(watch_pid), "--ticks", str(ticks)])
        if not self.node_agent:
            return
        if not node_agent_available():
            log("  WARNING: the node agent (localcluster/nodeagent) is not installed: no Node, pods will not run")
            return
        argv = [sys.executable, "-m", "localcluster.nodeagent", "--kubeconfig", self.kubeconfig,
                "--state-dir", self.node_state_dir, "--pod-network", state["pod_network"],
                "--cluster-dns", state["dns"], "--cluster-domain", dns.CLUSTER_DOMAIN]
        for spec in self.nodes:
            argv += ["--node", spec]
        agent = self._spawn(state, "node-agent", argv)
        if wait_node:
            want = {spec.split(":", 1)[0] for spec in self.nodes}

            def nodes_ready() -> bool:
                ready = set(self.ready_nodes())
                return want <= ready if want else bool(ready)

            self._wait(f"Ready node(s) {', '.join(sorted(want)) or '(the default one)'} from the node agent", agent,
                       nodes_ready, node_timeout)
            log(f"  node(s) Ready after {time.monotonic() - t0:.1f} s: {', '.join(self.ready_nodes())}")
        if coredns is not None:
            self._wait("CoreDNS /ready (its kubernetes plugin has synced)", coredns,
                       lambda: _http_ok(f"http://127.0.0.1:{ports['dns_ready']}/ready"), timeout)
            log(f"  cluster DNS ready after {time.monotonic() - t0:.1f} s on {state['dns']}:53")
        if "kueue" in self.addons:
            self._start_kueue(state, bins, timeout)
            log(f"  Kueue ready after {time.monotonic() - t0:.1f} s (ClusterQueue {kueue.CLUSTER_QUEUE}, "
                f"LocalQueue default/{kueue.LOCAL_QUEUE})")

    def _start_kueue(self, state: dict, bins: dict[str, str], timeout: float) -> None:
        """CRDs, the manager, its webhooks (by URL, our CA), then the default queues (see kueue.py)."""
        from .nodeagent.kube import ApiError, Kube

        ports, kube = state["ports"], Kube(self.kubeconfig)
        mdir = provision.manifest_dir(None, provision.KUEUE)
        certs.ensure_serving_pair(self._root / "certs", "kueue")
        cert_dir = self._root / "kueue" / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._root / "certs" / "kueue.crt", cert_dir / "tls.crt")
        shutil.copyfile(self._root / "certs" / "kueue.key", cert_dir / "tls.key")

        def apply(path: str, obj: dict) -> None:
            try:
                kube.create(path, obj)
            except ApiError as e:
                if e.status != 409:
                    raise
                current = kube.get(f"{path}/{obj['metadata']['name']}")
                obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
                kube.request("PUT", f"{path}/{obj['metadata']['name']}", obj)

        apply("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": kueue.NAMESPACE}})
        crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        names = []
        for crd in kueue.crds(mdir):
            apply(crd_path, crd)
            names.append(crd["metadata"]["name"])

        def established(name: str) -> bool:
            conds = (kube.get(f"{crd_path}/{name}").get("status") or {}).get("conditions") or []
            return any(c.get("type") == "Established" and c.get("status") == "True" for c in conds)

        deadline = time.monotonic() + timeout
        while not all(established(n) for n in names):  # the manager exits on a kind not served yet
            if time.monotonic() > deadline:
                raise ClusterError(f"Kueue's CRDs not Established within {timeout:.0f} s: {', '.join(names)}")
            time.sleep(0.2)
        cfg = self._root / "kueue" / "config.yaml"
        kueue.write_config(cfg, kueue.config(ports["kueue_webhook"], ports["kueue_health"], ports["kueue_metrics"],
                                             str(cert_dir)))
        rec = self._spawn(state, "kueue", kueue.manager_argv(bins["kueue"], str(cfg), str(cert_dir)))
        self._wait("Kueue /readyz", rec, lambda: _http_ok(f"http://127.0.0.1:{ports['kueue_health']}/readyz"), timeout)
        ca = (self._root / "certs" / "ca.crt").read_bytes()
        for hook in kueue.webhook_configurations((mdir / "webhook" / "manifests.yaml").read_text(),
                                                 ports["kueue_webhook"], ca):
            plural = "mutatingwebhookconfigurations" if hook["kind"].startswith("Mutating") \
                else "validatingwebhookconfigurations"
            apply(f"/apis/admissionregistration.k8s.io/v1/{plural}", hook)

        def queues_created() -> bool:
            try:
                for path, obj in kueue.default_queues(self.nodes):
                    apply(path, obj)
            except ApiError:  # the webhooks may need a moment to be served
                return False
            return True

        self._wait("Kueue's default ResourceFlavor, ClusterQueue and LocalQueue", rec, queues_created, timeout)

    def _start_dns(self, state: dict, bins: dict[str, str]) -> ProcRecord:
        host = dns.HOST_RESOLV_CONF.read_text() if dns.HOST_RESOLV_CONF.exists() else ""
        corefile = self._root / "dns" / "Corefile"
        corefile.parent.mkdir(parents=True, exist_ok=True)
        corefile.write_text(dns.corefile(state["dns"], state["ports"]["dns_ready"], self.kubeconfig,
                                         dns.upstreams(host, state["dns"])))
        return self._spawn(state, "coredns", coredns_argv(bins["coredns"], corefile))

    def _write_kubeconfig(self, state: dict) -> None:
        ca = (self._root / "certs" / "ca.crt").read_bytes()
        cfg = kubeconfig_dict(state["name"], f"https://127.0.0.1:{state['ports']['apiserver']}", ca, self._token())
        tmp = self._root / ".kubeconfig.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(cfg, fh, indent=2)  # JSON is YAML: kubectl, the python client and kopf all read it
        os.replace(tmp, self.kubeconfig)

    # -- down -------------------------------------------------------------------------------------------------

    def down(self, *, purge: bool = False, log: Log = print) -> None:
        """Stop exactly the processes of this cluster (and whatever they started); purge also deletes the state."""
        with self._locked():
            state = self._load()
            if not state:
                log(f"no cluster in {self.state_dir}")
            else:
                self._stop(log)
            if purge and (self._root / STATE_FILE).exists():
                shutil.rmtree(self._root)
                log(f"deleted {self.state_dir}")

    def _stop(self, log: Log) -> None:
        state = self._load()
        recs = [ProcRecord.from_json(p) for p in state.get("processes", [])]
        stages = [[r for r in recs if r.role in roles] for roles in STOP_STAGES]
        left = processes.stop(stages, state.get("marker"), STOP_GRACE)
        if left:
            raise ClusterError(f"processes {sorted(left)} of cluster {self.state_dir} survived SIGKILL "
                               "(stuck in the kernel?); check `ps -o pid,stat,cmd -p ...`")
        if Path(self.node_state_dir).is_dir():  # memory cgroups of pods an agent killed hard left behind
            from .nodeagent.cgroups import remove_leftovers

            remove_leftovers(self.node_state_dir)
        state["processes"] = []
        self._save(state)
        if recs:
            log(f"cluster '{state.get('name', DEFAULT_NAME)}' stopped ({len(recs)} processes)")

    # -- status and logs --------------------------------------------------------------------------------------

    def status(self) -> dict:
        state = self._load()
        procs = [{"role": r.role, "pid": r.pid, "alive": processes.record_alive(r), "log": r.log}
                 for r in self.records()]
        api_up = any(p["alive"] for p in procs if p["role"] == "kube-apiserver")
        ready = api_up and self.get("/readyz", timeout=2) == (200, "ok")
        return {
            "name": state.get("name"), "state_dir": self.state_dir, "kubeconfig": self.kubeconfig,
            "server": f"https://127.0.0.1:{state['ports']['apiserver']}" if state.get("ports") else None,
            "ready": ready, "ready_seconds": state.get("ready_seconds"), "processes": procs,
            "dns": state.get("dns") or None, "pod_network": state.get("pod_network"),
            "ready_nodes": self.ready_nodes() if ready else [],
        }

    def log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        pod_dir = Path(self.node_state_dir) / "pods" / namespace / pod
        if not pod_dir.is_dir():
            raise ClusterError(f"no logs for pod {namespace}/{pod}: {pod_dir} does not exist (the node agent has "
                               "not started that pod; check `kubectl get pod` and its events)")
        if container:
            path = pod_dir / f"{container}.log"
            if not path.exists():
                have = sorted(p.stem for p in pod_dir.glob("*.log"))
                raise ClusterError(f"pod {namespace}/{pod} has no log for container '{container}' "
                                   f"(containers with logs: {', '.join(have) or 'none'})")
            return path
        logs = sorted(pod_dir.glob("*.log"))
        if len(logs) != 1:
            raise ClusterError(f"pod {namespace}/{pod} has logs for containers "
                               f"{', '.join(p.stem for p in logs) or 'none'}: name one (-c CONTAINER)")
        return logs[0]

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """The log of a pod's container, as the node agent wrote it (kubectl logs needs a kubelet)."""
        return self.log_path(namespace, pod, container).read_text(errors="replace")


def watch(state_dir: str, pid: int, ticks: int | None) -> None:
    """Stop the cluster once process pid (with this start time) is gone: a test session killed hard leaks nothing."""
    while ticks is not None and processes.alive(pid, ticks):
        time.sleep(1.0)
    Cluster(state_dir).down(log=lambda _msg: None)
