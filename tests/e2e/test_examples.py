"""Every shipped manifest passes server-side validation against the CRDs (create with dryRun=All), keeps
every field it sets (a misspelled field would be pruned silently by the structural schema), passes the
operator's own rules and renders into a config the trainer's parser accepts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from e2e_helpers import REPO, op
from kubernetes.client.rest import ApiException
from rlhf_operator import builders, jobspec
from rlhf_operator.settings import from_env

MANIFESTS = sorted((REPO / "examples").glob("*/*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dropped(sent, got, where: str = "spec") -> list[str]:
    """Fields set in `sent` that `got` lacks or holds differently (schema defaults may be added)."""
    if isinstance(sent, dict) and isinstance(got, dict):
        return [f for k, v in sent.items() for f in dropped(v, got.get(k), f"{where}.{k}")]
    return [] if sent == got else [where]


def dry_run_create(jobs, doc: dict) -> dict:
    return jobs.api.create_namespaced_custom_object(op.GROUP, op.VERSION, jobs.ns, op.PLURALS[doc["kind"]], doc,
                                                    dry_run="All")


def test_examples_exist():
    dirs = {p.parent.name for p in MANIFESTS}
    assert {"pipeline", "pipeline-dpo", "gpu-cluster"} <= dirs, MANIFESTS
    kinds = {d["kind"] for p in MANIFESTS for d in documents(p)}
    assert kinds == {"SFTJob", "RewardModelJob", "PPOJob", "DPOJob"}


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(REPO / "examples")) for p in MANIFESTS])
def test_example_passes_server_side_validation(jobs, crds, path):
    settings = from_env({})
    for doc in documents(path):
        assert doc["apiVersion"] == f"{op.GROUP}/{op.VERSION}" and doc["kind"] in op.PLURALS, path
        created = dry_run_create(jobs, copy.deepcopy(doc))
        assert created["metadata"]["name"] == doc["metadata"]["name"]
        assert dropped(doc["spec"], created["spec"]) == [], f"{path}: the API server pruned or changed these"
        assert jobs.get(doc["kind"], doc["metadata"]["name"]) is None  # dry run: nothing stored
        # The rules beyond the schema (webhook / InvalidSpec) and the trainer's own config parser.
        assert jobspec.validate(doc["kind"], doc["metadata"]["name"], doc["spec"], settings.max_gpus_per_pod) == []
        job = {**copy.deepcopy(doc), "metadata": {**doc["metadata"], "namespace": jobs.ns, "uid": "u"}}
        cfg, _ = builders.render_config(job, settings)
        assert cfg.job.kind == doc["kind"]


def _gpu_example() -> dict:
    return documents(REPO / "examples" / "gpu-cluster" / "ppo-7b-zero3.yaml")[0]


def _set(doc: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


BROKEN = [
    ("spec.ppo.gamma", "high", "spec.ppo.gamma"),
    ("spec.resources.gpus", -8, "spec.resources.gpus"),
    ("spec.deepspeed.zeroStage", 4, "spec.deepspeed.zeroStage"),
    ("spec.dataset", None, "spec.dataset"),
]


@pytest.mark.parametrize("field, value, named", BROKEN, ids=[b[0] + ("=missing" if b[1] is None else f"={b[1]}") for b in BROKEN])
def test_broken_copy_is_rejected(jobs, crds, field, value, named):
    doc = _set(_gpu_example(), field, value)
    with pytest.raises(ApiException) as e:
        dry_run_create(jobs, doc)
    assert e.value.status == 422 and named in e.value.body, e.value.body


def test_misspelled_field_is_caught_by_the_comparison(jobs, crds):
    """The structural schema prunes unknown fields instead of rejecting them; the round-trip comparison
    of test_example_passes_server_side_validation is what notices a misspelled field."""
    doc = _gpu_example()
    doc["spec"]["trainig"] = doc["spec"].pop("training")
    created = dry_run_create(jobs, copy.deepcopy(doc))
    assert dropped(doc["spec"], created["spec"]) == ["spec.trainig"]
