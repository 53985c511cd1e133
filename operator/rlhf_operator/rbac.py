"""The operator's least-privilege RBAC rules, as data (the Helm chart copies them).

`NAMESPACED_RULES` go into a ClusterRole when the operator watches all namespaces, or into a Role
in each watched namespace (RLHF_WATCH_NAMESPACES). `CLUSTER_RULES` are cluster-scoped and always
need a ClusterRole; `webhook_rules(name)` (`WEBHOOK_RULES` for the default name) only when
RLHF_WEBHOOK_ENABLED. Every rule says why.

    python -m rlhf_operator.rbac     # print them as YAML
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from rlhf_operator.crd_schema import GROUP, KINDS
from rlhf_operator.settings import Settings

_JOBS = [k.plural for k in KINDS.values()]

NAMESPACED_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": _JOBS, "verbs": ["get", "list", "watch", "delete"],
     "why": "watch and read jobs; delete a finished job after ttlSecondsAfterFinished"},
    {"apiGroups": [GROUP], "resources": [f"{p}/status" for p in _JOBS], "verbs": ["patch"],
     "why": "write status (conditions, phase, progress) through the status subresource"},
    {"apiGroups": [GROUP], "resources": [f"{p}/finalizers" for p in _JOBS], "verbs": ["update"],
     "why": "children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement)"},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete", "patch"],
     "why": "run trainer pods, watch their state, stop them on suspend/deadline/failure; patch: lift a "
            "multi-node job's scheduling gate from all its pods together"},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"],
     "why": "a multi-node job's headless Service (its pods' DNS names); get: check whose an existing one is"},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch", "create", "patch"],
     "why": "create the checkpoint claim; watch claims (a lost claim or input fails the job), get one the index "
            "has not seen yet and check whose it is; patch its ownerReferences when checkpoint.retainPolicy changes"},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"],
     "why": "the rendered trainer config; refreshed when the spec changed while suspended"},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"],
     "why": "an Event on every condition transition"},
]
CLUSTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"],
     "why": "kopf discovers the served CRDs and notices when they are installed later"},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"],
     "why": "kopf follows the watched namespaces (RLHF_WATCH_NAMESPACES) appearing and disappearing"},
]
_WEBHOOK_CONFIGS = ["validatingwebhookconfigurations", "mutatingwebhookconfigurations"]


def webhook_rules(config_name: str = Settings.webhook_config_name) -> list[dict[str, Any]]:
    """Rules for kopf's managed webhook configurations (RLHF_WEBHOOK_CONFIG_NAME names them)."""
    return [
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": list(_WEBHOOK_CONFIGS), "verbs": ["create"],
         "why": "kopf creates a validating and an (empty) mutating configuration under one name; "
                "create cannot be limited by name"},
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": list(_WEBHOOK_CONFIGS), "verbs": ["patch"],
         "resourceNames": [config_name],
         "why": "kopf keeps their webhooks and CA bundle up to date, in the named objects only"},
    ]


WEBHOOK_RULES: list[dict[str, Any]] = webhook_rules()


def k8s_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules as Kubernetes PolicyRules (without the `why`)."""
    return [{k: v for k, v in r.items() if k != "why"} for r in rules]


def main() -> int:
    yaml.safe_dump({"namespaced": NAMESPACED_RULES, "cluster": CLUSTER_RULES, "webhook": WEBHOOK_RULES},
                   sys.stdout, sort_keys=False, width=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
