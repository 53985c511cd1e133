from __future__ import annotations

from pathlib import Path

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
    ({"RLHF_ALLOWED_TRAINER_IMAGES": "registry.example.com/*"}, "RLHF_ALLOWED_TRAINER_IMAGES: bad entry 'registry.example.com/\\*'"),
    ({"RLHF_ALLOWED_TRAINER_IMAGES": "a, b c"}, "RLHF_ALLOWED_TRAINER_IMAGES: bad entry 'b c'"),
    ({"RLHF_ALLOW_SECRET_ENV": "sometimes"}, "RLHF_ALLOW_SECRET_ENV='sometimes': expected true or false"),
    ({"RLHF_ALLOWED_ENV": "PYTHON$PATH"}, "RLHF_ALLOWED_ENV: bad entry 'PYTHON\\$PATH': expected an environment variable name"),
    ({"RLHF_ALLOWED_PRIORITY_CLASSES": "high prio"}, "RLHF_ALLOWED_PRIORITY_CLASSES: bad entry"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(SettingsError, match=needle.replace("(", r"\(")):
        from_env(env)


def test_grant_settings_default_to_closed_and_parse_lists():
    s = from_env({})
    assert s.allowed_trainer_images == () and s.allow_secret_env is False and s.allowed_env == ()
    assert s.allowed_priority_classes == () and s.allowed_toleration_keys == ("nvidia.com/gpu",)
    s = from_env({"RLHF_ALLOWED_TRAINER_IMAGES": " reg.io/team/ ,img:1,,reg.io/team/", "RLHF_ALLOW_SECRET_ENV": "yes",
                  "RLHF_ALLOWED_ENV": "TORCH_EXTENSIONS_DIR,NCCL_*", "RLHF_ALLOWED_PRIORITY_CLASSES": "*",
                  "RLHF_ALLOWED_TOLERATION_KEYS": ""})
    assert s.allowed_trainer_images == ("reg.io/team/", "img:1") and s.allow_secret_env is True
    assert s.allowed_env == ("TORCH_EXTENSIONS_DIR", "NCCL_*") and s.allowed_priority_classes == ("*",)
    assert s.allowed_toleration_keys == ()  # set but empty (the chart's []): no toleration allowed


def test_command_line_options_override_the_environment():
    from rlhf_operator.__main__ import settings_env

    env = settings_env(["-n", "a", "--namespace", "b", "-v", "--metrics-port", "0"],
                       {"RLHF_WATCH_NAMESPACES": "old", "RLHF_LOG_LEVEL": "WARNING", "RLHF_CHECKPOINT_SIZE": "2Gi"})
    s = from_env(env)
    assert s.watch_namespaces == ("a", "b") and s.log_level == "DEBUG" and s.metrics_port == 0
    assert s.checkpoint_size == "2Gi"  # untouched settings still come from the environment
    assert from_env(settings_env([], {"RLHF_WATCH_NAMESPACES": "x"})).watch_namespaces == ("x",)


def _run_operator(*args: str, **env: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rlhf_operator", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "KUBECONFIG": "/nonexistent", **env})


def test_help_prints_usage_and_the_settings_and_exits():
    proc = _run_operator("--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m rlhf_operator" in proc.stdout and "--namespace" in proc.stdout
    import re

    from rlhf_operator import settings

    read = set(re.findall(r'"(RLHF_[A-Z_]+)"', Path(settings.__file__).read_text()))
    assert len(read) > 15 and not read - set(re.findall(r"RLHF_[A-Z_]+", proc.stdout)), read


@pytest.mark.parametrize("args, env, needle", [
    (["--metrics-port", "abc"], {}, "RLHF_METRICS_PORT='abc'"),
    ([], {"RLHF_LOG_LEVEL": "loud"}, "RLHF_LOG_LEVEL"),
    (["--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
])
def test_bad_options_and_settings_stop_the_operator_before_it_starts(args, env, needle):
    proc = _run_operator(*args, **env)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
