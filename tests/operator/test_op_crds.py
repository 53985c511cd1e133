"""The CRDs: generated files up to date, every field described, trainer options all present."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from rlhf_operator import crd_schema, crdgen
from rlhf_trainer import config as tc


def walk(schema, path="spec"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")


def version(kind):
    return crd_schema.crd(kind)["spec"]["versions"][0]


def test_generated_files_are_up_to_date():
    for out_dir in crdgen.DEFAULT_DIRS:
        stale = crdgen.stale_files(out_dir)
        assert not stale, f"{out_dir} out of date: {stale}; run `python -m rlhf_operator.crdgen`"


def test_one_command_writes_crds_and_the_charts_copies(tmp_path, monkeypatch, capsys):
    repo = Path(crdgen.__file__).resolve().parents[2]
    assert crdgen.DEFAULT_DIRS == (repo / "crds", repo / "charts" / "rlhf-operator" / "crds")
    source, chart = tmp_path / "crds", tmp_path / "chart-crds"
    chart.mkdir()
    (chart / "rlhf.io_oldjobs.yaml").write_text("kind: CustomResourceDefinition\n")  # a kind since removed
    monkeypatch.setattr(crdgen, "DEFAULT_DIRS", (source, chart))
    assert crdgen.main([]) == 0
    expected = sorted(crdgen.render())
    assert sorted(p.name for p in source.iterdir()) == expected == sorted(p.name for p in chart.iterdir())
    assert all((source / n).read_bytes() == (chart / n).read_bytes() for n in expected)
    assert crdgen.main(["--check"]) == 0
    (chart / expected[0]).write_text((chart / expected[0]).read_text() + "# hand edit\n")
    capsys.readouterr()
    assert crdgen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"out of date in {chart}: {expected[0]}" in err and str(source) not in err
    (source / "extra.yaml").write_text("x: 1\n")
    assert crdgen.stale_files(source) == ["extra.yaml"]


def test_check_passes_on_the_repository():
    proc = subprocess.run([sys.executable, "-m", "rlhf_operator.crdgen", "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_field_has_a_description():
    for kind in crd_schema.KINDS:
        schema = version(kind)["schema"]["openAPIV3Schema"]
        missing = [p for p, s in walk(schema["properties"]["spec"])] + [p for p, s in walk(schema["properties"]["status"], "status")]
        missing = [p for p, s in list(walk(schema["properties"]["spec"])) + list(walk(schema["properties"]["status"], "status"))
                   if not s.get("description")]
        assert missing == [], f"{kind}: fields without description: {missing}"


def test_trainer_options_all_appear_with_type_enum_and_bounds():
    spec = version("PPOJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    hints = typing.get_type_hints(tc.PPOConfig)
    for f in dataclasses.fields(tc.PPOConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        prop = spec["ppo"]["properties"][crd_schema.camel(f.name)]
        assert prop["description"].startswith(f.metadata["help"])
    training = spec["training"]["properties"]
    assert {crd_schema.camel(f.name) for f in dataclasses.fields(tc.TrainingConfig)} == set(training)
    assert training["batchSize"] == {**training["batchSize"], "type": "integer", "minimum": 1}
    assert training["lrSchedule"]["enum"] == ["linear", "constant", "cosine"]
    assert spec["ppo"]["properties"]["gamma"]["maximum"] == 1
    assert spec["deepspeed"]["properties"]["zeroStage"]["maximum"] == 3


def bounded_fields():
    """(dotted config path, dataclass field) of every trainer option that declares bounds."""
    return [(path, f) for path, _value, f in tc._bounded_fields(tc.TrainerConfig())]


# CRD section -> trainer dataclass, for the sections generated from the trainer's configuration
SECTIONS = {("SFTJob", "training"): tc.TrainingConfig, ("SFTJob", "deepspeed"): tc.DeepSpeedConfig,
            ("SFTJob", "dataset"): tc.DatasetConfig, ("RewardModelJob", "reward"): tc.RewardConfig,
            ("PPOJob", "ppo"): tc.PPOConfig, ("PPOJob", "reward"): tc.RewardSourcesConfig,
            ("PPOJob", "reward.endpoint"): tc.RewardEndpointConfig, ("PPOJob", "reward.length"): tc.LengthRuleConfig}


def test_bounds_live_in_the_config_fields_and_reach_the_schema():
    """One home: a field's bounds are JSON-schema keywords in its metadata, copied unchanged into the CRD."""
    assert not hasattr(crd_schema, "BOUNDS")
    keywords = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "maxLength"}
    assert len(bounded_fields()) > 50
    for path, f in bounded_fields():
        assert set(f.metadata["bounds"]) <= keywords, path
    for (kind, section), cls in SECTIONS.items():
        props = version(kind)["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for part in section.split("."):
            props = props["properties"][part]
        for f in dataclasses.fields(cls):
            if "bounds" in f.metadata:
                prop = props["properties"][crd_schema.camel(f.name)]
                assert {k: prop[k] for k in f.metadata["bounds"]} == f.metadata["bounds"], f"{section}.{f.name}"


def test_names_columns_status_subresource():
    for kind, k in crd_schema.KINDS.items():
        obj = crd_schema.crd(kind)
        names = obj["spec"]["names"]
        assert names["categories"] == ["rlhf"] and names["shortNames"] == [k.short] and names["plural"] == k.plural
        v = version(kind)
        assert v["subresources"] == {"status": {}}
        columns = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
        assert columns["Phase"] == ".status.phase" and columns["Progress"] == ".status.progress.summary"
        assert columns[k.metric_column[0]] == f".status.progress.{k.metric_column[1]}"
        assert columns["Age"] == ".metadata.creationTimestamp"
    assert "Reward" in {c["name"] for c in version("PPOJob")["additionalPrinterColumns"]}
    assert "Accuracy" in {c["name"] for c in version("RewardModelJob")["additionalPrinterColumns"]}


def test_required_fields_and_lifecycle_knobs():
    ppo = version("PPOJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(ppo["required"]) == {"actor", "dataset"}  # the reward: spec.rewardModel and/or spec.reward
    sft = version("SFTJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(sft["required"]) == {"model", "dataset"}
    props = sft["properties"]
    assert props["checkpoint"]["properties"]["retainPolicy"]["enum"] == ["Retain", "Delete"]
    assert props["backoffLimit"]["minimum"] == 0 and props["activeDeadlineSeconds"]["minimum"] == 1
    for key in ("suspend", "ttlSecondsAfterFinished", "image", "scheduling", "resources", "deepspeed", "env"):
        assert key in props
    assert props["model"]["properties"]["fromJob"]["properties"]["kind"]["enum"] == list(crd_schema.KINDS)


def test_every_number_in_a_spec_is_bounded():
    """An unbounded integer let maxSteps 2**63-1 through, and every status write after it failed."""
    for kind in crd_schema.KINDS:
        spec = version(kind)["schema"]["openAPIV3Schema"]["properties"]["spec"]
        unbounded = [p for p, s in walk(spec) if s.get("type") in ("integer", "number")
                     and ("maximum" not in s or "minimum" not in s)]
        assert unbounded == [], f"{kind}: integer/number fields without minimum and maximum: {unbounded}"
    training = version("SFTJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert training["properties"]["maxSteps"]["maximum"] == tc.MAX_STEPS < 2**31


def test_the_trainer_refuses_what_the_schema_refuses():
    """config.validate enforces the same bounds (the maximums too), naming the field: one step past either end
    of every bounded number fails with `<path>: must be >= N, got V` (or <=, >, <)."""
    for path, f in bounded_fields():
        b = f.metadata["bounds"]
        step = 1 if f.type in (int, "int") else 0.5
        ends = []
        if "minimum" in b:
            low = b["minimum"] if b.get("exclusiveMinimum") else b["minimum"] - step
            ends.append((low, f">{'' if b.get('exclusiveMinimum') else '='} {b['minimum']}"))
        if "maximum" in b:
            high = b["maximum"] if b.get("exclusiveMaximum") else b["maximum"] + step
            ends.append((high, f"<{'' if b.get('exclusiveMaximum') else '='} {b['maximum']}"))
        for value, rule in ends:
            cfg = tc.TrainerConfig()
            *sections, name = path.split(".")
            obj = cfg
            for section in sections:
                obj = getattr(obj, section)
            setattr(obj, name, value)
            with pytest.raises(tc.ConfigError) as e:
                tc.validate(cfg)
            assert str(e.value) == f"{path}: must be {rule}, got {value}"


def test_names_keys_and_paths_under_a_mount_carry_patterns():
    spec = version("PPOJob")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for role in ("actor", "rewardModel", "critic", "reference"):
        props = spec[role]["properties"]
        assert props["path"]["pattern"] == props["tokenizerPath"]["pattern"] == crd_schema.PATH_PATTERN
        assert props["claim"]["pattern"] == props["fromJob"]["properties"]["name"]["pattern"] == crd_schema.OBJECT_NAME_PATTERN
    for ds in ("dataset", "ptxDataset"):
        props = spec[ds]["properties"]
        assert props["path"]["pattern"] == crd_schema.PATH_PATTERN and props["claim"]["pattern"] == crd_schema.OBJECT_NAME_PATTERN
        assert props["configMap"]["properties"]["key"]["pattern"] == crd_schema.CONFIGMAP_KEY_PATTERN
