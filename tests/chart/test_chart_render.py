"""Lint and render charts/rlhf-operator with the real Helm engine, for the defaults and every value set in
conftest.VALUE_SETS, and check what a cluster would receive."""

from __future__ import annotations

import inspect
import json
import re

import helm_python as helm
import pytest
from chart_helpers import CHART_DIR, NAMESPACE, RELEASE, VALUE_SETS, render
from rlhf_operator import builders
from rlhf_operator import rbac as operator_rbac
from rlhf_operator import settings as operator_settings

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
# Settings the operator reads that the chart leaves at their defaults on purpose.
UNSET_BY_CHART = {
    "RLHF_TRAINER_COMMAND",  # a stand-in trainer command for tests; pods run the image's entry point
    "RLHF_WEBHOOK_LISTEN",  # empty = all interfaces when a Service fronts the webhook
}


def _container(rendered):
    dep = rendered.one("Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


def _env(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def _assert_hardened(ctx: dict, where: str) -> None:
    assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
    assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
    assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop"
    assert not ctx.get("capabilities", {}).get("add"), f"{where}: capabilities.add"
    assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile"
    assert not ctx.get("privileged"), f"{where}: privileged"


def test_lint_is_clean(value_set):
    name, values = value_set
    report = helm.lint(str(CHART_DIR), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], f"{name}: {problems or report['errors']}"


def test_objects_are_well_formed(rendered):
    seen = set()
    for doc in rendered.docs:
        meta = doc["metadata"]
        assert doc["apiVersion"] and meta["name"], doc
        assert len(meta["name"]) <= 63 or doc["kind"] in CLUSTER_SCOPED, meta["name"]
        if doc["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace"), f"{doc['kind']} {meta['name']} has no namespace"
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_each_template_holds_one_kind(rendered):
    for path, text in rendered.texts.items():
        if path.endswith("NOTES.txt"):
            continue
        kinds = set(re.findall(r"^kind: (\w+)$", text, flags=re.M))
        assert len(kinds) <= 1, f"{path} renders several kinds: {kinds}"


def test_operator_deployment_is_hardened(rendered):
    dep, container = _container(rendered)
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    _assert_hardened(container["securityContext"], "operator container")
    # Read-only root: the only writable path is the /tmp emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["resources"]["limits"]["memory"]


def test_trainer_pods_get_a_hardened_security_context(rendered):
    _, container = _container(rendered)
    settings = operator_settings.from_env(_env(container))
    _assert_hardened({**settings.trainer_pod_security_context, **settings.trainer_container_security_context},
                     "trainer pod and container")
    assert settings.trainer_pod_security_context["runAsUser"] == 10001  # the trainer image's USER
    assert settings.trainer_pod_security_context["fsGroup"] == 10001  # the checkpoint claim stays writable


def test_operator_defaults_equal_the_charts_trainer_security_context(chart):
    """An operator run without the chart (RLHF_TRAINER_SECURITY_CONTEXT unset) hardens pods the same way."""
    trainer = chart.merge_values({})["trainer"]
    assert operator_settings.DEFAULT_POD_SECURITY_CONTEXT == trainer["podSecurityContext"]
    assert operator_settings.DEFAULT_CONTAINER_SECURITY_CONTEXT == trainer["securityContext"]


def _settings_read_by_the_operator() -> set[str]:
    return set(re.findall(r'"(RLHF_[A-Z_]+)"', inspect.getsource(operator_settings)))


def test_chart_sets_only_settings_the_operator_reads(rendered):
    _, container = _container(rendered)
    chart_sets = {name for name in _env(container) if name.startswith("RLHF_")}
    read = _settings_read_by_the_operator()
    assert chart_sets <= read, f"the operator ignores {sorted(chart_sets - read)}"
    webhook_only = {n for n in read if n.startswith("RLHF_WEBHOOK_") and n != "RLHF_WEBHOOK_ENABLED"}
    webhook_only |= {"RLHF_WEBHOOK_CERT_FILE", "RLHF_WEBHOOK_KEY_FILE", "RLHF_WEBHOOK_CA_FILE"}
    missing = read - chart_sets - UNSET_BY_CHART - webhook_only
    assert not missing, f"the chart does not expose {sorted(missing)}"


def test_operator_parses_the_settings_the_values_ask_for(chart, rendered, value_set):
    """The rendered env, parsed by the operator's own settings module, gives back the values."""
    values = chart.merge_values(value_set[1])
    _, container = _container(rendered)
    settings = operator_settings.from_env(_env(container))
    op, webhook = values["operator"], values["webhook"]
    assert settings.watch_namespaces == tuple(op["watchNamespaces"])
    assert settings.metrics_port == op["metricsPort"] and settings.health_port == op["healthPort"]
    assert settings.resync_seconds == op["resyncSeconds"] and settings.max_gpus_per_pod == op["maxGpusPerPod"]
    assert settings.log_level == op["logLevel"]
    assert settings.checkpoint_size == op["checkpoint"]["size"]
    assert settings.checkpoint_storage_class == op["checkpoint"]["storageClass"]
    assert settings.trainer_metrics_port == values["trainer"]["metricsPort"]
    assert settings.trainer_image == _env(container)["RLHF_TRAINER_IMAGE"]
    trainer = values["trainer"]
    assert settings.allowed_trainer_images == tuple(trainer["allowedImages"])
    assert settings.allow_secret_env is trainer["allowSecretEnv"] and settings.allowed_env == tuple(trainer["allowedEnv"])
    assert settings.allowed_priority_classes == tuple(trainer["allowedPriorityClasses"])
    assert settings.allowed_toleration_keys == tuple(trainer["allowedTolerationKeys"])
    assert settings.webhook_enabled is webhook["enabled"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == settings.metrics_port and ports["health"] == settings.health_port
    if webhook["enabled"]:
        svc = rendered.one("Service", f"{RELEASE}-rlhf-operator-webhook")
        assert settings.webhook_service == f"{svc['metadata']['name']}.{NAMESPACE}"
        assert settings.webhook_port == ports["webhook"] == webhook["port"]
        assert settings.webhook_failure_policy == webhook["failurePolicy"]
        # The object the operator manages is the one its RBAC may patch.
        patchable = [name for r in rendered.all("ClusterRole") for rule in r["rules"]
                     if "patch" in rule["verbs"] and "validatingwebhookconfigurations" in rule["resources"]
                     for name in rule["resourceNames"]]
        assert patchable == [settings.webhook_config_name]
    else:
        assert "webhook" not in ports
        assert not [s for s in rendered.all("Service") if s["metadata"]["name"].endswith("-webhook")]


def test_webhook_tls_secret_is_mounted_for_the_operator(chart):
    out = render(chart, {"webhook": {"tls": {"secretName": "rlhf-webhook-tls"}}})
    dep, container = _container(out)
    settings = operator_settings.from_env(_env(container))
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["webhook-tls"]["secret"]["secretName"] == "rlhf-webhook-tls"
    assert mounts["webhook-tls"]["readOnly"] is True
    for path in (settings.webhook_cert_file, settings.webhook_key_file, settings.webhook_ca_file):
        assert path.startswith(mounts["webhook-tls"]["mountPath"] + "/")
    assert not operator_settings.from_env(_env(_container(render(chart, {}))[1])).webhook_cert_file


def test_services_reach_the_operator_ports(rendered):
    dep, container = _container(rendered)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    assert rendered.all("Service")
    for svc in rendered.all("Service"):
        assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_bindings_name_the_operator_service_account(rendered):
    _, container = _container(rendered)
    sa_name = rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    sa = rendered.one("ServiceAccount", sa_name)
    assert sa["metadata"]["namespace"] == NAMESPACE
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in rendered.docs
             if r["kind"] in ("Role", "ClusterRole")}
    bindings = rendered.all("RoleBinding") + rendered.all("ClusterRoleBinding")
    assert bindings
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
        ns = b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None
        assert (b["roleRef"]["kind"], ns, b["roleRef"]["name"]) in roles, b["metadata"]


def _resources(rules) -> set[str]:
    return {res for rule in rules for res in rule["resources"]}


def test_cluster_mode_uses_one_cluster_role(chart):
    out = render(chart, VALUE_SETS["default"])
    assert not out.all("Role") and not out.all("RoleBinding")
    rules = out.one("ClusterRole")["rules"]
    assert {"pods", "persistentvolumeclaims", "configmaps", "events", "ppojobs", "ppojobs/status"} <= _resources(rules)


def test_namespaced_mode_uses_roles_in_each_watched_namespace(chart):
    out = render(chart, VALUE_SETS["namespaced"])
    roles = out.all("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in out.all("RoleBinding")) == ["team-a", "team-b"]
    for role in roles:
        assert {"pods", "persistentvolumeclaims", "configmaps", "sftjobs"} <= _resources(role["rules"])
    # What stays cluster-wide is only what is cluster-scoped.
    cluster = out.one("ClusterRole")
    assert _resources(cluster["rules"]) == {"customresourcedefinitions", "namespaces",
                                            "validatingwebhookconfigurations", "mutatingwebhookconfigurations"}
    _, container = _container(out)
    assert _env(container)["RLHF_WATCH_NAMESPACES"] == "team-a,team-b"
    out = render(chart, {**VALUE_SETS["namespaced"], "webhook": {"enabled": False}})
    assert _resources(out.one("ClusterRole")["rules"]) == {"customresourcedefinitions", "namespaces"}


def _flat(rules) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(group, resource, verb, resourceNames) of every grant; no resourceNames = ()."""
    return {(g, r, v, tuple(sorted(rule.get("resourceNames") or ())))
            for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("name", ["default", "namespaced", "minimal"])
def test_rbac_equals_the_rules_the_operator_declares(chart, name):
    """The chart grants exactly rlhf_operator.rbac's rules, down to the webhook configuration's name."""
    out = render(chart, VALUE_SETS[name])
    values = chart.merge_values(VALUE_SETS[name])
    namespaced = bool(values["operator"]["watchNamespaces"])
    cluster_rules = _flat(operator_rbac.CLUSTER_RULES)
    if not namespaced:  # kopf observes namespaces only when it is not cluster-wide (kopf/_core/reactor/observation.py)
        cluster_rules = {r for r in cluster_rules if r[1] != "namespaces"}
    if values["webhook"]["enabled"]:
        config_name = _env(_container(out)[1])["RLHF_WEBHOOK_CONFIG_NAME"]
        cluster_rules |= _flat(operator_rbac.webhook_rules(config_name))
    expected_namespaced = _flat(operator_rbac.NAMESPACED_RULES)
    granted_cluster = _flat(out.one("ClusterRole")["rules"])
    if namespaced:
        for role in out.all("Role"):
            assert _flat(role["rules"]) == expected_namespaced, role["metadata"]["namespace"]
        assert granted_cluster == cluster_rules
    else:
        assert granted_cluster == expected_namespaced | cluster_rules


def test_rbac_is_least_privilege(rendered):
    for role in rendered.all("Role") + rendered.all("ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
            assert not {"secrets", "serviceaccounts", "nodes"} & set(rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            webhook_configs = {"validatingwebhookconfigurations", "mutatingwebhookconfigurations"}
            if webhook_configs & set(rule["resources"]) and rule["verbs"] != ["create"]:
                assert rule["resourceNames"], "webhook configuration rights beyond create must name the object"


def test_every_rbac_verb_is_justified_in_a_comment(rendered):
    """Each rule in the rendered Roles is preceded by a comment naming every verb it grants."""
    for path, text in rendered.texts.items():
        if not re.search(r"^kind: (Cluster)?Role$", text, flags=re.M):
            continue
        lines = text.splitlines()
        rule_starts = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
        assert rule_starts, path
        for i in rule_starts:
            comment, j = [], i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                comment.insert(0, lines[j])
                j -= 1
            block = "\n".join(lines[i:i + 4])
            verbs = re.search(r"verbs: \[([^\]]*)\]", block).group(1).split(", ")
            text_of_comment = " ".join(comment)
            for verb in verbs:
                assert re.search(rf"\b{verb}\b", text_of_comment), f"{path}: verb {verb} unexplained in {block!r}"


def test_monitoring_objects_follow_their_toggles(chart, rendered, value_set):
    values = chart.merge_values(value_set[1])
    on = {
        "ServiceMonitor": values["metrics"]["serviceMonitor"]["enabled"],
        "PodMonitor": values["metrics"]["podMonitor"]["enabled"],
        "PrometheusRule": values["prometheusRule"]["enabled"],
        "ConfigMap": values["grafana"]["dashboard"]["enabled"],
    }
    for kind, enabled in on.items():
        assert bool(rendered.all(kind)) == enabled, kind


def test_service_monitor_selects_the_metrics_service(chart):
    out = render(chart, VALUE_SETS["monitoring"])
    sm = out.one("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    targets = [s for s in out.all("Service")
               if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in targets] == [f"{RELEASE}-rlhf-operator-metrics"]
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in targets[0]["spec"]["ports"]}
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_pod_monitor_scrapes_the_trainer_metrics_port(chart):
    pm = render(chart, VALUE_SETS["monitoring"]).one("PodMonitor")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "10s"
    # The trainer's own `namespace`/`job` labels (the RLHF job) must survive the scrape.
    assert endpoint["honorLabels"] is True
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    # It selects the pods the operator builds, on the port they name.
    job = {"apiVersion": "rlhf.io/v1alpha1", "kind": "PPOJob", "metadata": {"name": "ppo", "namespace": "team-a", "uid": "1"},
           "spec": {}}
    pod = builders.build_pod(job, operator_settings.from_env({}), 0, 0, "digest", [])
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    both = render(chart, {**VALUE_SETS["monitoring"], **VALUE_SETS["namespaced"]}).one("PodMonitor")
    assert both["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_dashboard_config_map_carries_the_dashboard(chart):
    out = render(chart, VALUE_SETS["monitoring"])
    cm = out.one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "RLHF"}
    shipped = json.loads((CHART_DIR / "dashboards" / "rlhf-training.json").read_text())
    assert json.loads(cm["data"]["rlhf-training.json"]) == shipped
    assert render(chart, {}).one("ConfigMap")["metadata"]["namespace"] == NAMESPACE


def test_images_default_to_the_app_version_and_can_be_overridden(chart):
    app_version = chart.metadata["appVersion"]
    _, container = _container(render(chart, {}))
    assert container["image"] == f"ghcr.io/rlhf-platform/rlhf-operator:{app_version}"
    assert _env(container)["RLHF_TRAINER_IMAGE"] == f"ghcr.io/rlhf-platform/rlhf-trainer:{app_version}"
    out = render(chart, VALUE_SETS["custom-images"])
    dep, container = _container(out)
    assert container["image"] == "registry.example.com/ml/rlhf-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert _env(container)["RLHF_TRAINER_IMAGE"] == "registry.example.com/ml/rlhf-trainer@sha256:" + "ab" * 32
    assert "registry.example.com/ml/rlhf-trainer@sha256:" in out.notes


def test_notes_tell_what_to_apply_next(chart):
    notes = render(chart, {}).notes
    assert "kubectl apply" in notes and "kubectl get rlhf" in notes and "every namespace" in notes
    notes = render(chart, VALUE_SETS["namespaced"]).notes
    assert "team-a, team-b" in notes


@pytest.mark.parametrize(
    ("values", "where", "why"),
    [
        ({"operator": {"logLevel": "LOUD"}}, "/operator/logLevel", "must be one of"),
        ({"operator": {"watchNamespace": ["team-a"]}}, "/operator", "'watchNamespace' not allowed"),
        ({"operator": {"metricsPort": "eighty"}}, "/operator/metricsPort", "want integer"),
        ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort", "maximum"),
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0", "pattern"),
        ({"operator": {"checkpoint": {"size": "lots"}}}, "/operator/checkpoint/size", "pattern"),
        ({"trainer": {"image": {"digest": "latest"}}}, "/trainer/image/digest", "pattern"),
        ({"prometheusRule": {"alerts": {"trainingStalled": {"window": "30 minutes"}}}},
         "/prometheusRule/alerts/trainingStalled/window", "pattern"),
        ({"prometheusRule": {"alerts": {"klHigh": {"threshold": -1}}}}, "/prometheusRule/alerts/klHigh/threshold",
         "exclusiveMinimum"),
        ({"webhook": {"enabled": "yes"}}, "/webhook/enabled", "want boolean"),
        ({"trainer": {"allowedImages": ["registry.example.com/*"]}}, "/trainer/allowedImages/0", "pattern"),
        ({"trainer": {"allowSecretEnv": "no"}}, "/trainer/allowSecretEnv", "want boolean"),
        ({"trainer": {"allowedEnv": "PYTHONPATH"}}, "/trainer/allowedEnv", "want array"),
    ],
)
def test_schema_refuses_bad_values_naming_the_key(chart, values, where, why):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(err.value)
    assert f"at '{where}'" in message and why in message, message
    report = helm.lint(str(CHART_DIR), values, namespace=NAMESPACE)
    assert any(where in e for e in report["errors"]), report


def test_existing_service_account_must_be_named(chart):
    with pytest.raises(helm.HelmRenderError, match="serviceAccount.name: set the name of an existing ServiceAccount"):
        chart.render({"serviceAccount": {"create": False}}, name=RELEASE, namespace=NAMESPACE)
    out = render(chart, {"serviceAccount": {"create": False, "name": "platform-ops"}})
    assert not out.all("ServiceAccount")
    assert out.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-ops"
