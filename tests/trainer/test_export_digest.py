"""Hand-over digests: a stage records what it wrote and the digests of the model directories it read."""

import json

from rlhf_trainer import config as tc
from rlhf_trainer.export import export_final, tree_digest


def _model_dir(path, weights=b"w" * 10):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text("{}")
    return path


def test_digest_changes_with_any_byte_or_name_and_ignores_metadata(tmp_path):
    a = _model_dir(tmp_path / "a")
    base = tree_digest(a)
    (a / tc.METADATA_FILE).write_text("{}")
    assert tree_digest(a) == base
    (a / "model.safetensors").write_bytes(b"w" * 9 + b"x")
    assert tree_digest(a) != base
    b = _model_dir(tmp_path / "b")
    (b / "config.json").rename(b / "config2.json")
    assert tree_digest(b) != base


def test_export_records_output_and_input_digests(tmp_path):
    actor = _model_dir(tmp_path / "inputs" / "sft" / "final", b"actor")
    rm = _model_dir(tmp_path / "inputs" / "rm" / "final", b"rm")
    cfg = tc.from_dict({
        "stage": "ppo", "dataset": {"path": "/data.jsonl"},
        "ppo": {"actor": {"path": str(actor)}, "reward_model": {"path": str(rm)}},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    })
    final = export_final(cfg, lambda d: (d / "model.safetensors").write_bytes(b"trained"), {"stage": "ppo"})
    meta = json.loads((final / tc.METADATA_FILE).read_text())
    assert meta["output_digest"] == tree_digest(final)
    assert meta["inputs"]["digests"] == {str(actor): tree_digest(actor), str(rm): tree_digest(rm)}


def test_success_termination_message_carries_final_progress():
    from rlhf_operator.status import final_progress
    from rlhf_trainer import contract as c
    from rlhf_trainer.cli import final_metrics_message

    msg = final_metrics_message({"step": 40, "metrics": {c.M_RM_EVAL_ACCURACY: 0.75, c.M_LOSS: 0.5,
                                                         "not_a_metric": 1.0, c.M_PPO_KL: float("nan")}})
    assert len(msg) < 4000
    assert final_progress(msg) == {"step": 40, "totalSteps": 40, "accuracy": 0.75, "loss": 0.5}
    assert final_progress(final_metrics_message({"step": 40}, 40))["checkpointStep"] == 40
