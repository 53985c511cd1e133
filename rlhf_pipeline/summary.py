"""The end-of-run summary: built from the jobs' status, their trainers' metric logs and the run's timeline.

Pure: `build` returns the dict written to summary.json, `lines` the text printed at the end.
"""

from __future__ import annotations

from rlhf_trainer import contract as c

from . import report, stats


def stage_record(job: dict) -> dict:
    st = job.get("status") or {}
    failed = next((cd for cd in st.get("conditions", []) if cd["type"] == "Failed" and cd["status"] == "True"), None)
    return {
        "kind": job["kind"], "name": job["metadata"]["name"], "phase": st.get("phase"),
        "progress": st.get("progress", {}), "output": st.get("output", {}), "checkpoint": st.get("checkpoint", {}),
        "failure": f"{failed.get('reason')}: {failed.get('message')}" if failed else "",
    }


def values(series: list[dict], key: str) -> list[float]:
    return [r[key] for r in series if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def dpo_rounds(rows: list[dict]) -> list[dict]:
    """Online DPO, per round (the trainer logs its round with each step): the mean reward of the round's chosen
    (best of n) and rejected (worst of n) samples, and the implicit-reward accuracy over the round's steps."""
    by_round: dict[int, list[dict]] = {}
    for r in rows:
        rnd = r.get(c.M_DPO_ROUND)
        if isinstance(rnd, (int, float)) and not isinstance(rnd, bool) and rnd >= 1:
            by_round.setdefault(int(rnd), []).append(r)
    out = []
    for rnd, part in sorted(by_round.items()):
        best, worst = values(part, c.M_DPO_BEST_REWARD_MEAN), values(part, c.M_DPO_WORST_REWARD_MEAN)
        acc = values(part, c.M_DPO_REWARD_ACCURACY)
        out.append({"round": rnd, "steps": len(values(part, c.M_DPO_LOSS)) or len(part),
                    "best_reward_mean": best[-1] if best else None, "worst_reward_mean": worst[-1] if worst else None,
                    "reward_accuracy": stats.mean_sd(acc)["mean"], "reward_accuracy_last": acc[-1] if acc else None})
    return out


def build(jobs: list[dict], series: dict[str, list[dict]], timing: dict, eval_pairs: int | None = None) -> dict:
    """summary.json: stages, the reward model's held-out accuracy with its standard error, PPO's reward
    in its first and last quarter with their spread, DPO's rounds, and where the time went."""
    stages = [stage_record(j) for j in jobs]
    by_kind = {s["kind"]: s for s in stages}
    rm, ppo = by_kind.get("RewardModelJob", {}), by_kind.get("PPOJob", {})
    rm_series, ppo_series = series.get(rm.get("name", ""), []), series.get(ppo.get("name", ""), [])
    rewards = values(ppo_series, c.M_PPO_REWARD_MEAN)
    kls = values(ppo_series, c.M_PPO_KL)
    evals = values(rm_series, c.M_RM_EVAL_ACCURACY)
    acc = evals[-1] if evals else rm.get("progress", {}).get("accuracy")
    dpo = by_kind.get("DPOJob", {})
    dpo_series = series.get(dpo.get("name", ""), [])
    dpo_acc = values(dpo_series, c.M_DPO_REWARD_ACCURACY)
    dpo_margin = values(dpo_series, c.M_DPO_MARGIN)
    return {
        "ok": bool(stages) and all(s["phase"] == "Succeeded" for s in stages),
        "seconds": timing.get("total_s"),
        "timing": timing,
        "reward_model_eval_accuracy": acc,
        "reward_model_eval_pairs": eval_pairs,
        "reward_model_eval_accuracy_se": stats.binomial_se(acc, eval_pairs) if acc is not None and eval_pairs else None,
        "ppo_reward_start": rewards[0] if rewards else None,
        "ppo_reward_end": rewards[-1] if rewards else None,
        "ppo_reward_quarters": stats.quarters(rewards),
        "ppo_kl_quarters": stats.quarters(kls),
        "ppo_final_kl": kls[-1] if kls else None,
        "dpo_rounds": dpo_rounds(dpo_series),
        "dpo_reward_accuracy": dpo_acc[-1] if dpo_acc else dpo.get("progress", {}).get("rewardAccuracy"),
        "dpo_margin": dpo_margin[-1] if dpo_margin else dpo.get("progress", {}).get("margin"),
        "stages": stages,
    }


def _q(part: dict) -> str:
    return f"{part['mean']:.3f} +- {part['sd']:.3f}"


def lines(s: dict) -> list[str]:
    out = ["", "=== RLHF pipeline summary ==="]
    for st in s["stages"]:
        where = st["output"].get("claim", st["checkpoint"].get("claim", "-"))
        path = st["output"].get("path", "")
        line = f"{st['kind']:15} {st['name']:16} {st['phase'] or 'Pending':10} checkpoint: claim {where} {path}"
        out.append(line.rstrip())
        if st["failure"]:
            out.append(f"    FAILED - {st['failure']}")
    acc, se, n = s["reward_model_eval_accuracy"], s["reward_model_eval_accuracy_se"], s["reward_model_eval_pairs"]
    if acc is not None and se is not None:
        out.append(f"reward model held-out accuracy: {acc:.3f} +- {se:.3f} "
                   f"(standard error; {n} unseen pairs, chance 0.5)")
    else:
        out.append(f"reward model held-out accuracy: {report.fmt(acc)}")
    kinds = {st["kind"] for st in s["stages"]}
    if "PPOJob" in kinds:
        out += _ppo_lines(s)
    if "DPOJob" in kinds:
        out += _dpo_lines(s)
    out.append(f"training curves: {s.get('chart', '-')}")
    out += timing_lines(s["timing"])
    return out


def _ppo_lines(s: dict) -> list[str]:
    out = []
    q = s["ppo_reward_quarters"]
    if q:
        moved = f" ({q['rise_in_se']:.1f} standard errors)" if q["rise_in_se"] is not None else ""
        out.append(f"PPO reward (iteration means; quarter = {q['first']['n']} of {q['points']} iterations, "
                   "mean +- spread):")
        out.append(f"    first quarter {_q(q['first'])} -> last quarter {_q(q['last'])}")
        out.append(f"    rise {q['rise']:+.3f} +- {q['rise_se']:.3f}{moved}")
    else:
        start, end = report.fmt(s["ppo_reward_start"]), report.fmt(s["ppo_reward_end"])
        out.append(f"PPO mean reward: start {start} -> end {end}")
    kq = s["ppo_kl_quarters"]
    kl_text = f" (first quarter {_q(kq['first'])}, last quarter {_q(kq['last'])})" if kq else ""
    out.append(f"PPO KL to the SFT policy: final {report.fmt(s['ppo_final_kl'])}{kl_text}")
    return out


def _dpo_lines(s: dict) -> list[str]:
    rounds = s.get("dpo_rounds") or []
    out = []
    if rounds:
        out.append(f"DPO online rounds (reward = the reward model's score of the sampled responses; {len(rounds)} "
                   "rounds):")
        for r in rounds:
            out.append(f"    round {r['round']}: best-of-n reward {report.fmt(r['best_reward_mean'])}, worst-of-n "
                       f"{report.fmt(r['worst_reward_mean'])}, implicit-reward accuracy "
                       f"{report.fmt(r['reward_accuracy'])} ({r['steps']} steps)")
        first, last = rounds[0]["best_reward_mean"], rounds[-1]["best_reward_mean"]
        if len(rounds) > 1 and first is not None and last is not None:
            out.append(f"    best-of-n reward, round 1 -> {rounds[-1]['round']}: {first:.3f} -> {last:.3f} "
                       f"({last - first:+.3f})")
    out.append(f"DPO implicit-reward accuracy: final {report.fmt(s.get('dpo_reward_accuracy'))}; margin "
               f"{report.fmt(s.get('dpo_margin'))} (chosen minus rejected, beta-scaled log-ratios)")
    return out


def timing_lines(t: dict) -> list[str]:
    spans = t.get("stages") or {}
    parts = [f"{name} {span['start_s']:.0f}-{span['end_s']:.0f}" for name, span in spans.items()
             if span.get("start_s") is not None and span.get("end_s") is not None]
    out = []
    if t.get("pipeline_s") is not None:
        out.append(f"pipeline (jobs applied -> all finished): {t['pipeline_s']:.0f} s")
        if parts:
            out.append(f"    stages, seconds after the jobs were applied: {', '.join(parts)}")
    if t.get("total_s") is not None:
        setup = f"; cluster start {t['cluster_s']:.0f} s" if t.get("cluster_s") is not None else ""
        out.append(f"total time: {t['total_s']:.0f} s{setup}; {t.get('cpus', '?')} CPU cores, load average "
                   f"{t.get('load_start', '?')} at start")
    return out
