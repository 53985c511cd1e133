"""The local node agent against the embedded cluster: it must behave like a kubelet for real Jobs and Pods.

The last test runs a second agent (for its own tainted node) and kills and restarts it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from support.polling import wait_for
from support.ports import free_port
from support.processes import pid_alive

from localcluster.nodeagent import kill_leftovers, shared_cache_dir

PY = "python"  # resolved on the container's PATH: the project's venv comes first


def container(name: str, script: str, **extra) -> dict:
    return {"name": name, "image": "rlhf/test:dev", "command": [PY, "-c", script], **extra}


def pod_body(name: str, *containers: dict, restart: str = "Never", volumes: list | None = None, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 5, "containers": list(containers),
                     "volumes": volumes or [], **spec}}


def phase_in(core, ns, name, *phases):
    def check():
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase in phases else None
    return check


def gone(core, ns, name):
    def check():
        try:
            core.read_namespaced_pod(name, ns)
            return False
        except ApiException as e:
            return e.status == 404
    return check


def pid_of(pod) -> int:
    return int(pod.status.container_statuses[0].container_id.rsplit("/", 1)[1])



@pytest.fixture
def core(k8s):
    return client.CoreV1Api(k8s)


def test_node_is_ready_with_gpu_capacity_and_lease(core, k8s):
    node = wait_for("a Ready node", lambda: next(
        (n for n in core.list_node().items
         if n.metadata.name == "local-gpu-0" and any(c.type == "Ready" and c.status == "True"
                                                     for c in n.status.conditions or [])), None))
    assert node.status.allocatable["nvidia.com/gpu"] == "2"
    assert node.status.capacity["pods"] == "110"
    assert {c.type for c in node.status.conditions} >= {"Ready", "MemoryPressure", "DiskPressure", "PIDPressure"}
    assert not [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]
    lease = client.CoordinationV1Api(k8s).read_namespaced_lease(node.metadata.name, "kube-node-lease")
    assert lease.spec.holder_identity == node.metadata.name
    age = time.time() - lease.spec.renew_time.timestamp()
    assert age < 30, f"lease renewed {age:.0f} s ago; the agent heartbeats every 10 s (the controller allows 40 s)"


def test_gpu_jobs_queue_for_the_gpus_of_their_node(core, k8s, namespace, cluster):
    batch = client.BatchV1Api(k8s)
    script = ("import os, time; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'], os.environ['JOB'], flush=True); "
              "time.sleep(2)")
    for job in ("gpu-a", "gpu-b"):  # both want all of local-gpu-0's two GPUs
        spec = pod_body(job, container("train", script, resources={"limits": {"nvidia.com/gpu": "2"}},
                                       env=[{"name": "JOB", "value": job}]),
                        nodeSelector={"kubernetes.io/hostname": "local-gpu-0"})["spec"]
        batch.create_namespaced_job(namespace, {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"job": job}}, "spec": spec}}})

    def pod_of(job):
        pods = core.list_namespaced_pod(namespace, label_selector=f"job={job}").items
        return pods[0] if pods else None

    # Whichever was scheduled first holds the GPU; the other waits, unschedulable, until it is done.
    first = wait_for("one GPU pod running", lambda: next(
        (p for p in (pod_of("gpu-a"), pod_of("gpu-b")) if p and p.status.phase == "Running"), None))
    second_job = "gpu-b" if first.metadata.labels["job"] == "gpu-a" else "gpu-a"
    waiting = wait_for("the other GPU pod unschedulable", lambda: (p := pod_of(second_job)) and any(
        c.type == "PodScheduled" and c.reason == "Unschedulable" for c in p.status.conditions or []) and p)
    assert waiting.status.phase == "Pending"
    assert "nvidia.com/gpu" in next(c.message for c in waiting.status.conditions if c.type == "PodScheduled")

    for job in ("gpu-a", "gpu-b"):
        done = wait_for(f"job {job} complete", lambda j=job: (s := batch.read_namespaced_job(j, namespace).status)
                        and s.succeeded == 1 and s, timeout=40)
        assert any(c.type == "Complete" and c.status == "True" for c in done.conditions)
    a, b = pod_of(first.metadata.labels["job"]), pod_of(second_job)
    a_done = a.status.container_statuses[0].state.terminated
    b_started = b.status.container_statuses[0].state.terminated.started_at
    assert a_done.exit_code == 0 and a_done.reason == "Completed"
    assert b_started >= a_done.finished_at, "the second job ran while the first still held the GPU"
    log = cluster.logs(namespace, b.metadata.name, "train")
    assert f"gpu 0,1 {second_job}" in log


def test_claim_written_by_one_pod_is_read_only_in_another(core, namespace, cluster):
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shared"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    claim = {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}
    core.create_namespaced_pod(namespace, pod_body(
        "writer", container("w", "open('/data/result.txt', 'w').write('written by A')",
                            volumeMounts=[{"name": "data", "mountPath": "/data"}]), volumes=[claim]))
    wait_for("writer succeeded", phase_in(core, namespace, "writer", "Succeeded"))

    reader = ("print('read:', open('/input/result.txt').read(), flush=True)\n"
              "open('/input/result.txt', 'a').write('B was here')\n")
    core.create_namespaced_pod(namespace, pod_body(
        "reader", container("r", reader, terminationMessagePolicy="FallbackToLogsOnError",
                            volumeMounts=[{"name": "data", "mountPath": "/input", "readOnly": True}]),
        volumes=[claim]))
    pod = wait_for("reader failed", phase_in(core, namespace, "reader", "Failed"))
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 1
    assert "Read-only file system" in term.message  # the traceback, via FallbackToLogsOnError
    assert "read: written by A" in cluster.logs(namespace, "reader", "r")

    pvc = core.read_namespaced_persistent_volume_claim("shared", namespace)
    assert pvc.status.phase == "Bound" and pvc.spec.storage_class_name == "local-path"
    pv = core.read_persistent_volume(pvc.spec.volume_name)
    directory = pv.spec.host_path.path
    with open(os.path.join(directory, "result.txt")) as f:
        assert f.read() == "written by A"
    # Deleting the claim releases the volume; the provisioner deletes the directory and the PV.
    core.delete_namespaced_pod("writer", namespace, grace_period_seconds=0)
    core.delete_namespaced_pod("reader", namespace, grace_period_seconds=0)
    core.delete_namespaced_persistent_volume_claim("shared", namespace)
    wait_for("the released PV deleted", lambda: not any(
        p.metadata.name == pv.metadata.name for p in core.list_persistent_volume().items))
    assert not os.path.exists(directory)


def test_failing_container_reports_exit_code_and_termination_message(core, namespace, cluster):
    script = ("import sys; print('about to fail', flush=True); "
              "open('/dev/termination-log', 'w').write('dataset missing: /nowhere'); sys.exit(3)")
    core.create_namespaced_pod(namespace, pod_body("fails", container("main", script)))
    pod = wait_for("pod failed", phase_in(core, namespace, "fails", "Failed"))
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (3, "Error", "dataset missing: /nowhere")
    assert pod.status.container_statuses[0].restart_count == 0
    assert cluster.logs(namespace, "fails", "main") == "about to fail\n"


def log_has(cluster, namespace, pod, container, text):
    def check():
        try:
            return text in cluster.logs(namespace, pod, container)
        except Exception:
            return False
    return check


def test_deleting_a_running_pod_kills_it_after_the_grace_period(core, namespace, cluster):
    # Ignores SIGTERM and has a child: only SIGKILL of the whole process group after the grace period stops it.
    script = ("import signal, subprocess, time; signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True)); "
              "child = subprocess.Popen(['sleep', '600']); print('child', child.pid, flush=True); time.sleep(600)")
    core.create_namespaced_pod(namespace, pod_body("stubborn", container("main", script),
                                                   terminationGracePeriodSeconds=2))
    pod = wait_for("pod running", phase_in(core, namespace, "stubborn", "Running"))
    pid = pid_of(pod)
    wait_for("SIGTERM handler installed", log_has(cluster, namespace, "stubborn", "main", "child"))
    child = int(cluster.logs(namespace, "stubborn", "main").split("child ")[1].split()[0])
    assert pid_alive(pid) and pid_alive(child)
    t0 = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_for("pod object removed", gone(core, namespace, "stubborn"), timeout=15)
    elapsed = time.monotonic() - t0
    assert not pid_alive(pid) and not pid_alive(child)
    assert "TERM" in cluster.logs(namespace, "stubborn", "main")
    assert 1.5 <= elapsed < 8, f"pod removed {elapsed:.1f} s after deletion; grace period was 2 s"


def test_env_files_and_one_port_on_two_pod_ips(core, namespace, cluster):
    port = free_port("0.0.0.0")  # free on every address: a wildcard listener would shadow the pods'
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"},
                                                  "data": {"GREETING": "hello", "model": "tiny"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}})
    # Each pod serves, on its own IP and the same port: its env, its mounted files and the token file's mode.
    server = ("import http.server, os\n"
              "env = [os.environ[k] for k in ('POD_NAME', 'POD_NAMESPACE', 'POD_IP', 'GREETING', 'MODEL', 'TOKEN',"
              " 'LITERAL', 'NODE')]\n"
              "files = [open(p).read() for p in ('/srv/app/conf/model.txt', '/srv/creds/token', '/srv/podinfo/name')]\n"
              "mode = oct(os.stat('/srv/creds/token').st_mode & 0o777)\n"
              "body = ' '.join(env + files + [mode]).encode()\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
              "    def log_message(self, *a): pass\n"
              f"http.server.HTTPServer((os.environ['POD_IP'], {port}), H).serve_forever()\n")
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "model"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "LITERAL", "value": "x-$(MODEL)"},
    ]
    mounts = [{"name": "app", "mountPath": "/srv/app"}, {"name": "creds", "mountPath": "/srv/creds"},
              {"name": "podinfo", "mountPath": "/srv/podinfo"}]
    volumes = [{"name": "app", "configMap": {"name": "settings", "items": [{"key": "model", "path": "conf/model.txt"}]}},
               {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
               {"name": "podinfo", "downwardAPI": {"items": [{"path": "name",
                                                              "fieldRef": {"fieldPath": "metadata.name"}}]}}]
    for name in ("web-a", "web-b"):
        core.create_namespaced_pod(namespace, pod_body(
            name, container("web", server, env=env, envFrom=[{"configMapRef": {"name": "settings"}}],
                            volumeMounts=mounts), restart="Always", volumes=volumes))
    pods = [wait_for(f"{n} running", phase_in(core, namespace, n, "Running")) for n in ("web-a", "web-b")]
    ips = [p.status.pod_ip for p in pods]
    assert len(set(ips)) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    assert all(p.status.host_ip == "127.0.0.1" for p in pods)
    for pod, ip in zip(pods, ips, strict=True):
        def fetch(ip=ip):
            try:
                return urllib.request.urlopen(f"http://{ip}:{port}/", timeout=2).read().decode()
            except OSError:
                return None
        answer = wait_for(f"HTTP answer from {ip}", fetch, timeout=15)
        name = pod.metadata.name
        assert answer == f"{name} {namespace} {ip} hello tiny s3cret x-tiny {pod.spec.node_name} tiny s3cret {name} 0o400"


def test_restart_on_failure_keeps_empty_dir_and_runs_init_containers_first(core, namespace):
    # The emptyDir is mounted over /tmp, where the cluster's state (the volumes' sources) lives in tests.
    init = container("prepare", "open('/tmp/ready', 'w').write('init ran')")
    flaky = ("import os, sys\n"
             "assert open('/tmp/ready').read() == 'init ran'\n"
             "if not os.path.exists('/tmp/attempt'):\n"
             "    open('/tmp/attempt', 'w').close(); sys.exit(7)\n")
    core.create_namespaced_pod(namespace, pod_body(
        "flaky", container("main", flaky, volumeMounts=[{"name": "work", "mountPath": "/tmp"}]),
        restart="OnFailure", volumes=[{"name": "work", "emptyDir": {}}],
        initContainers=[{**init, "volumeMounts": [{"name": "work", "mountPath": "/tmp"}]}]))
    pod = wait_for("pod succeeded after a restart", phase_in(core, namespace, "flaky", "Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded"
    main = pod.status.container_statuses[0]
    assert main.restart_count == 1
    assert main.last_state.terminated.exit_code == 7
    assert main.state.terminated.exit_code == 0
    assert pod.status.init_container_statuses[0].state.terminated.reason == "Completed"


def test_deleting_the_owner_garbage_collects_its_running_pods(core, namespace):
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    body = pod_body("owned", container("main", "import time; time.sleep(600)"), terminationGracePeriodSeconds=1)
    body["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                            "uid": owner.metadata.uid}]
    core.create_namespaced_pod(namespace, body)
    pid = pid_of(wait_for("owned pod running", phase_in(core, namespace, "owned", "Running")))
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    wait_for("owned pod removed by the garbage collector", gone(core, namespace, "owned"), timeout=30)
    assert not pid_alive(pid)


# -- securityContext and memory limits -------------------------------------------------------------------
TRAINER_POD_SC = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
TRAINER_CONTAINER_SC = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}
# Writes what the process is allowed (as JSON) to its termination message.
PROBE = """import json, os
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
def attempt(path):
    try:
        open(path, 'w').write('x')
        return 'ok'
    except OSError as e:
        return e.errno
report = {'uid': os.getuid(), 'gid': os.getgid(), 'groups': sorted(os.getgroups()), 'cap_eff': status['CapEff'],
          'no_new_privs': status['NoNewPrivs'], 'host': attempt(os.environ['HOST_DIR'] + '/f')}
for path in os.environ.get('VOLUMES', '').split():
    report[path] = attempt(path + '/f')
open('/dev/termination-log', 'w').write(json.dumps(report))
"""


def probe_report(pod) -> dict:
    import json

    return json.loads(pod.status.container_statuses[0].state.terminated.message)


@pytest.fixture
def world_writable_dir():
    """A host directory any uid may write to (only a read-only root can refuse it)."""
    path = tempfile.mkdtemp(prefix="nodeagent-rofs-", dir="/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_security_context_user_capabilities_and_read_only_root_are_enforced(core, namespace, world_writable_dir):
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    # The node's shared cache (e.g. torch extensions) stays writable for any user despite the read-only root.
    shared = os.path.join(shared_cache_dir(), f"test-{namespace}")
    os.makedirs(shared, mode=0o777)
    os.chmod(shared, 0o777)
    env = [{"name": "HOST_DIR", "value": world_writable_dir}, {"name": "VOLUMES", "value": f"/scratch /ckpt {shared}"}]
    mounts = [{"name": "scratch", "mountPath": "/scratch"}, {"name": "ckpt", "mountPath": "/ckpt"}]
    volumes = [{"name": "scratch", "emptyDir": {}}, {"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}]
    core.create_namespaced_pod(namespace, pod_body(
        "hardened", container("main", PROBE, env=env, volumeMounts=mounts, securityContext=TRAINER_CONTAINER_SC),
        volumes=volumes, securityContext=TRAINER_POD_SC))
    # No securityContext: root with the runtime's default capabilities and a writable root, as in a container.
    os.mkdir(os.path.join(world_writable_dir, "plain"))
    plain_env = [{"name": "HOST_DIR", "value": os.path.join(world_writable_dir, "plain")}]
    core.create_namespaced_pod(namespace, pod_body("plain", container("main", PROBE, env=plain_env)))

    pod = wait_for("hardened pod done", phase_in(core, namespace, "hardened", "Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded", pod.status
    got = probe_report(pod)
    assert (got["uid"], got["gid"], got["groups"]) == (10001, 10001, [10001])
    assert int(got["cap_eff"], 16) == 0 and got["no_new_privs"] == "1"
    assert got["host"] == 30, got  # EROFS, though the directory is world-writable
    assert got["/scratch"] == got["/ckpt"] == "ok", got  # fsGroup made the volumes the user's
    assert got[shared] == "ok", got
    shutil.rmtree(shared)
    assert not os.path.exists(os.path.join(world_writable_dir, "f"))
    pvc = core.read_namespaced_persistent_volume_claim("ckpt", namespace)
    directory = core.read_persistent_volume(pvc.spec.volume_name).spec.host_path.path
    st = os.stat(directory)
    assert st.st_gid == 10001 and st.st_mode & 0o2070 == 0o2070  # group-writable, setgid like the kubelet's
    assert os.stat(os.path.join(directory, "f")).st_uid == 10001

    plain = probe_report(wait_for("plain pod done", phase_in(core, namespace, "plain", "Succeeded")))
    assert plain["uid"] == 0 and int(plain["cap_eff"], 16) == 0xA80425FB and plain["host"] == "ok", plain


def test_run_as_non_root_with_uid_0_is_refused(core, namespace):
    sc = {**TRAINER_POD_SC, "runAsUser": 0}
    core.create_namespaced_pod(namespace, pod_body("rooty", container("main", "print('ran')"), securityContext=sc))

    def refused():
        statuses = core.read_namespaced_pod("rooty", namespace).status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting if waiting and waiting.reason == "CreateContainerConfigError" else None

    waiting = wait_for("CreateContainerConfigError", refused)
    assert "container has runAsNonRoot and image will run as root" in waiting.message
    assert "runAsUser is 0" in waiting.message and "set securityContext.runAsUser" in waiting.message
    assert core.read_namespaced_pod("rooty", namespace).status.phase == "Pending"
    events = wait_for("the Failed event", lambda: [e for e in core.list_namespaced_event(namespace).items
                                                   if e.involved_object.name == "rooty" and e.reason == "Failed"])
    assert events[0].type == "Warning" and "runAsNonRoot" in events[0].message


def test_memory_limit_oom_kill_is_reported_as_oom_killed(core, namespace):
    from localcluster.nodeagent import cgroups

    parent, why = cgroups.detect()
    if parent is None:
        pytest.skip(f"the machine offers no memory cgroup: {why}")
    limits = {"limits": {"memory": "64Mi"}}
    core.create_namespaced_pod(namespace, pod_body(
        "hog", container("main", "b = bytearray(1 << 30); print('survived')", resources=limits)))
    core.create_namespaced_pod(namespace, pod_body(
        "quits", container("main", "import sys; sys.exit(1)", resources=limits)))
    term = wait_for("hog failed", phase_in(core, namespace, "hog", "Failed")).status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "OOMKilled")
    term = wait_for("quits failed", phase_in(core, namespace, "quits", "Failed")).status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (1, "Error")  # under a memory limit, a plain failure is still Error
    uids = {core.read_namespaced_pod(n, namespace).metadata.uid for n in ("hog", "quits")}
    assert not [d for d in os.listdir(parent.path) if any(u in d for u in uids)]  # each run's cgroup removed


# -- a second agent, restarted --------------------------------------------------------------------------
def node_ready(core, name):
    def check():
        try:
            node = core.read_node(name)
        except ApiException:
            return None
        return node if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []) else None
    return check


@pytest.fixture
def second_agent(cluster, k8s, tmp_path):
    """Starts/stops an extra agent for a NoSchedule-tainted node, so no scheduled pod lands there."""
    core = client.CoreV1Api(k8s)
    node = f"agent-restart-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, "-m", "localcluster.nodeagent", "--kubeconfig", cluster.kubeconfig,
            "--state-dir", str(tmp_path / "state"), "--node", f"{node}:gpu=0", "--taint", "rlhf.io/test=restart:NoSchedule",
            "--shutdown-grace-seconds", "3"]
    procs = []

    class Agent:
        name = node
        state_dir = str(tmp_path / "state")

        def start(self):
            log = open(tmp_path / f"agent-{len(procs)}.log", "wb")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=cluster.env))
            wait_for("second agent's node Ready", node_ready(core, node), timeout=20)
            return procs[-1]

    try:
        yield Agent()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for pod in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items:
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        core.delete_node(node)
        kill_leftovers(str(tmp_path / "state"))  # processes of pods a failed test left running


def sleeper(name: str, node: str, restart: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "restartPolicy": restart, "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "main", "image": "rlhf/test:dev",
                                     "command": ["python", "-c", "import time; time.sleep(600)"]}]}}


def test_agent_restart_fails_or_reruns_pods_and_shutdown_stops_them(core, namespace, second_agent):
    agent = second_agent.start()
    for name, restart in (("never", "Never"), ("always", "Always")):
        core.create_namespaced_pod(namespace, sleeper(name, second_agent.name, restart))
    pids = {n: pid_of(wait_for(f"{n} running", phase_in(core, namespace, n, "Running"))) for n in ("never", "always")}

    # A hard kill leaves the container processes behind; the next agent must stop them and take over.
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    assert all(pid_alive(p) for p in pids.values())
    agent = second_agent.start()
    wait_for("leftover processes killed", lambda: not any(pid_alive(p) for p in pids.values()), timeout=15)

    never = wait_for("never failed", phase_in(core, namespace, "never", "Failed"))
    assert never.status.reason == "NodeAgentRestarted"
    term = never.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "ContainerStatusUnknown")

    always = wait_for("always re-run", lambda: (p := core.read_namespaced_pod("always", namespace)).status
                      .container_statuses[0].restart_count == 1 and p.status.phase == "Running" and p)
    assert always.status.container_statuses[0].last_state.terminated.reason == "ContainerStatusUnknown"
    new_pid = pid_of(always)
    assert new_pid != pids["always"] and pid_alive(new_pid)

    # SIGTERM: pods are stopped (within the grace period) and reported, the node goes NotReady.
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=20) == 0
    assert not pid_alive(new_pid)
    stopped = core.read_namespaced_pod("always", namespace)
    assert (stopped.status.phase, stopped.status.reason) == ("Failed", "Shutdown")
    node = core.read_node(second_agent.name)
    assert next(c.status for c in node.status.conditions if c.type == "Ready") == "False"
    assert not os.listdir(os.path.join(second_agent.state_dir, "pod-data"))
