"""Resume runs no code from a checkpoint and says truthfully where it started.

Every file of a checkpoint has its sha256 in the manifest (meta.json); a file planted, removed or
changed afterwards is refused with exit 7 before anything is deserialised, and the engine/RNG files
are read with ``weights_only=True``, so even a planted pickle with a forged manifest never runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from rlhf_trainer import cli, reward, sft  # noqa: E402
from rlhf_trainer import contract as c  # noqa: E402
from rlhf_trainer.runtime.checkpoint import META_FILE, CheckpointManager  # noqa: E402
from rlhf_trainer.runtime.failure import CheckpointError, Preempted  # noqa: E402
from rlhf_trainer.runtime.metrics import TrainerMetrics  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trainer_support import counting_examples, sentiment_pairs, write_jsonl  # noqa: E402


class Payload:
    """Unpickling this creates the directory ``marker``: stands for any code a planted pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant_pickle(path, marker) -> None:
    torch.save({"module": Payload(marker), "global_steps": 1}, path)


def forge_manifest(ckpt_dir, rel: str) -> None:
    """What an attacker who can write the claim also does: record the planted file's digest."""
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    meta["files"][rel] = hashlib.sha256((ckpt_dir / rel).read_bytes()).hexdigest()
    (ckpt_dir / META_FILE).write_text(json.dumps(meta))


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", counting_examples(120))


def sft_cfg(make_cfg, sft_file, run_dir, max_steps=4):
    return make_cfg("sft", sft_file, run_dir, training={"max_steps": max_steps, "batch_size": 4, "log_every": 1},
                    checkpoint={"every_steps": 2, "keep_last": 2})


# --- the manifest --------------------------------------------------------------------------------

def test_verify_refuses_added_missing_changed_and_linked_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)

    def write(d):
        (d / "model").mkdir()
        (d / "model" / "engine.pt").write_bytes(b"weights")
        (d / "state.json").write_text("{}")

    path = mgr.save(3, write, {"stage": "sft"})
    meta = mgr.verify(path)
    assert meta["files"] == {"model/engine.pt": hashlib.sha256(b"weights").hexdigest(),
                             "state.json": hashlib.sha256(b"{}").hexdigest()}

    (path / "model" / "evil.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: file model/evil.pt is not in the manifest"):
        mgr.verify(path)
    (path / "model" / "evil.pt").unlink()

    (path / "model" / "engine.pt").write_bytes(b"weightz")
    with pytest.raises(CheckpointError) as e:
        mgr.verify(path)
    assert str(e.value).startswith(f"checkpoint {path}: file model/engine.pt does not match its digest in the "
                                   "manifest (sha256 ")
    assert str(e.value).endswith("the checkpoint was changed after it was written: delete it or restore it")

    (path / "model" / "engine.pt").unlink()
    with pytest.raises(CheckpointError, match="file model/engine.pt listed in the manifest .* is missing"):
        mgr.verify(path)
    (path / "model" / "engine.pt").symlink_to(tmp_path / "elsewhere.pt")
    (tmp_path / "elsewhere.pt").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="model/engine.pt is not a regular file"):
        mgr.verify(path)

    meta.pop("files")
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists no file digests"):
        mgr.verify(path)


# --- the plain torch engine ----------------------------------------------------------------------

def test_plain_engine_resume_is_exact_and_reported(make_cfg, sft_file, tmp_path, monkeypatch, capsys):
    made: list[TrainerMetrics] = []

    class Recording(TrainerMetrics):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def resumed_gauge() -> float:
        return made[-1].registry.get_sample_value(c.M_RESUMED_FROM_STEP, made[-1].labels)

    monkeypatch.setattr(sft, "TrainerMetrics", Recording)
    straight = sft.run(sft_cfg(make_cfg, sft_file, tmp_path / "a", max_steps=8))
    assert straight["resumed_from"] == -1 and resumed_gauge() == -1
    start = [r for r in json_lines(capsys.readouterr().out) if r.get("event") == "resume"]
    assert start == [{**start[0], "resumedFromStep": -1, "message": "no checkpoint found, starting at step 0"}]

    stopped = sft_cfg(make_cfg, sft_file, tmp_path / "b", max_steps=8)
    monkeypatch.setenv("RLHF_STOP_AT_STEP", "5")
    with pytest.raises(Preempted):
        sft.run(stopped)
    monkeypatch.delenv("RLHF_STOP_AT_STEP")
    capsys.readouterr()
    resumed = sft.run(stopped)
    assert resumed["resumed_from"] == 5 and resumed_gauge() == 5
    line = [r for r in json_lines(capsys.readouterr().out) if r.get("event") == "resume"][0]
    assert line["resumedFromStep"] == 5 and line["message"] == "resumed from checkpoint step 5"
    assert line["checkpoint"] == str(tmp_path / "b" / "checkpoints" / "step-00000005")
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_success_message_says_where_the_run_started(make_cfg, sft_file, tmp_path, monkeypatch):
    from rlhf_operator.status import final_progress

    log = tmp_path / "termination-log"
    monkeypatch.setenv(c.ENV_TERMINATION_LOG, str(log))
    for max_steps, expected in ((2, -1), (4, 2)):
        path = tmp_path / f"c{max_steps}.yaml"
        path.write_text(sft_cfg(make_cfg, sft_file, tmp_path / "run", max_steps).to_yaml())
        assert cli.main(["sft", "--config", str(path)]) == c.EXIT_OK
        assert final_progress(log.read_text())["resumedFromStep"] == expected


def test_a_planted_pickle_never_runs_and_resume_exits_7(make_cfg, sft_file, tmp_path, monkeypatch):
    cfg = sft_cfg(make_cfg, sft_file, tmp_path / "run")
    sft.run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    marker = tmp_path / "payload-ran"
    plant_pickle(ckpt / "model" / "engine.pt", marker)

    log = tmp_path / "termination-log"
    monkeypatch.setenv(c.ENV_TERMINATION_LOG, str(log))
    config = tmp_path / "c.yaml"
    config.write_text(cfg.to_yaml())
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--config", str(config)])
    assert e.value.code == c.EXIT_CHECKPOINT_ERROR == 7 and c.EXIT_CHECKPOINT_ERROR in c.PERMANENT_EXIT_CODES
    assert log.read_text().startswith(f"checkpoint error: checkpoint {ckpt}: file model/engine.pt does not match its "
                                      "digest in the manifest")
    assert not marker.exists()

    # With the manifest forged too, the tensors-only loader still refuses it.
    forge_manifest(ckpt, "model/engine.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint file {ckpt / 'model' / 'engine.pt'} holds objects other "
                                              r"than tensors and plain data \(.*GLOBAL posix.mkdir"):
        sft.run(cfg)
    assert not marker.exists()


def test_added_and_flipped_files_are_refused(make_cfg, sft_file, tmp_path):
    cfg = sft_cfg(make_cfg, sft_file, tmp_path / "run")
    sft.run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    marker = tmp_path / "payload-ran"
    plant_pickle(ckpt / "model" / "extra.pt", marker)
    with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt}: file model/extra.pt is not in the manifest"):
        sft.run(cfg)
    (ckpt / "model" / "extra.pt").unlink()
    flip_a_byte(ckpt / "model" / "rng-rank0.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt}: file model/rng-rank0.pt does not match its digest"):
        sft.run(cfg)
    assert not marker.exists()


# --- DeepSpeed (CPU) -----------------------------------------------------------------------------

def test_deepspeed_zero2_resumes_and_refuses_planted_or_changed_files(make_cfg, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(80))
    cfg = make_cfg("reward", data, tmp_path / "run", training={"max_steps": 4, "batch_size": 8},
                   deepspeed={"enabled": True, "zero_stage": 2}, checkpoint={"every_steps": 2})
    reward.run(cfg)
    assert reward.run(cfg)["resumed_from"] == 4  # ZeRO optimizer states load with the tensors-only loader
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    states = ckpt / "model" / "engine" / "mp_rank_00_model_states.pt"
    original = tmp_path / "states.pt"
    shutil.copy(states, original)
    marker = tmp_path / "payload-ran"
    plant_pickle(states, marker)
    with pytest.raises(CheckpointError, match="file model/engine/mp_rank_00_model_states.pt does not match its digest"):
        reward.run(cfg)
    forge_manifest(ckpt, "model/engine/mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt holds objects other than tensors"):
        reward.run(cfg)
    assert not marker.exists()

    shutil.copy(original, states)
    forge_manifest(ckpt, "model/engine/mp_rank_00_model_states.pt")
    optim = ckpt / "model" / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_a_byte(optim)
    with pytest.raises(CheckpointError, match="file model/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt does not "
                                              "match its digest"):
        reward.run(cfg)
