"""The node agent's pure parts (no cluster): parsing, pod phase rules, env resolution, mount plans, and the
mount-namespace shim run for real (needs root, as the agent does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest

from localcluster.dns import corefile, dns_address, upstreams
from localcluster.nodeagent.addresses import AddressPool, default_pod_network, parse_pod_network
from localcluster.nodeagent.dns import pod_hostname, pod_hosts_file, pod_resolv_conf
from localcluster.nodeagent.env import ContainerConfigError, PodContext, command_line, expand, resolve_env
from localcluster.nodeagent.node import GPU, node_conditions, parse_node_spec, parse_taint, without_not_ready_taints
from localcluster.nodeagent.processes import SHIM
from localcluster.nodeagent.quantity import parse_quantity
from localcluster.nodeagent.security import capability_set, container_security, process_user
from localcluster.nodeagent.status import ContainerState, backoff_seconds, pod_phase, terminated_reason
from localcluster.nodeagent.storage import pv_object, wants_provisioning
from localcluster.nodeagent.volumes import Volume, VolumeError, container_mounts


@pytest.mark.parametrize("text,value", [("2", 2), ("500m", Fraction(1, 2)), ("64Gi", 64 * 2**30), ("1e3", 1000),
                                        ("1.5G", 1_500_000_000), ("0.5", Fraction(1, 2))])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


def test_parse_quantity_rejects_nonsense():
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("12 GB")


def test_node_spec_defaults_aliases_and_errors():
    spec = parse_node_spec("big-0:gpu=8,memory=512Gi")
    assert spec.name == "big-0" and spec.gpus == 8
    assert spec.capacity == {"cpu": "16", "memory": "512Gi", GPU: "8", "pods": "110", "ephemeral-storage": "200Gi"}
    with pytest.raises(ValueError, match="resource cpu"):
        parse_node_spec("n:cpu=lots")
    with pytest.raises(ValueError, match="RESOURCE=QUANTITY"):
        parse_node_spec("n:gpu")
    assert parse_taint("a=b:NoSchedule") == {"key": "a", "value": "b", "effect": "NoSchedule"}
    with pytest.raises(ValueError, match="EFFECT"):
        parse_taint("a=b:Sometimes")


def test_not_ready_taints_are_removed_and_others_kept():
    mine = {"key": "rlhf.io/x", "effect": "NoSchedule"}
    assert without_not_ready_taints([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}, mine]) == [mine]
    assert without_not_ready_taints([mine]) is None


def test_node_condition_transition_time_moves_only_on_change():
    transitions: dict[str, str] = {}
    first = {c["type"]: c for c in node_conditions(True, "t1", transitions)}
    again = {c["type"]: c for c in node_conditions(True, "t2", transitions)}
    down = {c["type"]: c for c in node_conditions(False, "t3", transitions)}
    assert again["Ready"]["lastTransitionTime"] == "t1" and again["Ready"]["lastHeartbeatTime"] == "t2"
    assert down["Ready"]["status"] == "False" and down["Ready"]["lastTransitionTime"] == "t3"
    assert first["MemoryPressure"]["status"] == "False"


def _c(state, code=None, last=None):
    c = ContainerState("c", "img", state=state, exit_code=code)
    c.last_terminated = last
    return c


@pytest.mark.parametrize("policy,init,main,phase", [
    ("Never", [], [_c("waiting")], "Pending"),
    ("Never", [], [_c("running")], "Running"),
    ("Never", [], [_c("terminated", 0)], "Succeeded"),
    ("Never", [], [_c("terminated", 0), _c("terminated", 3)], "Failed"),
    ("Never", [], [_c("terminated", 3), _c("running")], "Running"),
    ("OnFailure", [], [_c("waiting", last={"exitCode": 1})], "Running"),  # in crash-loop backoff
    ("OnFailure", [], [_c("terminated", 0)], "Succeeded"),
    ("Always", [], [_c("terminated", 0)], "Running"),
    ("Never", [_c("terminated", 1)], [_c("waiting")], "Failed"),
    ("OnFailure", [_c("waiting", last={"exitCode": 1})], [_c("waiting")], "Pending"),
    ("Never", [_c("terminated", 0)], [_c("running")], "Running"),
])
def test_pod_phase_follows_kubelet_rules(policy, init, main, phase):
    assert pod_phase(policy, init, main) == phase


def test_backoff_is_short_and_capped():
    assert [backoff_seconds(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_expand_like_kubernetes():
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def _ctx():
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "x"}},
           "spec": {"nodeName": "n0", "containers": []}}
    return PodContext(pod, "127.9.0.7", "127.0.0.1")


def test_resolve_env_sources_order_and_errors():
    maps = {("ns", "cm"): {"K": "from-cm", "LR": "0.1"}}
    secrets = {("ns", "s"): {"pw": "hunter2"}}
    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CFG_"}],
                 "env": [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                         {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                         {"name": "URL", "value": "http://$(IP):80"},
                         {"name": "CFG_K", "value": "overridden"},
                         {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k",
                                                                           "optional": True}}}],
                 "command": ["run", "--ip=$(IP)"]}
    env = resolve_env(container, _ctx(), lambda ns, n: maps.get((ns, n)), lambda ns, n: secrets.get((ns, n)))
    assert env == {"CFG_K": "overridden", "CFG_LR": "0.1", "IP": "127.9.0.7", "APP": "x", "PW": "hunter2",
                   "URL": "http://127.9.0.7:80"}
    assert command_line(container, env) == ["run", "--ip=127.9.0.7"]
    missing = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "other"}}}]}
    with pytest.raises(ContainerConfigError, match="secretKeyRef ns/s has no key 'other'"):
        resolve_env(missing, _ctx(), lambda *a: None, lambda ns, n: secrets.get((ns, n)))
    with pytest.raises(ContainerConfigError, match="set `command` explicitly"):
        command_line({"name": "c", "image": "trainer:1", "args": ["x"]}, {})


def test_mount_plan_orders_parents_first_and_refuses_to_hide_the_python_env(tmp_path):
    vols = {"a": Volume(str(tmp_path), False), "cfg": Volume(str(tmp_path), True)}
    container = {"name": "c", "volumeMounts": [{"name": "a", "mountPath": "/data/sub", "subPath": "x"},
                                               {"name": "a", "mountPath": "/data"},
                                               {"name": "cfg", "mountPath": "/etc/rlhf", "readOnly": False}]}
    mounts = container_mounts(container, vols, {})
    assert [m.dst for m in mounts] == ["/data", "/data/sub", "/etc/rlhf"]
    assert [m.read_only for m in mounts] == [False, False, True]  # configMap-like volumes are always read-only
    assert os.path.isdir(tmp_path / "x")
    venv_parent = os.path.dirname(sys.prefix)
    with pytest.raises(VolumeError, match="would hide"):
        container_mounts({"name": "c", "volumeMounts": [{"name": "a", "mountPath": venv_parent}]}, vols, {})
    with pytest.raises(VolumeError, match="no volume named 'b'"):
        container_mounts({"name": "c", "volumeMounts": [{"name": "b", "mountPath": "/b"}]}, vols, {})


def test_address_pool_is_distinct_round_robin_and_loopback_only():
    pool = AddressPool(parse_pod_network("127.77.0.0/30"))
    a, b = pool.allocate(), pool.allocate()
    assert a != b and a.startswith("127.77.")
    pool.release(a)
    with pytest.raises(RuntimeError, match="in use"):
        pool.allocate(), pool.allocate()
    assert default_pod_network("/tmp/x") == default_pod_network("/tmp/x")
    with pytest.raises(ValueError, match="loopback"):
        parse_pod_network("10.0.0.0/16")
    with pytest.raises(ValueError, match="host address"):
        parse_pod_network("127.0.0.0/16")


def test_provisioner_picks_its_claims_and_builds_a_prebound_volume():
    pvc = {"metadata": {"name": "ckpt", "namespace": "ns", "uid": "u1", "resourceVersion": "5"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "3Gi"}},
                    "storageClassName": "local-path"}, "status": {"phase": "Pending"}}
    assert wants_provisioning(pvc)
    assert not wants_provisioning({**pvc, "spec": {**pvc["spec"], "storageClassName": "fast-ssd"}})
    assert not wants_provisioning({**pvc, "spec": {**pvc["spec"], "volumeName": "pv-x"}})
    pv = pv_object(pvc, "/state/volumes/pvc-u1")
    assert pv["metadata"]["name"] == "pvc-u1"
    assert pv["spec"]["capacity"] == {"storage": "3Gi"}
    assert pv["spec"]["claimRef"]["uid"] == "u1" and pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root (the agent runs as root)")
def test_shim_mounts_privately_and_read_only(tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("input")
    term = tmp_path / "term"
    term.write_text("")
    target = tmp_path / "mnt"
    script = (f"import errno\nopen('{target}/rw/out.txt', 'w').write(open('{target}/ro/in.txt').read())\n"
              f"try:\n    open('{target}/ro/x', 'w')\nexcept OSError as e:\n    assert e.errno == errno.EROFS, e\n"
              f"else:\n    raise SystemExit('read-only mount was writable')\n"
              f"open('/dev/termination-log', 'w').write('done')\n")
    plan = {"mounts": [{"src": str(rw), "dst": f"{target}/rw", "ro": False, "file": False},
                       {"src": str(ro), "dst": f"{target}/ro", "ro": True, "file": False},
                       {"src": str(term), "dst": "/dev/termination-log", "ro": False, "file": True}],
            "cwd": str(tmp_path), "argv": [sys.executable, "-c", script], "start_error": str(tmp_path / "err")}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run = subprocess.run([sys.executable, "-I", "-S", SHIM, str(tmp_path / "plan.json")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (rw / "out.txt").read_text() == "input" and term.read_text() == "done"
    with open("/proc/self/mounts") as f:
        assert str(target) not in f.read()  # nothing leaked into the host's mount table

    plan["argv"] = ["no-such-binary"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run = subprocess.run([sys.executable, "-I", "-S", SHIM, str(tmp_path / "plan.json")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 128
    assert (tmp_path / "err").read_text() == 'exec: "no-such-binary": executable file not found in $PATH'


def test_process_user_from_security_context():
    pod_spec = {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                    "supplementalGroups": [3000]}}
    assert process_user(pod_spec, {"name": "c"}) == {"uid": 1000, "gid": 1000, "groups": [2000, 3000]}
    assert process_user(pod_spec, {"name": "c", "securityContext": {"runAsUser": 7, "runAsGroup": 8}})["gid"] == 8
    # without runAsGroup: the user's group in the (host's) passwd, else 0, as a runtime does
    assert process_user({"securityContext": {"runAsUser": 54321}}, {"name": "c"})["gid"] == 0
    assert process_user({}, {"name": "c"}) is None
    with pytest.raises(ContainerConfigError, match="runAsNonRoot and image will run as root.*no runAsUser"):
        process_user({"securityContext": {"runAsNonRoot": True}}, {"name": "c"})
    with pytest.raises(ContainerConfigError, match="runAsNonRoot and image will run as root.*runAsUser is 0"):
        process_user({"securityContext": {"runAsNonRoot": True}}, {"name": "c", "securityContext": {"runAsUser": 0}})
    # the container's value wins, even a false runAsNonRoot over the pod's true
    assert process_user({"securityContext": {"runAsNonRoot": True}},
                        {"name": "c", "securityContext": {"runAsNonRoot": False}}) is None


DEFAULT_CAP_MASK = 0xA80425FB  # CapEff of a Docker/containerd container that asks for nothing


def test_capabilities_start_from_the_runtime_default_then_drop_and_add():
    def mask(sc):
        return sum(1 << c for c in capability_set({"name": "c", "securityContext": sc}))

    assert mask({}) == DEFAULT_CAP_MASK
    assert mask({"capabilities": {"drop": ["ALL"]}}) == 0
    assert mask({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}) == 1 << 10
    assert mask({"capabilities": {"drop": ["CAP_KILL"], "add": ["sys_ptrace"]}}) == DEFAULT_CAP_MASK - (1 << 5) + (1 << 19)
    assert mask({"privileged": True, "capabilities": {"drop": ["ALL"]}}) == (1 << 41) - 1
    with pytest.raises(ContainerConfigError, match="unknown capability 'NET_SUPERPOWER'"):
        mask({"capabilities": {"add": ["NET_SUPERPOWER"]}})


def test_container_security_of_a_trainer_pod():
    pod = {"metadata": {"namespace": "ns", "name": "p"},
           "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001}}}
    c = {"name": "trainer", "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}}
    assert container_security(pod, c) == {"user": {"uid": 10001, "gid": 10001, "groups": [10001]},
                                          "capabilities": [], "no_new_privs": True, "read_only_root": True}
    bare = container_security({"metadata": {}, "spec": {}}, {"name": "c"})  # root, like a container by default
    assert bare["user"] is None and not bare["no_new_privs"] and not bare["read_only_root"]
    with pytest.raises(ContainerConfigError, match="allowPrivilegeEscalation"):
        container_security(pod, {"name": "c", "securityContext": {"privileged": True, "allowPrivilegeEscalation": False}})


def test_oom_kill_is_reported_only_for_a_failed_run():
    assert terminated_reason(137, None, oom_killed=True) == "OOMKilled"
    assert terminated_reason(137, None) == "Error"  # a plain SIGKILL
    assert terminated_reason(1, None) == "Error"
    assert terminated_reason(0, None, oom_killed=True) == "Completed"
    assert terminated_reason(128, "exec failed", oom_killed=True) == "StartError"


def test_memory_limit_in_bytes():
    from localcluster.nodeagent.pods import memory_limit

    assert memory_limit({"name": "c", "resources": {"limits": {"memory": "64Mi"}}}) == 64 * 2**20
    assert memory_limit({"name": "c", "resources": {"requests": {"memory": "64Mi"}}}) is None
    with pytest.raises(ContainerConfigError, match="limits.memory"):
        memory_limit({"name": "c", "resources": {"limits": {"memory": "lots"}}})


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_fs_group_makes_a_volume_group_writable_and_setgid(tmp_path):
    import stat

    from localcluster.nodeagent.volumes import apply_fs_group

    (tmp_path / "sub").mkdir(mode=0o700)
    (tmp_path / "sub" / "f").write_text("x")
    os.chmod(tmp_path / "sub" / "f", 0o600)
    (tmp_path / "link").symlink_to("/etc/passwd")
    apply_fs_group(str(tmp_path), 4242, read_only=False)
    for path, is_dir in ((tmp_path, True), (tmp_path / "sub", True), (tmp_path / "sub" / "f", False)):
        st = os.stat(path)
        assert st.st_gid == 4242, path
        assert stat.S_IMODE(st.st_mode) & 0o060 == 0o060, path
        assert bool(st.st_mode & stat.S_ISGID) == is_dir, path
    assert os.stat("/etc/passwd").st_gid == 0  # a symlink's target is never touched


@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
def test_shim_drops_root_when_asked(tmp_path):
    plan = {"mounts": [], "cwd": "/", "argv": ["/bin/sh", "-c", "id -u; id -g; id -G"],
            "start_error": str(tmp_path / "err"), "user": {"uid": 65534, "gid": 65534, "groups": [2000]}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run = subprocess.run([sys.executable, "-I", "-S", SHIM, str(tmp_path / "plan.json")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["65534", "65534", "65534", "2000"]
    assert (tmp_path / "err").read_text() == ""


def test_a_new_pod_with_the_same_name_starts_a_fresh_log(tmp_path):
    from localcluster.nodeagent.pods import fresh_log_for_pod

    log = tmp_path / "ns" / "pod" / "main.log"
    fresh_log_for_pod(str(log), "uid-1")
    log.write_text("first pod\n")
    fresh_log_for_pod(str(log), "uid-1")  # a container restart in the same pod keeps the log
    assert log.read_text() == "first pod\n"
    fresh_log_for_pod(str(log), "uid-2")  # the same name, a new pod object
    assert log.read_text() == ""


def test_scratch_volume_over_the_checkout_keeps_it_visible_but_data_volumes_are_refused(tmp_path):
    import sys

    import pytest

    from localcluster.nodeagent.volumes import Volume, VolumeError, container_mounts

    over_venv = sys.prefix.rsplit("/", 1)[0] or "/"
    c = {"name": "main", "volumeMounts": [{"name": "scratch", "mountPath": over_venv}]}
    mounts = container_mounts(c, {"scratch": Volume(str(tmp_path), False, scratch=True)}, {})
    # the scratch volume is mounted, then the covered checkout is bound back on top of it
    assert [(m.src, m.dst) for m in mounts] == [(str(tmp_path), over_venv), (over_venv, over_venv)]
    with pytest.raises(VolumeError, match="would hide"):
        container_mounts(c, {"scratch": Volume(str(tmp_path), False, scratch=False)}, {})


def _run_shim(tmp_path, plan: dict) -> subprocess.CompletedProcess:
    plan = {"mounts": [], "cwd": "/", "start_error": str(tmp_path / "err"), **plan}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return subprocess.run([sys.executable, "-I", "-S", SHIM, str(tmp_path / "plan.json")], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the shim needs root, as the agent does")
def test_shim_enforces_user_capabilities_no_new_privs_and_read_only_root(tmp_path):
    from localcluster.nodeagent.volumes import runtime_paths

    volume = tmp_path / "volume"
    volume.mkdir()
    os.chmod(volume, 0o777)
    # A directory any uid may write to, reachable by any uid (pytest's tmp_path is not): only a read-only
    # mount can refuse the write.
    host_dir = Path(tempfile.mkdtemp(prefix="shim-rofs-", dir="/tmp"))
    os.chmod(host_dir, 0o777)
    try:
        _check_enforced(tmp_path, volume, host_dir, runtime_paths())
    finally:
        shutil.rmtree(host_dir)


def _check_enforced(tmp_path, volume, host_dir, expose):
    script = ("import json, os, sys\n"
              "status = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
              "def attempt(path):\n"
              "    try:\n"
              "        open(path, 'w').write('x')\n"
              "        return 'ok'\n"
              "    except OSError as e:\n"
              "        return e.errno\n"
              f"print(json.dumps({{'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),\n"
              "    'cap_eff': status['CapEff'], 'cap_bnd': status['CapBnd'], 'nnp': status['NoNewPrivs'],\n"
              f"    'host': attempt('{host_dir}/f'), 'volume': attempt('{host_dir}/vol/f')}}))\n")
    plan = {"mounts": [{"src": str(volume), "dst": f"{host_dir}/vol", "ro": False, "file": False}],
            "argv": [sys.executable, "-c", script], "user": {"uid": 10001, "gid": 10001, "groups": [10001]},
            "capabilities": [], "no_new_privs": True, "read_only_root": True, "expose": expose}
    run = _run_shim(tmp_path, plan)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert (got["uid"], got["gid"], got["groups"]) == (10001, 10001, [10001])
    assert int(got["cap_eff"], 16) == 0 and int(got["cap_bnd"], 16) == 0 and got["nnp"] == "1"
    assert got["host"] == 30  # EROFS: the root filesystem is read-only, though the directory is 0777
    assert got["volume"] == "ok" and (volume / "f").read_text() == "x"
    assert not (host_dir / "f").exists()

    # uid 0 without a securityContext: the runtime's default capabilities, a writable root
    plan.update(user=None, capabilities=capability_set({"name": "c"}), no_new_privs=False, read_only_root=False)
    run = _run_shim(tmp_path, plan)
    got = json.loads(run.stdout)
    assert got["uid"] == 0 and int(got["cap_eff"], 16) == DEFAULT_CAP_MASK and got["host"] == "ok", run.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the shim needs root, as the agent does")
def test_shim_joins_a_memory_cgroup_whose_limit_oom_kills(tmp_path):
    from localcluster.nodeagent import cgroups

    parent, why = cgroups.detect()
    if parent is None:
        pytest.skip(f"no memory cgroup here: {why}")
    group = parent.create(f"unit-{os.getpid()}", 64 * 2**20)
    try:
        run = _run_shim(tmp_path, {"argv": [sys.executable, "-c", "b = bytearray(1 << 30)"], "cgroup": group.path})
        assert run.returncode == -9 and group.oom_kills() == 1, run.stderr
    finally:
        assert group.destroy()
    assert not os.path.exists(group.path)


@pytest.mark.skipif(os.geteuid() != 0, reason="the shim needs root, as the agent does")
def test_shim_falls_back_to_an_address_space_limit(tmp_path):
    run = _run_shim(tmp_path, {"argv": [sys.executable, "-c", "b = bytearray(1 << 30)"], "rlimit_as": 512 * 2**20})
    assert run.returncode == 1 and "MemoryError" in run.stderr, run.stderr


def _dns_pod(**spec) -> dict:
    return {"metadata": {"name": "web-server", "namespace": "team"}, "spec": spec}


def test_pod_resolv_conf_follows_dns_policy_and_dns_config():
    host = "nameserver 10.255.255.53\nsearch corp.example\noptions edns0\n"
    conf = pod_resolv_conf(_dns_pod(), "127.40.255.254", "cluster.local", host)
    assert conf == ("nameserver 127.40.255.254\n"
                    "search team.svc.cluster.local svc.cluster.local cluster.local corp.example\noptions ndots:5\n")
    assert pod_resolv_conf(_dns_pod(hostNetwork=True), "127.40.255.254", "cluster.local", host) is None
    assert pod_resolv_conf(_dns_pod(dnsPolicy="Default"), "127.40.255.254", "cluster.local", host) is None
    assert pod_resolv_conf(_dns_pod(), "", "cluster.local", host) is None  # no cluster DNS: the host's file
    with_net = pod_resolv_conf(_dns_pod(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"), "127.40.255.254",
                               "cluster.local", host)
    assert with_net.startswith("nameserver 127.40.255.254\n")
    custom = pod_resolv_conf(_dns_pod(dnsPolicy="None", dnsConfig={
        "nameservers": ["1.2.3.4"], "searches": ["a.example"], "options": [{"name": "ndots", "value": "2"}]}),
        "127.40.255.254", "cluster.local", host)
    assert custom == "nameserver 1.2.3.4\nsearch a.example\noptions ndots:2\n"


def test_pod_hosts_file_names_the_pod_and_its_fqdn():
    hosts = pod_hosts_file(_dns_pod(hostname="web-0", subdomain="web",
                                    hostAliases=[{"ip": "127.0.0.9", "hostnames": ["db"]}]), "127.40.0.7", "cluster.local")
    assert "127.40.0.7\tweb-0.web.team.svc.cluster.local\tweb-0\n" in hosts
    assert "127.0.0.1\tlocalhost\n" in hosts and "127.0.0.9\tdb\n" in hosts
    assert "127.40.0.8\tweb-server\n" in pod_hosts_file(_dns_pod(), "127.40.0.8", "cluster.local")
    assert pod_hostname({"metadata": {"name": "p" * 70}, "spec": {}}) == "p" * 63


def test_cluster_dns_listens_on_the_pod_networks_last_address_and_never_forwards_to_itself():
    assert dns_address("127.40.0.0/16") == "127.40.255.254"
    pool = AddressPool(parse_pod_network("127.40.0.0/30"))
    pool.reserve(dns_address("127.40.0.0/30"))
    assert pool.allocate() == "127.40.0.1"
    assert upstreams("nameserver 127.40.255.254\nnameserver 10.255.255.53\nnameserver bogus\n",
                     "127.40.255.254") == ["10.255.255.53"]
    conf = corefile("127.40.255.254", 5353, "/state/kubeconfig", ["10.255.255.53"])
    assert "bind 127.40.255.254" in conf and "ready 127.0.0.1:5353" in conf
    assert "kubeconfig /state/kubeconfig" in conf and "forward . 10.255.255.53" in conf
    assert "forward" not in corefile("127.40.255.254", 5353, "/k", [])

