"""What creating a job may grant: rules that depend on the operator's settings.

The operator creates trainer pods with its own service account, so a user who may only create a
PPOJob must not get, through its spec, more than the admin meant: another image, a Secret's value,
code loaded from a claim through the environment, a higher priority, or nodes kept for others.
Pure functions; the webhook refuses with these messages and the reconciler fails the job with them
(reason InvalidSpec), so the rules hold with the webhook off too.
"""

from __future__ import annotations

from typing import Any

from rlhf_operator.settings import Settings

# Environment names that change which code the trainer runs (interpreter and loader search paths,
# startup hooks, compiled-code caches, the user site-packages under HOME). The operator sets HOME and
# the caches itself (builders.SCRATCH_ENV); RLHF_ALLOWED_ENV exempts names an admin trusts.
CODE_LOADING_ENV = frozenset({
    "PATH", "HOME", "BASH_ENV", "ENV", "GCONV_PATH", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR", "HF_MODULES_CACHE", "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN",
})
CODE_LOADING_PREFIXES = ("LD_", "PYTHON")  # LD_PRELOAD, LD_LIBRARY_PATH, ...; PYTHONPATH, PYTHONSTARTUP, ...
SAFE_PYTHON_ENV = frozenset({
    "PYTHONUNBUFFERED", "PYTHONFAULTHANDLER", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
    "PYTHONUTF8", "PYTHONTRACEMALLOC",
})
# valueFrom sources: ConfigMaps of the namespace are readable through spec.dataset.configMap anyway;
# fieldRef and resourceFieldRef expose only the pod's own metadata and limits.
VALUE_SOURCES = ("configMapKeyRef", "fieldRef", "resourceFieldRef", "secretKeyRef")
HOW_TO_OPEN = "an admin can allow it: operator setting {var}, chart value {value}"


def _matches(value: str, entries: tuple[str, ...], prefix_ends: tuple[str, ...]) -> bool:
    return any(e == "*" or value == e or (e.endswith(prefix_ends) and value.startswith(e.rstrip("*"))) for e in entries)


def image_allowed(image: str, settings: Settings) -> bool:
    return image == settings.trainer_image or _matches(image, settings.allowed_trainer_images, ("/", ":"))


def loads_code(name: str) -> bool:
    if name in SAFE_PYTHON_ENV:
        return False
    return name in CODE_LOADING_ENV or name.startswith(CODE_LOADING_PREFIXES)


def _env_errors(env: list[Any], settings: Settings) -> list[str]:
    errors = []
    for i, var in enumerate(env):
        if not isinstance(var, dict):
            continue
        name, where = str(var.get("name", "")), f"spec.env[{i}]"
        if loads_code(name) and not _matches(name, settings.allowed_env, ("*",)):
            errors.append(f"{where}.name: {name} changes which code the trainer runs and is refused; remove it ("
                          + HOW_TO_OPEN.format(var="RLHF_ALLOWED_ENV", value="trainer.allowedEnv") + ")")
        source = var.get("valueFrom")
        if not isinstance(source, dict):
            continue
        unknown = sorted(set(source) - set(VALUE_SOURCES))
        if unknown or len(source) != 1:
            errors.append(f"{where}.valueFrom: set exactly one of {', '.join(VALUE_SOURCES)}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if "secretKeyRef" in source and not settings.allow_secret_env:
            errors.append(f"{where}.valueFrom.secretKeyRef: jobs may not read Secrets; remove it ("
                          + HOW_TO_OPEN.format(var="RLHF_ALLOW_SECRET_ENV", value="trainer.allowSecretEnv") + ")")
    return errors


def _scheduling_errors(sched: dict[str, Any], settings: Settings) -> list[str]:
    errors = []
    pc = sched.get("priorityClassName")
    if pc and not _matches(pc, settings.allowed_priority_classes, ()):
        allowed = ", ".join(settings.allowed_priority_classes) or "none"
        how = HOW_TO_OPEN.format(var="RLHF_ALLOWED_PRIORITY_CLASSES", value="trainer.allowedPriorityClasses")
        errors.append(f"spec.scheduling.priorityClassName: {pc!r} is not allowed (allowed: {allowed}); "
                      f"remove it ({how})")
    for i, t in enumerate(sched.get("tolerations") or []):
        key = (t or {}).get("key") or ""
        if "*" in settings.allowed_toleration_keys or (key and key in settings.allowed_toleration_keys):
            continue
        what = f"taint key {key!r}" if key else "every taint (no key)"
        allowed = ", ".join(settings.allowed_toleration_keys) or "none"
        how = HOW_TO_OPEN.format(var="RLHF_ALLOWED_TOLERATION_KEYS", value="trainer.allowedTolerationKeys")
        errors.append(f"spec.scheduling.tolerations[{i}]: tolerating {what} is not allowed (allowed keys: {allowed}); "
                      f"remove it ({how})")
    return errors


def errors(spec: dict[str, Any], settings: Settings) -> list[str]:
    """Why a spec asks for more than the settings allow (empty: nothing)."""
    out = []
    image = spec.get("image")
    if image and not image_allowed(image, settings):
        allowed = ", ".join(dict.fromkeys((settings.trainer_image, *settings.allowed_trainer_images)))
        how = HOW_TO_OPEN.format(var="RLHF_ALLOWED_TRAINER_IMAGES", value="trainer.allowedImages")
        out.append(f"spec.image: {image!r} is not an allowed trainer image (allowed: {allowed}); leave spec.image out "
                   f"to use the default ({how})")
    out += _env_errors(spec.get("env") or [], settings)
    out += _scheduling_errors(spec.get("scheduling") or {}, settings)
    return out
