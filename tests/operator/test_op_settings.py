from __future__ import annotations

import pytest
from rlhf_operator.settings import DEFAULT_POD_SECURITY_CONTEXT, SettingsError, from_env


def test_defaults():
    s = from_env({})
    assert s.watch_namespaces == () and s.metrics_port == 8080 and s.trainer_metrics_port == 9400
    assert s.trainer_pod_security_context == DEFAULT_POD_SECURITY_CONTEXT
    assert s.resync_seconds <= 30 and not s.webhook_enabled and s.trainer_command == ()


def test_values_are_parsed():
    s = from_env({
        "RLHF_WATCH_NAMESPACES": " a, b ,", "RLHF_METRICS_PORT": "9000", "RLHF_WEBHOOK_ENABLED": "true",
        "RLHF_TRAINER_COMMAND": '["python", "x.py"]', "RLHF_TRAINER_SECURITY_CONTEXT": '{"pod": {"runAsUser": 5}}',
        "RLHF_CHECKPOINT_SIZE": "1Gi", "RLHF_LOG_LEVEL": "debug",
    })
    assert s.watch_namespaces == ("a", "b") and s.metrics_port == 9000 and s.webhook_enabled
    assert s.trainer_command == ("python", "x.py") and s.trainer_pod_security_context == {"runAsUser": 5}
    assert s.trainer_container_security_context["allowPrivilegeEscalation"] is False
    assert s.checkpoint_size == "1Gi" and s.log_level == "DEBUG"


@pytest.mark.parametrize("env, needle", [
    ({"RLHF_METRICS_PORT": "abc"}, "RLHF_METRICS_PORT"),
    ({"RLHF_METRICS_PORT": "70000"}, "between 0 and 65535"),
    ({"RLHF_WEBHOOK_ENABLED": "maybe"}, "RLHF_WEBHOOK_ENABLED"),
    ({"RLHF_TRAINER_COMMAND": '"python"'}, "JSON list"),
    ({"RLHF_TRAINER_SECURITY_CONTEXT": "{bad"}, "not valid JSON"),
    ({"RLHF_TRAINER_SECURITY_CONTEXT": '{"runAsUser": 1}'}, '"pod"'),
    ({"RLHF_RESYNC_SECONDS": "60"}, "RLHF_RESYNC_SECONDS"),
    ({"RLHF_WEBHOOK_SERVICE": "svc"}, "<service-name>.<namespace>"),
    ({"RLHF_WEBHOOK_CERT_FILE": "/x"}, "together"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle.replace("(", r"\(")):
        from_env(env)
