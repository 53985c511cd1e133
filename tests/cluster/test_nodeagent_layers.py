"""The node agent's modules import one way: the agent builds pod workers, a pod worker knows only the narrow
interface it is given (pods.PodHost), never the agent module."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

from localcluster.nodeagent import agent, pods

PACKAGE = Path(pods.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Modules of the package a file imports, at any level (TYPE_CHECKING blocks too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
            out.update(a.name for a in node.names if not node.module)
    return out


def test_no_module_the_agent_imports_imports_the_agent_back():
    for name in sorted(imported_modules(PACKAGE / "agent.py")):
        if (PACKAGE / f"{name}.py").exists():
            assert "agent" not in imported_modules(PACKAGE / f"{name}.py"), f"{name}.py imports agent.py"


def test_the_agent_provides_everything_a_pod_worker_uses():
    host = {n for n, _ in inspect.getmembers(pods.PodHost, inspect.isfunction)}
    host |= set(typing.get_type_hints(pods.PodHost, {**vars(pods), "Cgroup": object, "Provisioner": object}))
    used = {n for n in ast.walk(ast.parse(inspect.getsource(pods.PodWorker)))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "host"}
    assert {n.attr for n in used} <= host  # the worker uses nothing the interface does not name
    init = inspect.getsource(agent.Agent.__init__)
    missing = [n for n in sorted(host) if not hasattr(agent.Agent, n) and f"self.{n} =" not in init]
    assert missing == [], f"agent.Agent lacks {missing} of pods.PodHost"
