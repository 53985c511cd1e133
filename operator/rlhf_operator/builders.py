"""Child objects of a job, built by pure functions (dict in, dict out).

Their names come from :mod:`rlhf_operator.names`. Every child carries the label
`rlhf.io/job-uid: <job uid>` (pods and config maps also an owner reference; a retained claim has
none), which is how the operator tells its own children from objects that merely have their names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from typing import Any

from rlhf_trainer import config as tc
from rlhf_trainer import contract

from rlhf_operator import jobspec, names, ppo_spec
from rlhf_operator.crd_schema import API_VERSION, DEFAULT_SAVE_GRACE_SECONDS, KINDS, camel, spec_path
from rlhf_operator.settings import Settings

LABEL_JOB = "rlhf.io/job"
LABEL_KIND = "rlhf.io/kind"
LABEL_STAGE = "rlhf.io/stage"
LABEL_ATTEMPT = "rlhf.io/attempt"
LABEL_RANK = "rlhf.io/rank"  # a multi-node job's pod: its node rank
LABEL_JOB_UID = "rlhf.io/job-uid"  # which job created the object: a retained claim has no owner reference
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "rlhf-operator"
ANN_RESTART_COUNT = "rlhf.io/restart-count"
ANN_CONFIG_HASH = "rlhf.io/config-hash"
CONTAINER = "trainer"
CLAIMS_MOUNT = "/mnt/claims"
CONFIGMAPS_MOUNT = "/mnt/configmaps"
CONFIG_PATH = posixpath.join(tc.CONFIG_MOUNT_DIR, tc.CONFIG_FILE_NAME)
GPU_RESOURCE = "nvidia.com/gpu"
GANG_GATE = "rlhf.io/gang"  # a multi-node job's pods wait behind it until the whole gang may start (policies.gang)
RENDEZVOUS_PORT = 29500  # torchrun's store on rank 0 (each pod has its own network namespace)
TORCHRUN_SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun: seconds from SIGTERM to SIGKILL of its workers
SCRATCH_MOUNT = "/tmp"
# Trainer pods run with a read-only root filesystem: HOME and every cache go to the /tmp emptyDir
# (the same values as the trainer image's ENV; a job's spec.env may set its own).
SCRATCH_ENV = {
    "HOME": SCRATCH_MOUNT,
    "XDG_CACHE_HOME": f"{SCRATCH_MOUNT}/.cache",
    "HF_HOME": f"{SCRATCH_MOUNT}/.cache/huggingface",
    "TRITON_CACHE_DIR": f"{SCRATCH_MOUNT}/.cache/triton",
    "TORCH_EXTENSIONS_DIR": f"{SCRATCH_MOUNT}/.cache/torch_extensions",
}


def labels(kind: str, name: str) -> dict[str, str]:
    return {
        LABEL_JOB: name,
        LABEL_KIND: kind,
        LABEL_STAGE: KINDS[kind].stage,
        LABEL_MANAGED_BY: MANAGER,
        "app.kubernetes.io/part-of": "rlhf-platform",
    }


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": job["kind"],
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(job: dict[str, Any], name: str, owned: bool = True) -> dict[str, Any]:
    m = job["metadata"]
    meta = {"name": name, "namespace": m["namespace"],
            "labels": {**labels(job["kind"], m["name"]), LABEL_JOB_UID: m["uid"]}}
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


# --- volumes ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mount:
    """A read-only input volume: a claim or a ConfigMap, at a fixed place."""

    volume: dict[str, Any]  # the pod volume source, without its name
    path: str


def _claim_mount(claim: str, where: str) -> Mount:
    return Mount({"persistentVolumeClaim": {"claimName": claim, "readOnly": True}}, _under(CLAIMS_MOUNT, claim, where))


def _job_mount(job: str, claim: str, where: str) -> Mount:
    return Mount({"persistentVolumeClaim": {"claimName": claim, "readOnly": True}}, _under(tc.INPUTS_MOUNT, job, where))


def _under(root: str, rel: str, where: str) -> str:
    """root/rel, never outside root: a user-given name or path that would climb out (`..`) is refused
    with a tc.ConfigError naming the trainer config field `where` (render_config maps it to spec.*)."""
    path = posixpath.normpath(posixpath.join(root, rel.lstrip("/"))) if rel else root
    if ".." in rel.split("/") or not (path == root or path.startswith(root.rstrip("/") + "/")):
        raise tc.ConfigError(f"{where}: {rel!r} would leave {root}; name a path inside it without '..'")
    return path


def resolve_model(
    kind: str, role: str, source: dict[str, Any], where: str = "model"
) -> tuple[dict[str, Any], list[Mount]]:
    """A CRD model source -> (TrainerConfig ModelConfig dict, volumes it needs). A fromJob mounts the
    upstream job's claim, named by (kind, name) (names.pvc_name)."""
    model: dict[str, Any] = {}
    mounts: list[Mount] = []
    tokenizer = source.get("tokenizerPath", "")
    ref = source.get("fromJob")
    if isinstance(ref, dict) and ref.get("name"):
        job, up_kind = ref["name"], jobspec.from_job_kind(kind, role, ref)
        mount = _job_mount(job, names.pvc_name(up_kind, job), f"{where}.from_job.name")
        mounts.append(mount)
        model["path"] = posixpath.join(mount.path, tc.FINAL_SUBDIR)
    elif source.get("claim"):
        mount = _claim_mount(source["claim"], f"{where}.claim")
        mounts.append(mount)
        if not source.get("initFromConfig"):  # a fresh model reads only its tokenizer from the claim
            model["path"] = _under(mount.path, source.get("path", ""), f"{where}.path")
        tokenizer = _under(mount.path, tokenizer, f"{where}.tokenizer_path") if tokenizer else ""
    elif source.get("path"):
        model["path"] = source["path"]
    elif source.get("hubId"):
        model["hub_id"] = source["hubId"]
    if source.get("initFromConfig"):
        model["init_from_config"] = dict(source["initFromConfig"])
    if tokenizer:
        model["tokenizer_path"] = tokenizer
    return model, mounts


def resolve_dataset(ds: dict[str, Any], where: str = "dataset") -> tuple[dict[str, Any], list[Mount]]:
    """A CRD dataset -> (TrainerConfig DatasetConfig dict, volumes it needs)."""
    options = {k: v for k, v in ds.items() if k not in ("path", "claim", "configMap", "hubId")}
    out = _snake_section(tc.DatasetConfig, options)
    mounts: list[Mount] = []
    if ds.get("configMap"):
        cm = ds["configMap"]
        mount = Mount({"configMap": {"name": cm["name"]}},
                      _under(CONFIGMAPS_MOUNT, cm["name"], f"{where}.config_map.name"))
        mounts.append(mount)
        key = cm["key"]
        if "/" in key:  # a key is one file name
            raise tc.ConfigError(f"{where}.config_map.key: {key!r} is not a ConfigMap key; name a key of the ConfigMap")
        out["path"] = _under(mount.path, key, f"{where}.config_map.key")
    elif ds.get("claim"):
        mount = _claim_mount(ds["claim"], f"{where}.claim")
        mounts.append(mount)
        out["path"] = _under(mount.path, ds.get("path", ""), f"{where}.path")
    elif ds.get("path"):
        out["path"] = ds["path"]
    elif ds.get("hubId"):
        out["hub_id"] = ds["hubId"]
    return out, mounts


def _snake_section(cls: type, section: dict[str, Any]) -> dict[str, Any]:
    """camelCase CRD section -> snake_case trainer section; unknown keys pass through so the
    trainer's parser names them."""
    names = {camel(f.name): f.name for f in dataclasses.fields(cls)}
    return {names.get(k, k): v for k, v in (section or {}).items()}


# --- the trainer config --------------------------------------------------------------------

def trainer_config_dict(job: dict[str, Any], settings: Settings) -> tuple[dict[str, Any], list[Mount]]:
    """The TrainerConfig (as a plain dict) for a job and the input volumes it refers to."""
    kind, meta, spec = job["kind"], job["metadata"], job.get("spec") or {}
    mounts: list[Mount] = []
    cfg: dict[str, Any] = {
        "stage": KINDS[kind].stage,
        "job": {"name": meta["name"], "namespace": meta["namespace"], "kind": kind},
        "training": _snake_section(tc.TrainingConfig, spec.get("training")),
        "deepspeed": _snake_section(tc.DeepSpeedConfig, spec.get("deepspeed")),
        "checkpoint": {"dir": tc.CHECKPOINT_MOUNT, "resume": True},
        "metrics": {"port": settings.trainer_metrics_port, "host": ""},
    }
    cp = spec.get("checkpoint") or {}
    if "everySteps" in cp:
        cfg["checkpoint"]["every_steps"] = cp["everySteps"]
    if "keepLast" in cp:
        cfg["checkpoint"]["keep_last"] = cp["keepLast"]
    cfg["dataset"], ms = resolve_dataset(spec.get("dataset") or {})
    mounts += ms
    if kind == "PPOJob":
        ppo = _snake_section(tc.PPOConfig, spec.get("ppo"))
        roles = (("actor", "actor"), ("rewardModel", "reward_model"), ("critic", "critic"), ("reference", "reference"))
        for role, key in roles:
            if isinstance(spec.get(role), dict):
                ppo[key], ms = resolve_model(kind, role, spec[role], f"ppo.{key}")
                mounts += ms
        if spec.get("ptxDataset"):
            ppo["ptx_dataset"], ms = resolve_dataset(spec["ptxDataset"], "ppo.ptx_dataset")
            mounts += ms
        if isinstance(spec.get("reward"), dict):  # reward sources; an endpoint's token Secret becomes a file
            ppo["rewards"], volumes = ppo_spec.render_reward(spec["reward"])
            mounts += [Mount(volume, path) for volume, path in volumes]
        cfg["ppo"] = ppo
    elif kind == "DPOJob":
        cfg["dpo"], ms = _dpo_section(spec)
        mounts += ms
    else:
        cfg["model"], ms = resolve_model(kind, "model", spec.get("model") or {})
        mounts += ms
        if kind == "SFTJob":
            cfg["sft"] = _snake_section(tc.SFTConfig, spec.get("sft"))
        else:
            cfg["reward"] = _snake_section(tc.RewardConfig, spec.get("reward"))
    cfg["inputs"] = {
        ref.name: posixpath.join(tc.INPUTS_MOUNT, ref.name, tc.FINAL_SUBDIR) for ref in jobspec.dependencies(kind, spec)
    }
    unique: dict[str, Mount] = {}
    for m in mounts:
        unique.setdefault(m.path, m)  # e.g. actor and reference from the same job share one volume
    return cfg, list(unique.values())


def _dpo_section(spec: dict[str, Any]) -> tuple[dict[str, Any], list[Mount]]:
    """spec.dpo, spec.policy, spec.reference and spec.online -> the trainer's ``dpo`` section and its volumes."""
    dpo = _snake_section(tc.DPOConfig, spec.get("dpo"))
    mounts: list[Mount] = []
    for role in ("policy", "reference"):
        if isinstance(spec.get(role), dict):
            dpo[role], ms = resolve_model("DPOJob", role, spec[role], f"dpo.{role}")
            mounts += ms
    online = spec.get("online")
    if isinstance(online, dict):
        dpo["online"] = _snake_section(tc.DPOOnlineConfig, {k: v for k, v in online.items() if k != "rewardModel"})
        if isinstance(online.get("rewardModel"), dict):
            dpo["online"]["reward_model"], ms = resolve_model("DPOJob", "online.rewardModel", online["rewardModel"],
                                                              "dpo.online.reward_model")
            mounts += ms
    return dpo, mounts


def render_config(job: dict[str, Any], settings: Settings) -> tuple[tc.TrainerConfig, list[Mount]]:
    """Parse and validate the rendered config with the trainer's own parser.

    Raises tc.ConfigError whose message names the CRD field (spec.*)."""
    try:
        data, mounts = trainer_config_dict(job, settings)  # raises on a path that leaves its volume
        return tc.from_dict(data), mounts
    except tc.ConfigError as e:
        text = str(e)
        head, sep, tail = text.partition(":")
        if sep and " " not in head:
            text = f"{spec_path(head)}:{tail}"
        raise tc.ConfigError(text) from e


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- child objects ------------------------------------------------------------------------

def build_configmap(job: dict[str, Any], config_yaml: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, names.configmap_name(job["kind"], job["metadata"]["name"])),
        "data": {tc.CONFIG_FILE_NAME: config_yaml},
    }


def build_pvc(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The checkpoint claim. Retained claims (the default) carry no owner reference, so deleting
    the job keeps the trained model; the job-uid label still says which job created it."""
    cp = (job.get("spec") or {}).get("checkpoint") or {}
    retain = cp.get("retainPolicy", "Retain") == "Retain"
    spec: dict[str, Any] = {
        "accessModes": [cp.get("accessMode", "ReadWriteOnce")],
        "resources": {"requests": {"storage": str(cp.get("size") or settings.checkpoint_size)}},
    }
    storage_class = cp.get("storageClass") or settings.checkpoint_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(job, names.pvc_name(job["kind"], job["metadata"]["name"]), owned=not retain),
        "spec": spec,
    }


def save_grace_seconds(spec: dict[str, Any]) -> int:
    """spec.checkpoint.saveGraceSeconds: the pods' termination grace (the trainer checkpoints on SIGTERM)."""
    return int((spec.get("checkpoint") or {}).get("saveGraceSeconds", DEFAULT_SAVE_GRACE_SECONDS))


def nodes_of(spec: dict[str, Any]) -> int:
    """spec.resources.nodes: the pods of one attempt."""
    return int((spec.get("resources") or {}).get("nodes", 1) or 1)


def rendezvous_host(kind: str, job: str, namespace: str) -> str:
    """Rank 0's DNS name under the job's headless Service (namespace-qualified: no search path needed)."""
    return f"{names.worker_hostname(kind, job, 0)}.{names.service_name(kind, job)}.{namespace}.svc"


def trainer_command(stage: str, gpus: int, settings: Settings, nodes: int = 1, rank: int = 0,
                    master: str = "") -> list[str]:
    """One process per GPU (at least one); several nodes: torchrun with static rendezvous on rank 0's `master`
    address - node rank r is fixed by its pod, and rank 0 hosts the store, as in a PyTorchJob."""
    tail = [stage, "--config", CONFIG_PATH]
    if settings.trainer_command:
        return [*settings.trainer_command, *tail]
    if nodes > 1:
        return ["torchrun", f"--nnodes={nodes}", f"--node-rank={rank}", f"--nproc-per-node={max(gpus, 1)}",
                f"--master-addr={master}", f"--master-port={RENDEZVOUS_PORT}", "--max-restarts=0",
                "-m", "rlhf_trainer", *tail]
    if gpus > 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus}", "-m", "rlhf_trainer", *tail]
    return ["python", "-m", "rlhf_trainer", *tail]


def distributed_env(nodes: int, rank: int, gpus: int, master: str) -> list[dict[str, Any]]:
    """The PyTorchJob conventions: MASTER_ADDR/PORT, WORLD_SIZE (processes), RANK and NODE_RANK (this pod's node
    rank) and torchrun's PET_* defaults, so any command in the pod can join the job's process group."""
    per_node = max(gpus, 1)
    values = {
        "MASTER_ADDR": master, "MASTER_PORT": str(RENDEZVOUS_PORT), "WORLD_SIZE": str(nodes * per_node),
        "RANK": str(rank), "NODE_RANK": str(rank), "PET_NNODES": str(nodes), "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": str(per_node), "PET_MASTER_ADDR": master, "PET_MASTER_PORT": str(RENDEZVOUS_PORT),
    }
    return [{"name": k, "value": v} for k, v in values.items()]


def _env(job: dict[str, Any], rank: int | None = None) -> list[dict[str, Any]]:
    m = job["metadata"]
    field = lambda path: {"valueFrom": {"fieldRef": {"fieldPath": path}}}  # noqa: E731
    env = [
        {"name": contract.ENV_CONFIG, "value": CONFIG_PATH},
        {"name": contract.ENV_JOB_NAME, "value": m["name"]},
        {"name": contract.ENV_JOB_NAMESPACE, "value": m["namespace"]},
        {"name": contract.ENV_JOB_KIND, "value": job["kind"]},
        {"name": contract.ENV_POD_NAME, **field("metadata.name")},
        {"name": contract.ENV_POD_IP, **field("status.podIP")},
        {"name": contract.ENV_TERMINATION_LOG, "value": contract.DEFAULT_TERMINATION_LOG},
    ]
    if ((job.get("spec") or {}).get("resources") or {}).get("cpu") is not None:  # the trainer's torch threads
        env.append({"name": contract.ENV_CPU_REQUEST, "valueFrom": {"resourceFieldRef": {
            "containerName": CONTAINER, "resource": "requests.cpu", "divisor": "1"}}})
    spec = job.get("spec") or {}
    nodes, gpus = nodes_of(spec), (spec.get("resources") or {}).get("gpus", 1)
    if rank is not None and nodes > 1:
        env += distributed_env(nodes, rank, gpus, rendezvous_host(job["kind"], m["name"], m["namespace"]))
    user = [dict(v) for v in spec.get("env") or []]
    user_names = {v.get("name") for v in user}
    if (gpus > 1 or nodes > 1) and TORCHRUN_SHUTDOWN_ENV not in user_names:
        # torchrun SIGKILLs its workers 30 s after passing on SIGTERM unless told otherwise: a long save needs the grace
        env.append({"name": TORCHRUN_SHUTDOWN_ENV, "value": str(save_grace_seconds(spec))})
    scratch = [{"name": k, "value": v} for k, v in SCRATCH_ENV.items() if k not in user_names]
    return env + scratch + user


def _resources(spec: dict[str, Any]) -> dict[str, Any]:
    res = spec.get("resources") or {}
    gpus = res.get("gpus", 1)
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.get("cpu") is not None:
        requests["cpu"] = str(res["cpu"])
    if res.get("memory") is not None:
        requests["memory"] = limits["memory"] = str(res["memory"])
    if gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_service(job: dict[str, Any]) -> dict[str, Any]:
    """A multi-node job's headless Service: DNS names `<worker hostname>.<service>` for its pods. Not-ready
    addresses are published, so rank 0's name resolves as soon as its pod has an address."""
    kind, m = job["kind"], job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, names.service_name(kind, m["name"])),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_UID: m["uid"]},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def build_pods(
    job: dict[str, Any],
    settings: Settings,
    attempt: int,
    restart_count: int,
    config_digest: str,
    inputs: list[Mount],
) -> list[dict[str, Any]]:
    """The pods of one attempt: the one trainer pod, or (resources.nodes > 1) one per rank, each behind the
    gang's scheduling gate (policies.gang removes it from all of them together)."""
    nodes = nodes_of(job.get("spec") or {})
    if nodes <= 1:
        return [build_pod(job, settings, attempt, restart_count, config_digest, inputs)]
    return [build_pod(job, settings, attempt, restart_count, config_digest, inputs, rank) for rank in range(nodes)]


def build_pod(
    job: dict[str, Any],
    settings: Settings,
    attempt: int,
    restart_count: int,
    config_digest: str,
    inputs: list[Mount],
    rank: int | None = None,
) -> dict[str, Any]:
    """The trainer pod of one attempt (`rank`: of one node of a multi-node job). No API credentials: the
    operator scrapes progress from the pod's metrics port instead of the pod writing status."""
    kind, name, spec = job["kind"], job["metadata"]["name"], job.get("spec") or {}
    gpus = (spec.get("resources") or {}).get("gpus", 1)
    nodes = nodes_of(spec) if rank is not None else 1
    sched = spec.get("scheduling") or {}
    meta = _meta(job, names.pod_name(kind, name, attempt, rank if nodes > 1 else None))
    meta["labels"].update({LABEL_ATTEMPT: str(attempt), "app.kubernetes.io/name": "rlhf-trainer"})
    if nodes > 1:
        meta["labels"][LABEL_RANK] = str(rank)
    meta["annotations"] = {ANN_RESTART_COUNT: str(restart_count), ANN_CONFIG_HASH: config_digest}
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.configmap_name(kind, name)}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": names.pvc_name(kind, name)}},
        {"name": "scratch", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": tc.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "checkpoints", "mountPath": tc.CHECKPOINT_MOUNT},
        {"name": "scratch", "mountPath": SCRATCH_MOUNT},  # writable under a read-only root filesystem
    ]
    for i, m in enumerate(inputs):
        volumes.append({"name": f"input-{i}", **m.volume})
        mounts.append({"name": f"input-{i}", "mountPath": m.path, "readOnly": True})
    if gpus > 1:  # NCCL between local ranks needs more shared memory than the runtime's 64Mi default
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    tolerations = [dict(t) for t in sched.get("tolerations") or []]
    if gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    container = {
        "name": CONTAINER,
        "image": spec.get("image") or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(KINDS[kind].stage, gpus, settings, nodes, rank or 0,
                                   rendezvous_host(kind, name, job["metadata"]["namespace"]) if nodes > 1 else ""),
        "env": _env(job, rank),
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": dict(settings.trainer_container_security_context),
        "terminationMessagePath": contract.DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator replaces failed pods so it can count and resume
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": save_grace_seconds(spec),  # the trainer writes a checkpoint on SIGTERM
        "securityContext": dict(settings.trainer_pod_security_context),
        "containers": [container],
        "volumes": volumes,
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    for key in ("nodeSelector", "affinity", "priorityClassName"):
        if sched.get(key):
            pod_spec[key] = sched[key]
    if nodes > 1:  # a stable DNS name per rank, and held until the whole gang exists (policies.gang)
        pod_spec["hostname"] = names.worker_hostname(kind, name, rank or 0)
        pod_spec["subdomain"] = names.service_name(kind, name)
        pod_spec["schedulingGates"] = [{"name": GANG_GATE}]
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}

