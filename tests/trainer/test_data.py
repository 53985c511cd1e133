"""Dataset reading, row formats, the fixed split, and the errors bad data produces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rlhf_trainer.config import DatasetConfig
from rlhf_trainer.data import (
    DataError,
    load_preference_splits,
    load_prompt_records,
    load_prompts,
    load_sft_splits,
    split_indices,
)
from rlhf_trainer.data.formats import hh_turns, split_hh
from trainer_support import sentiment_pairs, write_jsonl

HH_FILE = Path("/work/shared/data/hh-rlhf-harmless/pairs.jsonl")

HH_ROW = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench.",
}


def ds(path, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), **kw)


# --- formats -------------------------------------------------------------------------------------

def test_hh_transcripts_split_into_prompt_and_two_responses():
    prompt, chosen, rejected = split_hh("x:1", HH_ROW["chosen"], HH_ROW["rejected"])
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert chosen == " I can't help with that." and rejected == " Use a tension wrench."
    assert prompt + chosen == HH_ROW["chosen"] and prompt + rejected == HH_ROW["rejected"]
    assert hh_turns(prompt) == (("user", "Hi"), ("assistant", "Hello!"), ("user", "How do I pick a lock?"))


def test_hh_responses_sharing_their_first_words_still_split_at_the_last_assistant_turn():
    prompt, chosen, rejected = split_hh("x:1", "\n\nHuman: Q\n\nAssistant: I think yes", "\n\nHuman: Q\n\nAssistant: I think no")
    assert (prompt, chosen, rejected) == ("\n\nHuman: Q\n\nAssistant:", " I think yes", " I think no")


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF sample not present")
def test_real_hh_rlhf_file_gives_prompts_that_rebuild_the_transcripts():
    rows = [json.loads(line) for line in HH_FILE.read_text().splitlines()[:200]]
    splits = load_preference_splits(ds(HH_FILE, eval_fraction=0.1))
    assert splits.format == "hh_rlhf"
    assert len(splits.train) + len(splits.eval) == sum(1 for _ in HH_FILE.open())
    originals = {(r["chosen"], r["rejected"]) for r in rows}
    rebuilt = {(p.prompt + p.chosen, p.prompt + p.rejected) for p in splits.train + splits.eval}
    assert originals <= rebuilt
    for p in splits.train[:50]:
        assert p.prompt.endswith("\n\nAssistant:") and p.chosen != p.rejected
    prompts = load_prompts(ds(HH_FILE, eval_fraction=0.1))
    assert prompts == [p.prompt for p in splits.train]


def test_ranked_responses_expand_to_all_ordered_pairs(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "P1", "responses": ["a", "b", "c"]},
        {"prompt": "P2", "responses": ["w", "x", "y", "z"]},
    ])
    splits = load_preference_splits(ds(f, eval_fraction=0.0))
    assert splits.format == "ranked"
    got = {(p.prompt, p.chosen, p.rejected) for p in splits.train}
    assert got == {("P1", "a", "b"), ("P1", "a", "c"), ("P1", "b", "c"),
                   ("P2", "w", "x"), ("P2", "w", "y"), ("P2", "w", "z"),
                   ("P2", "x", "y"), ("P2", "x", "z"), ("P2", "y", "z")}


def test_scored_completions_pair_by_score_and_skip_ties(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [
        {"user_input": "Q", "completion": "low", "score": 1},
        {"user_input": "Q", "completion": "high", "score": 3.5},
        {"user_input": "Q", "completion": "mid", "score": 2},
        {"user_input": "Q", "completion": "mid2", "score": 2},
        {"user_input": "R", "completion": "r1", "score": 0},
        {"user_input": "R", "completion": "r2", "score": -1},
    ])
    splits = load_preference_splits(ds(f, eval_fraction=0.0))
    got = {(p.prompt, p.chosen, p.rejected) for p in splits.train}
    assert got == {("Q", "high", "mid"), ("Q", "high", "mid2"), ("Q", "high", "low"), ("Q", "mid", "low"),
                   ("Q", "mid2", "low"), ("R", "r1", "r2")}


def test_ranked_pairs_of_one_prompt_never_straddle_the_split(tmp_path):
    rows = [{"prompt": f"P{i}", "responses": ["a", "b", "c"]} for i in range(30)]
    splits = load_preference_splits(ds(write_jsonl(tmp_path / "r.jsonl", rows), eval_fraction=0.2))
    train_prompts = {p.prompt for p in splits.train}
    eval_prompts = {p.prompt for p in splits.eval}
    assert not train_prompts & eval_prompts
    assert len(eval_prompts) == 6 and len(splits.eval) == 18


def test_sft_formats_and_prompts_cut_from_preference_data(tmp_path):
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q", "response": " A"}] * 4)
    txt = write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}] * 4)
    pcr = write_jsonl(tmp_path / "pcr.jsonl", [{"prompt": "Q", "chosen": " good", "rejected": " bad"}] * 4)
    assert load_sft_splits(ds(pr, eval_fraction=0)).train[0].response == " A"
    t = load_sft_splits(ds(txt, eval_fraction=0)).train[0]
    assert (t.prompt, t.response) == ("", "just text")
    assert load_sft_splits(ds(pcr, eval_fraction=0)).train[0].response == " good"  # SFT on the chosen reply
    assert load_prompts(ds(pcr, eval_fraction=0)) == ["Q"] * 4
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}] * 2)
    rec = load_prompt_records(ds(chat, eval_fraction=0)).train[0]
    assert rec.messages == (("user", "hi"),) and rec.prompt == "\n\nHuman: hi\n\nAssistant:"


def test_formats_are_detected_from_the_first_row(tmp_path):
    cases = {
        "prompt_chosen_rejected": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "hh_rlhf": HH_ROW,
        "ranked": {"prompt": "p", "responses": ["a", "b"]},
        "scored": {"user_input": "p", "completion": "c", "score": 1},
    }
    for fmt, row in cases.items():
        f = write_jsonl(tmp_path / f"{fmt}.jsonl", [{**row, "score": i} if fmt == "scored" else row for i in range(3)])
        assert load_preference_splits(ds(f, eval_fraction=0)).format == fmt


# --- files ---------------------------------------------------------------------------------------

def test_json_parquet_and_save_to_disk_read_the_same_rows(tmp_path):
    rows = sentiment_pairs(10)
    expected = load_preference_splits(ds(write_jsonl(tmp_path / "d.jsonl", rows)))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    key = lambda pairs: [(p.prompt, p.chosen, p.rejected) for p in pairs]  # noqa: E731
    for path in ("d.json", "d.parquet", "hf"):
        got = load_preference_splits(ds(tmp_path / path))
        assert (key(got.train), key(got.eval)) == (key(expected.train), key(expected.eval)), path
    assert got.train[0].source.startswith(f"{tmp_path / 'hf'}: row ")


# --- errors --------------------------------------------------------------------------------------

def test_malformed_rows_name_file_line_and_field(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    f = tmp_path / "bad.jsonl"
    cases = [
        ([good, '{"prompt": "p", "chosen": "c"'], f"{f}:2: not valid JSON"),
        ([good, good, json.dumps({"prompt": "p", "chosen": "c"})], f"{f}:3: field 'rejected' is missing"),
        ([good, json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"})], f"{f}:2: field 'chosen' must be a string"),
        ([good, json.dumps({"prompt": "p", "chosen": "  ", "rejected": "r"})], f"{f}:2: field 'chosen' is empty"),
        ([good, "[1, 2]"], f"{f}:2: expected a JSON object"),
    ]
    for lines, message in cases:
        f.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError) as e:
            load_preference_splits(ds(f, eval_fraction=0))
        assert message in str(e.value)
    hh = write_jsonl(tmp_path / "hh.jsonl", [HH_ROW, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "totally different"}])
    with pytest.raises(DataError, match=rf"{hh}:2: fields 'chosen' and 'rejected' share no prompt"):
        load_preference_splits(ds(hh, eval_fraction=0))
    scored = write_jsonl(tmp_path / "s.jsonl", [{"user_input": "q", "completion": "c", "score": "high"}])
    with pytest.raises(DataError, match=rf"{scored}:1: field 'score' must be a finite number"):
        load_preference_splits(ds(scored, eval_fraction=0))
    ranked = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["only one"]}])
    with pytest.raises(DataError, match=rf"{ranked}:1: field 'responses' must be a list of at least 2"):
        load_preference_splits(ds(ranked, eval_fraction=0))


def test_empty_small_missing_and_wrong_format_datasets_fail(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_preference_splits(ds(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_preference_splits(ds(tmp_path / "nope.jsonl"))
    small = write_jsonl(tmp_path / "small.jsonl", sentiment_pairs(10))
    with pytest.raises(DataError, match=r"train split has 8 pairs, fewer than dataset.min_train_samples=50"):
        load_preference_splits(ds(small, eval_fraction=0.2, min_train_samples=50))
    one = write_jsonl(tmp_path / "one.jsonl", sentiment_pairs(1))
    with pytest.raises(DataError, match="train split has 0 pairs"):
        load_preference_splits(ds(one, eval_fraction=0.5))
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="format text cannot feed the reward stage"):
        load_preference_splits(ds(text))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: cannot detect the row format from fields \['question'\]"):
        load_sft_splits(ds(odd))


def test_files_that_are_not_utf8_json_lines_name_file_offset_and_line(tmp_path):
    rows = [json.dumps(r) + "\n" for r in sentiment_pairs(5)]
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text("".join(rows), encoding="utf-16")  # with a byte-order mark, as Windows tools write it
    with pytest.raises(DataError) as e:
        load_preference_splits(ds(utf16, eval_fraction=0))
    assert str(e.value).startswith(f"{utf16}:1: byte offset 0: a UTF-16 byte-order mark, so the file is UTF-16; "
                                   "expected UTF-8 JSON lines; convert it, e.g. iconv -f UTF-16 -t UTF-8")
    utf32 = tmp_path / "utf32.json"
    utf32.write_text("[" + ", ".join(rows) + "]", encoding="utf-32")
    with pytest.raises(DataError, match=rf"{utf32}:1: byte offset 0: a UTF-32 byte-order mark"):
        load_preference_splits(ds(utf32, eval_fraction=0))
    no_bom = tmp_path / "no-bom.jsonl"
    no_bom.write_bytes("".join(rows).encode("utf-16-le"))
    with pytest.raises(DataError, match=rf"{no_bom}:1: byte offset 1: a NUL byte .*; expected UTF-8 JSON lines"):
        load_preference_splits(ds(no_bom, eval_fraction=0))

    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))  # e.g. a gzip file named .jsonl
    with pytest.raises(DataError, match=rf"{binary}:1: byte offset 1: byte 0x8b is not UTF-8 .*; expected UTF-8 JSON "
                                        "lines"):
        load_preference_splits(ds(binary, eval_fraction=0))

    one_bad_byte = tmp_path / "one-bad-byte.jsonl"
    data = "".join(rows).encode()
    at = len("".join(rows[:2]).encode()) + 20  # inside line 3
    one_bad_byte.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    with pytest.raises(DataError) as e:
        load_preference_splits(ds(one_bad_byte, eval_fraction=0))
    assert str(e.value) == (f"{one_bad_byte}:3: byte offset {at}: byte 0xff is not UTF-8 (invalid start byte); "
                            "expected UTF-8 JSON lines")
    as_array = tmp_path / "array.json"
    as_array.write_bytes(b"[\n" + b",\n".join(r.strip().encode() for r in rows[:2]) + b",\n{\"prompt\": \"\xe9\"}]")
    with pytest.raises(DataError, match=rf"{as_array}:4: byte offset \d+: byte 0xe9 is not UTF-8 .*; expected UTF-8 JSON$"):
        load_preference_splits(ds(as_array, eval_fraction=0))
    # A UTF-8 byte-order mark is fine.
    bom8 = tmp_path / "bom8.jsonl"
    bom8.write_bytes(b"\xef\xbb\xbf" + data)
    assert len(load_preference_splits(ds(bom8, eval_fraction=0)).train) == 5


# --- split ---------------------------------------------------------------------------------------

def test_split_is_fixed_by_seed_disjoint_and_sized():
    train, evals = split_indices(1712, 0.1, seed=0)
    assert len(evals) == 171 and len(train) == 1541
    assert not set(train) & set(evals) and set(train) | set(evals) == set(range(1712))
    assert split_indices(1712, 0.1, seed=0) == (train, evals)
    assert split_indices(1712, 0.1, seed=1)[1] != evals
    assert split_indices(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])


def test_max_samples_takes_a_seeded_subset(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", sentiment_pairs(100))
    a = load_preference_splits(ds(f, max_samples=40, eval_fraction=0.25))
    b = load_preference_splits(ds(f, max_samples=40, eval_fraction=0.25))
    assert (len(a.train), len(a.eval)) == (30, 10) and a.train == b.train


def test_the_hh_reward_run_config_is_valid(minilm_path):
    import yaml
    from rlhf_trainer.config import from_dict

    text = (Path(__file__).parent / "configs" / "hh_reward_minilm.yaml").read_text().replace("@MINILM@", minilm_path)
    cfg = from_dict(yaml.safe_load(text))
    assert cfg.stage == "reward" and cfg.dataset.format == "hh_rlhf" and cfg.dataset.eval_fraction == 0.1
    assert Path(cfg.model.path, "config.json").exists()
