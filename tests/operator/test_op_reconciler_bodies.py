"""Reconciler bookkeeping on the way to fewer requests and a faster first pod. A pass reads the newest body seen
of its job (watch events, answers to its own status writes) instead of GETting it: an older body never replaces a
newer one, and a deletion forgets it. The ConfigMap's text is the trainer's YAML, rendered by libyaml. The trigger
is replaced by a recorder (no API server: what is tested is the bookkeeping)."""

from __future__ import annotations

import asyncio

from rlhf_operator.reconciler import Reconciler
from rlhf_operator.settings import Settings

KEY = ("ns", "SFTJob", "j")


class Recording(Reconciler):
    async def trigger(self, key, scrape=False):
        pass

    def trigger_dependents(self, namespace, kind, name):
        pass


def body(rv: str, phase: str = "") -> dict:
    return {"metadata": {"namespace": "ns", "name": "j", "uid": "u", "generation": 1, "resourceVersion": rv},
            "status": {"phase": phase} if phase else {}}


def test_the_newest_body_is_kept_whatever_order_it_arrives_in():
    r = Recording(Settings())
    asyncio.run(r.on_job_event("SFTJob", {"type": "ADDED"}, body("10")))
    assert r.bodies[KEY]["metadata"]["resourceVersion"] == "10"
    r.remember(KEY, body("12", "Running"))  # the answer to our status write
    asyncio.run(r.on_job_event("SFTJob", {"type": "MODIFIED"}, body("11", "Pending")))  # a late event of an older one
    assert r.bodies[KEY]["status"]["phase"] == "Running"
    asyncio.run(r.on_job_event("SFTJob", {"type": "MODIFIED"}, body("13", "Succeeded")))
    assert r.bodies[KEY]["status"]["phase"] == "Succeeded"


def test_a_kept_body_is_a_copy_and_a_deletion_or_a_404_forgets_it():
    r = Recording(Settings())
    b = body("5")
    asyncio.run(r.on_job_event("SFTJob", {"type": "ADDED"}, b))
    b["status"]["phase"] = "edited by the caller"
    assert r.bodies[KEY]["status"] == {}
    asyncio.run(r.on_job_event("SFTJob", {"type": "DELETED"}, body("6")))
    assert KEY not in r.bodies
    r.remember(KEY, body("7"))
    r.remember(KEY, None)  # a status write answered 404: the job is gone
    assert KEY not in r.bodies


def test_the_config_map_text_is_the_trainers_own_yaml():
    from op_helpers import job
    from rlhf_operator import builders
    from rlhf_operator.reconciler import _config_yaml

    cfg, _ = builders.render_config(job(spec={"model": {"path": "/m"}, "dataset": {"path": "/d"},
                                              "training": {"maxSteps": 7}}), Settings())
    assert _config_yaml(cfg) == cfg.to_yaml() and "max_steps: 7" in cfg.to_yaml()
    assert _config_yaml(None) == ""
