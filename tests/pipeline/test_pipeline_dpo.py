"""`--pipeline dpo`: the main job's DPO pipeline (examples/pipeline-dpo: SFT -> reward model -> online DPO rounds),
its summary (per round: best-of-n and worst-of-n reward, implicit-reward accuracy), chart and live table."""

import json
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import UPSTREAM_SHORT, claim_dir, run_pipeline
from rlhf_operator import builders, jobspec
from rlhf_operator.names import pvc_name
from rlhf_operator.settings import from_env
from rlhf_trainer import contract as c
from rlhf_trainer.export import tree_digest

from localcluster import Cluster
from rlhf_pipeline import plots, report, summary
from rlhf_pipeline.cli import parse_args

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pipeline-dpo"


def _examples() -> dict[str, dict]:
    return {d["kind"]: d for p in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d}


def test_pipeline_option_chooses_the_examples_and_the_output():
    dpo, ppo = parse_args(["run", "--pipeline", "dpo"]), parse_args(["run"])
    assert (dpo.examples, dpo.out) == (str(EXAMPLES), str(REPO / "out" / "pipeline-dpo"))
    assert (ppo.examples, ppo.out) == (str(REPO / "examples" / "pipeline"), str(REPO / "out" / "pipeline"))
    mine = parse_args(["run", "--pipeline", "dpo", "--examples", "/x", "--out", "/y"])
    assert (mine.examples, mine.out) == ("/x", "/y")


def test_example_is_sft_reward_model_then_three_online_rounds_sized_for_two_cores():
    docs = _examples()
    assert set(docs) == {"SFTJob", "RewardModelJob", "DPOJob"}
    dpo = docs["DPOJob"]["spec"]
    assert dpo["policy"] == {"fromJob": {"name": docs["SFTJob"]["metadata"]["name"]}}
    assert dpo["online"]["rewardModel"] == {"fromJob": {"name": docs["RewardModelJob"]["metadata"]["name"]}}
    assert dpo["online"]["rounds"] == 3 and dpo["online"]["samplesPerPrompt"] >= 2
    assert dpo["dataset"]["path"] == docs["RewardModelJob"]["spec"]["dataset"]["path"]  # the HH-RLHF pairs' prompts
    cpu = {k: float(d["spec"]["resources"]["cpu"]) for k, d in docs.items()}
    assert cpu["SFTJob"] + cpu["RewardModelJob"] <= 2 and cpu["DPOJob"] <= 2
    settings = from_env({})
    for kind, doc in docs.items():
        assert jobspec.validate(kind, doc["metadata"]["name"], doc["spec"]) == []
        cfg, _ = builders.render_config({**doc, "metadata": {**doc["metadata"], "namespace": "d", "uid": "u"}}, settings)
        assert not doc["spec"]["training"].get("threads")
    assert cfg.dpo.online.reward_model.path == "/inputs/harmless-rm/final"


def _dpo_series() -> list[dict]:
    rows = []
    for step in range(1, 25):
        rnd = (step - 1) // 8 + 1
        if step % 8 == 1:  # the trainer's round-start record: no loss
            rows.append({"step": step - 1, c.M_DPO_ROUND: rnd, c.M_DPO_BEST_REWARD_MEAN: 0.5 * rnd})
        rows.append({"step": step, c.M_DPO_LOSS: 0.69 - 0.01 * step, c.M_DPO_ROUND: float(rnd), c.M_DPO_ROUNDS: 3.0,
                     c.M_DPO_REWARD_ACCURACY: 0.5 + 0.1 * rnd + (0.05 if step % 2 else -0.05),
                     c.M_DPO_MARGIN: 0.1 * step, c.M_DPO_BEST_REWARD_MEAN: 0.5 * rnd,
                     c.M_DPO_WORST_REWARD_MEAN: -1.0 + 0.1 * rnd})
    return rows


def _job(kind, name, progress):
    return {"kind": kind, "metadata": {"name": name}, "status": {"phase": "Succeeded", "progress": progress,
                                                                  "conditions": []}}


def test_summary_shows_each_rounds_best_and_worst_reward_and_accuracy():
    jobs = [_job("SFTJob", "policy-sft", {"step": 120}), _job("RewardModelJob", "harmless-rm", {"accuracy": 0.62}),
            _job("DPOJob", "harmless-dpo", {"step": 24, "rewardAccuracy": 0.75})]
    s = summary.build(jobs, {"harmless-dpo": _dpo_series()}, {"pipeline_s": 300.0, "total_s": 330.0})
    assert [(r["round"], r["steps"], r["best_reward_mean"], round(r["worst_reward_mean"], 3),
             round(r["reward_accuracy"], 3)) for r in s["dpo_rounds"]] == [
        (1, 8, 0.5, -0.9, 0.6), (2, 8, 1.0, -0.8, 0.7), (3, 8, 1.5, -0.7, 0.8)]
    assert s["dpo_reward_accuracy"] == 0.75 and s["dpo_margin"] == pytest.approx(2.4)  # the last step's
    text = "\n".join(summary.lines(s))
    assert "round 2: best-of-n reward 1, worst-of-n -0.8, implicit-reward accuracy 0.7 (8 steps)" in text
    assert "best-of-n reward, round 1 -> 3: 0.500 -> 1.500 (+1.000)" in text
    assert "PPO" not in text and all(len(line) <= 100 for line in text.splitlines())
    json.dumps(s)


def test_summary_of_an_offline_run_has_no_rounds():
    rows = [{"step": i, c.M_DPO_LOSS: 0.6, c.M_DPO_ROUND: 0.0, c.M_DPO_REWARD_ACCURACY: 0.9} for i in range(1, 5)]
    s = summary.build([_job("DPOJob", "d", {"step": 4})], {"d": rows}, {})
    assert s["dpo_rounds"] == [] and s["dpo_reward_accuracy"] == 0.9
    assert "DPO implicit-reward accuracy: final 0.9" in "\n".join(summary.lines(s))


def test_chart_has_a_dpo_panel(tmp_path):
    out = tmp_path / "c.png"
    plots.plot_curves({"harmless-dpo": _dpo_series(), "d-offline": _dpo_series()[:3]},
                      {"harmless-dpo": "DPOJob", "d-offline": "DPOJob"}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_table_shows_the_round_and_the_accuracy():
    job = _job("DPOJob", "harmless-dpo", {"step": 12, "totalSteps": 24, "summary": "round 2/3, step 12/24",
                                          "rewardAccuracy": 0.625})
    line = report.table([job]).splitlines()[1]
    assert "DPOJob/harmless-dpo" in line and "round 2/3, step 12/24" in line and "acc=0.625" in line




SHORT = [
    *UPSTREAM_SHORT,
    "DPOJob/harmless-dpo:spec.training.maxSteps=3",
    "DPOJob/harmless-dpo:spec.training.batchSize=4",
    "DPOJob/harmless-dpo:spec.online.promptsPerRound=8",
    "DPOJob/harmless-dpo:spec.online.maxNewTokens=8",
]


@pytest.mark.slow
def test_short_dpo_pipeline_runs_three_rounds_on_the_reward_models_scores(tmp_path):
    """`python -m rlhf_pipeline run --pipeline dpo`, shortened, on its own embedded cluster with the real trainer:
    every stage Succeeded, the DPO job scored its samples with exactly the reward model the RewardModelJob wrote,
    wrote each round's pairs to its claim, and the summary and chart show the three rounds."""
    state, out = tmp_path / "cluster", tmp_path / "out"
    cluster = Cluster(str(state))
    try:
        proc = run_pipeline(state, out, SHORT, "--pipeline", "dpo")
        s = json.loads((out / "summary.json").read_text())
        assert s["ok"] and [st["kind"] for st in s["stages"]] == ["SFTJob", "RewardModelJob", "DPOJob"]
        assert [r["round"] for r in s["dpo_rounds"]] == [1, 2, 3] and all(r["steps"] == 1 for r in s["dpo_rounds"])
        assert all(r["best_reward_mean"] > r["worst_reward_mean"] for r in s["dpo_rounds"])
        dpo = next(st for st in s["stages"] if st["kind"] == "DPOJob")
        assert dpo["progress"]["summary"] == "round 3/3, step 3/3"
        assert "round 3: best-of-n reward" in proc.stdout and (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
        kc = str(state / "kubeconfig")
        rm = claim_dir(kc, "rlhf-demo", pvc_name("RewardModelJob", "harmless-rm"))
        claim = claim_dir(kc, "rlhf-demo", pvc_name("DPOJob", "harmless-dpo"))
        meta = json.loads((claim / "final" / "rlhf_metadata.json").read_text())
        assert meta["inputs"]["digests"]["/inputs/harmless-rm/final"] == tree_digest(rm / "final")
        for rnd in ("01", "02", "03"):
            assert (claim / "rounds" / rnd / "pairs.jsonl").read_text().strip()
    finally:
        cluster.down(log=lambda _m: None)
