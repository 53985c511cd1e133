"""The operator and trainer Dockerfiles, checked without a Docker engine: what they COPY exists, what
they pip-install is exactly the project's pins, they run as a numeric non-root user, and the entry
point they name starts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from chart_helpers import CHART_DIR, ROOT

OPERATOR = ROOT / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([A-Za-z0-9_.+\-]+)$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def pins(req: Path) -> dict[str, str]:
    """name -> version of a requirements file, following -r includes; every line must be pinned."""
    found: dict[str, str] = {}
    for line in req.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            found.update(pins(req.parent / line[3:].strip()))
            continue
        m = PIN.match(line)
        assert m, f"{req.name}: {line!r} is not pinned with =="
        found[m.group(1).lower()] = m.group(2)
    return found


def copies(path: Path) -> dict[str, Path]:
    """Container destination -> repository source of every COPY (build context = repository root)."""
    mapping = {}
    for word, args in instructions(path):
        if word != "COPY":
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        *sources, dest = parts
        assert len(sources) == 1, f"{path.name}: one source per COPY keeps the mapping readable: {args}"
        mapping[dest.rstrip("/")] = ROOT / sources[0]
    return mapping


def pip_installs(path: Path) -> list[list[str]]:
    """Argument lists of every `pip install` in the RUN instructions."""
    found = []
    for word, args in instructions(path):
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", ";", "||", "|"):
                if command[:2] == ["pip", "install"]:
                    found.append(command[2:])
                command = []
            else:
                command.append(token)
    return found


def entrypoint(path: Path) -> list[str]:
    (args,) = [a for w, a in instructions(path) if w == "ENTRYPOINT"]
    return yaml.safe_load(args)  # exec form is a JSON array


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_copied_files_exist(dockerfile):
    mapping = copies(dockerfile)
    assert mapping
    for dest, source in mapping.items():
        assert source.exists(), f"{dockerfile.relative_to(ROOT)}: COPY source {source.relative_to(ROOT)} missing ({dest})"


@pytest.mark.parametrize(
    ("dockerfile", "requirements"),
    [(OPERATOR, "requirements/operator.txt"), (TRAINER, "requirements/trainer.txt")],
    ids=["operator", "trainer"],
)
def test_pip_installs_only_the_pinned_requirements(dockerfile, requirements):
    mapping = copies(dockerfile)
    installs = pip_installs(dockerfile)
    assert installs, f"{dockerfile.name} installs nothing"
    used_requirements = []
    for args in installs:
        it = iter(args)
        for token in it:
            if token == "-r":
                source = mapping[next(it)]
                used_requirements.append(source.relative_to(ROOT).as_posix())
            elif token.startswith("-"):
                assert token in {"--no-deps", "--no-cache-dir"}, f"unexpected pip option {token}"
            elif token.startswith("/"):
                # A project package copied into the image: installed without deps (they are pinned).
                assert token in mapping or any(dest.startswith(token + "/") for dest in mapping), token
                assert "--no-deps" in args, f"{token} must be installed with --no-deps"
            else:
                m = PIN.match(token)
                assert m, f"{dockerfile.name}: pip install {token} is not pinned"
                assert pins(ROOT / requirements).get(m.group(1).lower()) == m.group(2), token
    assert used_requirements == [requirements]


def test_requirement_pins_agree_with_package_metadata():
    operator_pins = pins(ROOT / "requirements" / "operator.txt")
    trainer_pins = pins(ROOT / "requirements" / "trainer.txt")
    op_meta = tomllib.loads((ROOT / "operator" / "pyproject.toml").read_text())["project"]
    tr_meta = tomllib.loads((ROOT / "trainer_image" / "pyproject.toml").read_text())["project"]

    def as_pins(deps):
        return {PIN.match(d).group(1).lower(): PIN.match(d).group(2) for d in deps}

    # The operator image installs both packages with --no-deps: their runtime deps must all be pinned in
    # requirements/operator.txt, at the same versions.
    for name, version in {**as_pins(op_meta["dependencies"]), **as_pins(tr_meta["dependencies"])}.items():
        if name in ("rlhf-trainer", "rlhf-operator"):
            continue
        assert operator_pins.get(name) == version, f"{name}=={version} not pinned in requirements/operator.txt"
    # The trainer image installs requirements/trainer.txt in place of the [train] extra.
    for name, version in as_pins(tr_meta["optional-dependencies"]["train"]).items():
        assert trainer_pins.get(name) == version, f"{name}=={version}: trainer.txt has {trainer_pins.get(name)}"
    assert trainer_pins["torch"] == "2.13.0"
    assert not {"torch", "transformers", "deepspeed"} & operator_pins.keys(), "the operator image must stay torch-free"


def _third_party_imports(package_dir: Path) -> dict[str, str]:
    """Top-level module -> first file importing it, for every module that is neither stdlib nor ours."""
    import ast

    found: dict[str, str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and not top.startswith("rlhf_"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_operator_pins_every_library_it_imports():
    """A library the operator imports directly is its own dependency, pinned, not left to kopf's range."""
    import importlib.metadata

    dists = importlib.metadata.packages_distributions()
    op_meta = tomllib.loads((ROOT / "operator" / "pyproject.toml").read_text())["project"]
    declared = {PIN.match(d).group(1).lower() for d in op_meta["dependencies"]}
    operator_pins = pins(ROOT / "requirements" / "operator.txt")
    imports = _third_party_imports(ROOT / "operator" / "rlhf_operator")
    assert {"kopf", "aiohttp", "prometheus_client", "yaml"} <= imports.keys(), imports
    for module, where in imports.items():
        (dist, *_) = dists[module]
        dist = dist.lower().replace("_", "-")
        assert dist in declared, f"{where} imports {module}: add {dist} to operator/pyproject.toml dependencies"
        assert dist in operator_pins, f"{where} imports {module}: pin {dist} in requirements/operator.txt"


def test_trainer_image_is_cuda_with_a_cuda_torch():
    steps = instructions(TRAINER)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    (base,) = [a for w, a in steps if w == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("nvidia/cuda:") and ("runtime" in base or "devel" in base), base
    run = " ".join(a for w, a in steps if w == "RUN")
    assert "torch.version.cuda" in run, "the build must fail on a CPU-only torch"


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_image_runs_as_the_numeric_non_root_user_the_chart_expects(dockerfile):
    users = [a for w, a in instructions(dockerfile) if w == "USER"]
    assert users, f"{dockerfile.name} has no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric non-root so runAsNonRoot can be checked"
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    expected = values["podSecurityContext"] if dockerfile == OPERATOR else values["trainer"]["podSecurityContext"]
    assert int(uid) == expected["runAsUser"] and int(gid) == expected["runAsGroup"]
    # Nothing after USER may switch back to root.
    words = [w for w, _ in instructions(dockerfile)]
    assert "RUN" not in words[words.index("USER"):], "RUN after USER runs as the app user; keep USER last"


def _env(dockerfile: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for word, args in instructions(dockerfile):
        if word == "ENV":
            found.update(tok.split("=", 1) for tok in shlex.split(args))
    return found


def test_operator_defaults_match_the_trainer_image():
    """Without chart values the operator still runs trainer pods as the image's user, with the image's
    cache locations under the writable /tmp."""
    from rlhf_operator import builders
    from rlhf_operator.settings import DEFAULT_POD_SECURITY_CONTEXT

    uid, _, gid = [a for w, a in instructions(TRAINER) if w == "USER"][-1].partition(":")
    assert DEFAULT_POD_SECURITY_CONTEXT["runAsUser"] == int(uid)
    assert DEFAULT_POD_SECURITY_CONTEXT["runAsGroup"] == DEFAULT_POD_SECURITY_CONTEXT["fsGroup"] == int(gid)
    image_env = _env(TRAINER)
    assert {k: image_env.get(k) for k in builders.SCRATCH_ENV} == builders.SCRATCH_ENV
    assert image_env["HOME"] == builders.SCRATCH_MOUNT


def test_exposed_ports_match_the_defaults():
    from rlhf_trainer.config import DEFAULT_METRICS_PORT

    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    (trainer_expose,) = [a for w, a in instructions(TRAINER) if w == "EXPOSE"]
    assert trainer_expose.split() == [str(DEFAULT_METRICS_PORT)] == [str(values["trainer"]["metricsPort"])]
    (operator_expose,) = [a for w, a in instructions(OPERATOR) if w == "EXPOSE"]
    assert set(operator_expose.split()) == {str(values["operator"][p]) for p in ("metricsPort", "healthPort")} | {
        str(values["webhook"]["port"])}


@pytest.mark.parametrize(
    ("dockerfile", "expected_words"),
    [(OPERATOR, []), (TRAINER, ["sft", "reward", "ppo"])],
    ids=["operator", "trainer"],
)
def test_entry_point_starts(dockerfile, expected_words):
    command = entrypoint(dockerfile)
    assert command[:2] == ["python", "-m"], command
    try:
        proc = subprocess.run([sys.executable, *command[1:], "--help"], capture_output=True, text=True, timeout=30,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} --help did not exit within 30 s: it must print its usage and exit")
    assert proc.returncode == 0, f"{' '.join(command)} --help failed:\n{proc.stderr[-2000:]}"
    for word in expected_words:
        assert word in proc.stdout, f"{word!r} not in the help of {' '.join(command)}"
