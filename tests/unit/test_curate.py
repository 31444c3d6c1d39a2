"""alignflow.data.curate on the bad-data corpus in tests/data/bad (written by its make_corpus.py)."""
import os
import tempfile

# Before `datasets`/GX are imported anywhere: offline, no usage statistics, no writes to ~/.cache.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-datasets-"))

import json  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from alignflow.config import CurateConfig, GeneratorConfig, SourceConfig  # noqa: E402
from alignflow.data import task  # noqa: E402
from alignflow.data.curate import (DataFileError, EmptySplitError, curate, decode_rows, deduplicate,  # noqa: E402
                                   generated_rows, hold_out_logged, read_source, validate_data, validate_with_gx,
                                   write_outputs)

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
SMALL = dict(n_sft=50, n_rl=20, n_logged=10, n_eval=10, n_ood=10, n_real=10)

# file -> (good rows, {line: reason}) read as split rl at max_chars=1024 (sft adds "needs a response": below)
ROW_LEVEL = {
    "truncated.jsonl": (2, {2: "invalid JSON: Unterminated string starting at (column 39)"}),
    "invalid_utf8.jsonl": (2, {2: "invalid UTF-8 at byte 15"}),
    "bom.jsonl": (2, {}),
    "missing_fields.jsonl": (2, {2: "missing or null prompt", 3: "missing or null prompt", 4: "empty prompt",
                                 5: "empty response", 7: "empty prompt"}),
    "wrong_types.jsonl": (3, {1: "prompt has wrong type (int)", 2: "prompt has wrong type (dict)",
                              3: "response has wrong type (int)", 5: "prompt has wrong type (bool)"}),
    "nul.jsonl": (2, {2: "NUL byte at byte 19"}),
    "oversized.jsonl": (2, {2: "too long: 1500 chars > max_chars 1024", 3: "too long: 1030 chars > max_chars 1024"}),
    "duplicates.jsonl": (5, {}),  # duplicates are read fine; deduplicate() drops them
    "non_objects.jsonl": (2, {2: "not a JSON object (array)", 3: "not a JSON object (string)",
                              4: "not a JSON object (number)", 5: "not a JSON object (null)",
                              6: "invalid JSON: NaN is not JSON", 7: "invalid JSON: duplicate key 'prompt'",
                              9: "invalid JSON: lone surrogate escape"}),
    "chat_bad_roles.jsonl": (3, {  # line 4, a two-exchange chat, is good
        2: "unknown role 'bot' in messages",
        3: "messages roles out of order: assistant>user (expected [system] (user assistant)* user [assistant])",
        5: "messages: every message needs a role and a content"}),
    "trl.jsonl": (4, {5: "completion must be a single assistant message"}),
    "chat_good.jsonl": (3, {}),
}

FILE_LEVEL = {
    "empty.jsonl": "empty file",
    "array.json": "a JSON array spread over lines, not JSON Lines (one object per line)",
    "csv.jsonl": "not JSON Lines: none of its 3 lines is a JSON object (line 1: invalid JSON: Expecting value",
    "wrong_schema.parquet": "no 'prompt' or 'messages' column (columns: text, label); map one with columns:",
    "not_parquet.parquet": "not a readable Parquet file (Parquet magic bytes not found",
    "no_such_file.jsonl": "no such file or directory",
    "make_corpus.py": "unsupported file type '.py'",
}


def test_corpus_is_what_make_corpus_writes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_corpus", BAD / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, data in module.FILES.items():
        assert (BAD / name).read_bytes() == data, name


@pytest.mark.parametrize("name", sorted(ROW_LEVEL))
def test_row_level_problems(name):
    n_good, reasons = ROW_LEVEL[name]
    good, rejected = read_source(BAD / name, "rl", 1024)
    assert len(good) == n_good
    assert {r["line"]: r["reason"] for r in rejected} == reasons
    for r in rejected:
        assert r["source"] == str(BAD / name) and isinstance(r["raw"], str) and len(r["raw"]) <= 500
    lines = sorted(r["line"] for r in good) + sorted(reasons)
    assert len(set(lines)) == len(lines)  # no line both kept and quarantined
    for row in good:
        assert isinstance(row["prompt"], str) and row["prompt"].strip() and row["split"] == "rl"
        assert row["messages"][-1] == {"role": "user", "content": row["prompt"]}
        assert row["id"] and row["source"] == str(BAD / name)


def test_normalised_values():
    good, _ = read_source(BAD / "bom.jsonl", "rl", 1024)
    assert [r["prompt"] for r in good] == ["compute 4+4", "compute 5+5"]  # BOM and \r stripped
    assert [r["line"] for r in good] == [1, 2] and {r["split"] for r in good} == {"rl"}
    good, _ = read_source(BAD / "trl.jsonl", "rl", 1024)  # no answer field: no answer (none parsed from responses)
    assert [(r["prompt"], r["response"], r["answer"], r["columns"]) for r in good] == [
        ("compute 6+1", "6+1=7;A:7", None, {}), ("compute 6+2", "6+2=8;A:8", None, {}),
        ("compute 6+3", "A:9", None, {}), ("compute 6+4", None, None, {})]
    assert good[2]["messages"] == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "compute 6+3"}]
    good, _ = read_source(BAD / "chat_good.jsonl", "rl", 1024)
    assert [(r["prompt"], r["response"], r["line"]) for r in good] == [
        ("compute 5+1", "5+1=6;A:6", 1), ("compute 5+2", "5+2=7;A:7", 2), ("compute 5+3", None, 3)]
    assert good[1]["messages"] == [{"role": "system", "content": "answer with A:n"},
                                   {"role": "user", "content": "compute 5+2"}]
    good, _ = read_source(BAD / "wrong_types.jsonl", "rl", 1024)  # answers of any JSON type
    assert [(r["line"], r["answer"], r["columns"]) for r in good] == [
        (4, "[4]", {"answer": [4]}), (6, "5", {"answer": 5}), (7, "6", {"answer": "6"})]
    good, rejected = read_source(BAD / "oversized.jsonl", "rl", 2000)  # the cap is max_chars
    assert len(good) == 4 and not rejected


@pytest.mark.parametrize("name", sorted(FILE_LEVEL))
def test_unreadable_files(name):
    with pytest.raises(DataFileError) as info:
        read_source(BAD / name, "sft", 1024)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith(f"{BAD / name}: {FILE_LEVEL[name]}")


def test_sft_rows_need_a_response():
    good, rejected = read_source(BAD / "chat_good.jsonl", "sft", 1024)
    assert [r["line"] for r in good] == [1, 2]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (3, "sft row: the chat must end with an assistant turn (roles: user)")]
    good, rejected = read_source(BAD / "missing_fields.jsonl", "sft", 1024)
    assert [r["line"] for r in good] == [1] and rejected[-2:] == [
        {"source": str(BAD / "missing_fields.jsonl"), "line": 6, "reason": "sft row without a response",
         "raw": '{"prompt": "compute 6+0"}'},
        {"source": str(BAD / "missing_fields.jsonl"), "line": 7, "reason": "empty prompt", "raw": '{"prompt": "   "}'}]


def test_blank_only_file_is_empty(tmp_path):
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\r\n")
    with pytest.raises(DataFileError, match="empty file"):
        read_source(tmp_path / "blank.jsonl", "sft", 1024)


def test_parquet_and_hf_dataset(tmp_path):
    from datasets import Dataset, DatasetDict
    rows = [{"prompt": "compute 1+1", "response": "A:2", "answer": "2"},
            {"prompt": None, "response": "A:3", "answer": "3"},
            {"prompt": "compute 2+2", "response": "A:4", "answer": "4"}]
    pd.DataFrame(rows[:0]).to_parquet(tmp_path / "zero.parquet")
    with pytest.raises(DataFileError, match="zero.parquet: no rows"):
        read_source(tmp_path / "zero.parquet", "sft", 1024)
    pd.DataFrame(rows).to_parquet(tmp_path / "good.parquet")
    good, rejected = read_source(tmp_path / "good.parquet", "sft", 1024)
    assert [r["line"] for r in good] == [1, 3]
    assert [(r["line"], r["reason"]) for r in rejected] == [(2, "missing or null prompt")]

    chats = [{"messages": [{"role": "user", "content": "compute 3+3"}, {"role": "assistant", "content": "A:6"}]},
             {"messages": [{"role": "assistant", "content": "A:7"}, {"role": "user", "content": "compute 3+4"}]}]
    DatasetDict({"train": Dataset.from_list(rows), "eval": Dataset.from_list(chats)}).save_to_disk(tmp_path / "dd")
    good, rejected = read_source(tmp_path / "dd", "eval", 1024)  # the split named like `split`
    assert [(r["prompt"], r["response"], r["answer"], r["split"]) for r in good] == [
        ("compute 3+3", "A:6", None, "eval")]
    assert [(r["line"], r["reason"][:27]) for r in rejected] == [(2, "messages roles out of order")]
    good, rejected = read_source(tmp_path / "dd", "rl", 1024, dataset_split="train")  # named by dataset_split
    assert [(r["line"], r["answer"], r["split"]) for r in good] == [(1, "2", "rl"), (3, "4", "rl")]
    with pytest.raises(DataFileError) as info:  # neither named nor the only split
        read_source(tmp_path / "dd", "rl", 1024)
    assert str(info.value) == (f"{tmp_path / 'dd'}: DatasetDict has splits train, eval and none is named 'rl': "
                               "set dataset_split to one of them")
    with pytest.raises(DataFileError, match=r"DatasetDict has no split 'test' \(dataset_split\); its splits: "
                                            "train, eval"):
        read_source(tmp_path / "dd", "rl", 1024, dataset_split="test")
    DatasetDict({"only": Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd1")
    assert len(read_source(tmp_path / "dd1", "sft", 1024)[0]) == 2  # the only split
    Dataset.from_list(rows[:1]).save_to_disk(tmp_path / "single")
    assert len(read_source(tmp_path / "single", "sft", 1024)[0]) == 1
    (tmp_path / "not_a_dataset").mkdir()
    (tmp_path / "not_a_dataset" / "notes.txt").write_text("hello")
    with pytest.raises(DataFileError) as info:
        read_source(tmp_path / "not_a_dataset", "sft", 1024)
    assert str(info.value) == (
        f"{tmp_path / 'not_a_dataset'}: neither a dataset saved with save_to_disk nor a folder of data files "
        "(.jsonl, .json, .parquet) that datasets.load_dataset reads; it holds: notes.txt")


def test_deduplicate_and_leakage():
    good, _ = read_source(BAD / "duplicates.jsonl", "sft", 1024)
    kept, rejected = deduplicate(good)
    assert [r["line"] for r in kept] == [1, 3, 5]
    assert [(r["line"], r["reason"]) for r in rejected] == [(2, f"duplicate of {BAD / 'duplicates.jsonl'}:1"),
                                                            (4, f"duplicate of {BAD / 'duplicates.jsonl'}:1")]
    eval_rows, _ = read_source(BAD / "chat_good.jsonl", "eval", 1024)
    sft_rows, _ = read_source(BAD / "chat_good.jsonl", "sft", 1024)
    kept, rejected = deduplicate(sft_rows + eval_rows)  # same prompts in sft and eval: sft copies go
    assert {r["split"] for r in kept} == {"eval"} and len(kept) == 3
    assert rejected[0]["reason"] == f"leak: prompt also in held-out split eval ({BAD / 'chat_good.jsonl'}:1)"


def test_gx_catches_bad_rows():
    rows = generated_rows(GeneratorConfig(n_sft=3, n_rl=3, n_logged=1, n_eval=1, n_ood=1, n_real=1))[:10]
    rows = [r for r in rows if r["split"] != "corpus"]
    n_clean = len(rows)
    bad = [dict(rows[0], split="bogus", line=101), dict(rows[0], prompt="", line=102),
           dict(rows[0], response=None, line=103),                   # sft without a demonstration
           dict(rows[3], answer=None, line=104),                      # rl prompt without an answer
           dict(rows[3], answer="twelve", line=105), dict(rows[0], prompt="x" * 70, line=106),
           dict(rows[3], messages=None, line=107)]
    clean, rejected, summary = validate_with_gx(rows + bad, max_chars=60)
    assert len(clean) == n_clean
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert reasons == {
        101: "gx: expect_column_values_to_be_in_set(split)",
        102: "gx: expect_column_value_lengths_to_be_between(prompt)",  # empty
        103: "gx: expect_column_values_to_not_be_null(response)",
        104: "gx: expect_column_values_to_not_be_null(answer)",
        105: "gx: expect_column_values_to_match_regex(answer)",
        106: "gx: expect_column_value_lengths_to_be_between(prompt)",  # its chat (rows[0]'s) is short
        107: "gx: expect_column_values_to_not_be_null(messages)",
    }
    assert summary["success"] is False and summary["unexpected_rows"] == 7
    assert summary["evaluated_expectations"] == 9 and summary["rows"] == n_clean + 7
    assert summary["per_expectation"]["expect_column_values_to_be_in_set(split)"]["unexpected_count"] == 1
    json.dumps(summary)  # JSON-serialisable (no numpy ints)
    unlabelled = [dict(r, answer=None) for r in rows if r["split"] in ("real", "sft")]  # answers optional there
    clean, rejected, summary = validate_with_gx(rows + unlabelled, max_chars=60)
    assert len(unlabelled) == 4 and len(clean) == n_clean + 4 and not rejected and summary["success"] is True
    # a user's rows: no answer needed in any split, and an answer of any form (their rewards read it)
    user = [dict(r, source="mine.jsonl", answer=answer, line=200 + i)
            for i, (r, answer) in enumerate(zip(rows, [None, "twelve", "[1, 2]", None, "3.5"]))]
    clean, rejected, summary = validate_with_gx(user, max_chars=60)
    assert len(clean) == 5 and not rejected and summary["success"] is True
    long_chat = dict(rows[0], source="mine.jsonl", messages=[{"role": "system", "content": "s" * 50},
                                                             {"role": "user", "content": rows[0]["prompt"]}])
    assert validate_with_gx([long_chat], max_chars=60)[1][0]["reason"] == (
        "gx: expect_column_values_to_be_between(chars)")  # the whole chat counts


def test_write_outputs_splits_real_answers(tmp_path):
    rows = generated_rows(GeneratorConfig(**SMALL))
    rows = [r for r in rows if r["split"] != "corpus"]
    (tmp_path / "corpus.parquet").write_bytes(b"stale")
    counts = write_outputs(rows, [{"source": "x", "line": 1, "reason": "r", "raw": "\x00 caf\u00e9"}],
                           {"success": True}, tmp_path)
    assert counts == {"sft": 50, "rl": 20, "logged": 10, "eval": 10, "ood": 10, "real": 10, "quarantined": 1}
    assert not (tmp_path / "corpus.parquet").exists()  # stale split removed
    assert not list(tmp_path.glob(".*tmp"))
    real = pd.read_parquet(tmp_path / "real.parquet")
    assert list(real.columns) == ["id", "prompt", "messages", "response", "answer", "columns", "source", "line"]
    assert real["answer"].isna().all() and set(real["columns"]) == {"{}"}
    answers = pd.read_parquet(tmp_path / "real_answers.parquet")
    assert list(answers.columns) == ["id", "answer", "columns"] and list(answers["id"]) == list(real["id"])
    assert answers["answer"].notna().all()
    assert [json.loads(c) for c in answers["columns"]] == [{"answer": a} for a in answers["answer"]]
    rl = pd.read_parquet(tmp_path / "rl.parquet")
    assert json.loads(rl["messages"][0]) == [{"role": "user", "content": rl["prompt"][0]}]
    assert json.loads(rl["columns"][0]) == {"answer": rl["answer"][0]} and rl["answer"][0].isdigit()


def test_curate_end_to_end(tmp_path):
    cfg = CurateConfig(generator=GeneratorConfig(**SMALL), max_chars=1024, sources=[
        SourceConfig(path="truncated.jsonl", split="sft"), SourceConfig(path="csv.jsonl", split="sft"),
        SourceConfig(path="duplicates.jsonl", split="rl")])
    out = tmp_path / "curated"
    result = curate(cfg, out, root=BAD)
    assert result["unreadable"] == [{"path": "csv.jsonl", "problem": result["unreadable"][0]["problem"]}]
    assert result["missing_splits"] == {} and result["derived_splits"] == {}
    counts = result["counts"]
    # sft: 50 generated + 2 good lines; rl: 20 + 3 unique lines of duplicates.jsonl; corpus: task default
    assert counts == {"sft": 52, "rl": 23, "logged": 10, "eval": 10, "ood": 10, "real": 10, "corpus": 40000,
                      "quarantined": 4}
    sft = pd.read_parquet(out / "sft.parquet")
    assert len(sft) == 52 and sft["prompt"].notna().all() and sft["response"].notna().all()
    extra = sft[sft["source"] == "truncated.jsonl"]
    assert list(extra["line"]) == [1, 3] and list(extra["answer"]) == ["2", "6"]
    assert list(extra["columns"]) == ['{"answer": "2"}', '{"answer": "6"}']
    real = pd.read_parquet(out / "real.parquet")
    answers = pd.read_parquet(out / "real_answers.parquet")
    assert real["answer"].isna().all() and answers["answer"].notna().all()
    expected = {r["prompt"]: r["answer"] for r in task.generate(**SMALL)["real"]}
    assert dict(zip(real["prompt"], answers.set_index("id").loc[real["id"], "answer"])) == expected
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted((q["source"], q["line"], q["reason"][:24]) for q in quarantine) == [
        ("csv.jsonl", 0, "not JSON Lines: none of "), ("duplicates.jsonl", 2, "duplicate of duplicates."),
        ("duplicates.jsonl", 4, "duplicate of duplicates."), ("truncated.jsonl", 2, "invalid JSON: Unterminat")]
    assert json.loads((out / "validation.json").read_text())["success"] is True


def test_curate_without_good_rows(tmp_path):
    cfg = CurateConfig(generator=None, sources=[SourceConfig(path="csv.jsonl"), SourceConfig(path="empty.jsonl")])
    with pytest.raises(EmptySplitError) as info:
        curate(cfg, tmp_path / "out", root=BAD)
    assert isinstance(info.value, DataFileError) and info.value.path == "csv.jsonl, empty.jsonl"
    assert str(info.value) == (
        "split 'sft' is empty: csv.jsonl: unreadable (not JSON Lines: none of its 3 lines is a JSON object "
        "(line 1: invalid JSON: Expecting value (column 1))); empty.jsonl: unreadable (empty file); "
        "split 'rl' is empty: no source has split rl; split 'eval' is empty: no source has split eval; "
        "split 'logged' is empty: no logged source, and 0 rl prompt(s): too few to hold any out")
    assert len((tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()) == 2  # written all the same


def test_validate_data_exit_codes(tmp_path, capsys):
    quarantine = tmp_path / "q" / "quarantine.jsonl"
    code = validate_data([str(BAD / "truncated.jsonl"), str(BAD / "csv.jsonl"), str(BAD / "duplicates.jsonl")],
                         quarantine)
    out = capsys.readouterr().out
    assert code == 0 and "Traceback" not in out
    assert f"{BAD / 'csv.jsonl'}: not JSON Lines" in out
    lines = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert sorted((Path(q["source"]).name, q["line"]) for q in lines) == [
        ("csv.jsonl", 0), ("duplicates.jsonl", 2), ("duplicates.jsonl", 4), ("truncated.jsonl", 2)]

    (tmp_path / "all_bad.jsonl").write_text('{"prompt": 5}\n{"prompt": "compute 1+1"}\n')  # 2nd: sft, no response
    code = validate_data([str(BAD / "empty.jsonl"), str(tmp_path / "all_bad.jsonl")], quarantine)
    out = capsys.readouterr().out
    assert code == 1 and "Traceback" not in out
    assert f"{BAD / 'empty.jsonl'}: empty file" in out
    assert f"no valid rows: all 2 rows quarantined (see {quarantine})" in out
    assert len(quarantine.read_text().splitlines()) == 3

    code = validate_data([str(BAD / "not_parquet.parquet"), str(tmp_path / "missing.jsonl")], quarantine)
    out = capsys.readouterr().out
    assert code == 1 and "no valid rows: no readable file" in out and "Traceback" not in out


# ---------------------------------------------------------------- data as users have it (issue 15)
REVERSE = [  # a task that is not arithmetic: reverse a word; extra columns for the user's reward
    {"question": "reverse: cat", "solution": "tac", "difficulty": 1},
    {"question": "reverse: horse", "solution": "esroh", "difficulty": 2},
    {"question": "reverse: bird", "solution": ["drib", "DRIB"], "difficulty": 3},
]
MAPPING = {"prompt": "question", "answer": "solution"}
EXPECTED_REVERSE = [("reverse: cat", "tac", {"answer": "tac", "difficulty": 1}),
                    ("reverse: horse", "esroh", {"answer": "esroh", "difficulty": 2}),
                    ("reverse: bird", '["drib", "DRIB"]', {"answer": ["drib", "DRIB"], "difficulty": 3})]


def _jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _view(rows: list[dict]) -> list[tuple]:
    return [(r["prompt"], r["answer"], r["columns"]) for r in rows]


def test_every_format_with_a_column_mapping(tmp_path):
    from datasets import Dataset, DatasetDict
    _jsonl(tmp_path / "rev.jsonl", REVERSE)
    good, rejected = read_source(tmp_path / "rev.jsonl", "rl", 1024, columns=MAPPING)
    assert _view(good) == EXPECTED_REVERSE and not rejected and [r["line"] for r in good] == [1, 2, 3]
    assert good[0]["messages"] == [{"role": "user", "content": "reverse: cat"}] and good[0]["response"] is None
    # Parquet / Arrow need one type per column: the list answer stays in the JSON Lines file
    table = [dict(r, solution=r["solution"] if isinstance(r["solution"], str) else "drib") for r in REVERSE]
    expected_table = EXPECTED_REVERSE[:2] + [("reverse: bird", "drib", {"answer": "drib", "difficulty": 3})]
    pd.DataFrame(table).to_parquet(tmp_path / "rev.parquet")
    good, _ = read_source(tmp_path / "rev.parquet", "rl", 1024, columns=MAPPING)
    assert _view(good) == expected_table and [r["line"] for r in good] == [1, 2, 3]
    Dataset.from_list(table).save_to_disk(tmp_path / "saved")
    assert _view(read_source(tmp_path / "saved", "rl", 1024, columns=MAPPING)[0]) == expected_table
    DatasetDict({"train": Dataset.from_list(table[:2]), "test": Dataset.from_list(table[2:])}).save_to_disk(
        tmp_path / "saved_dict")
    good, _ = read_source(tmp_path / "saved_dict", "eval", 1024, columns=MAPPING, dataset_split="test")
    assert _view(good) == expected_table[2:] and good[0]["split"] == "eval"
    # a folder of data files as datasets.load_dataset(folder) splits it: train.jsonl, test.parquet
    folder = tmp_path / "folder"
    _jsonl(folder / "train.jsonl", REVERSE[:2])
    pd.DataFrame(table[2:]).to_parquet(folder / "test.parquet")
    (folder / "README.md").write_text("# my data\n")
    good, rejected = read_source(folder, "rl", 1024, columns=MAPPING, dataset_split="train")
    assert _view(good) == EXPECTED_REVERSE[:2] and not rejected
    assert [(r["source"], r["line"]) for r in good] == [(str(folder / "train.jsonl"), 1),
                                                         (str(folder / "train.jsonl"), 2)]
    good, _ = read_source(folder, "eval", 1024, columns=MAPPING, dataset_split="test")
    assert _view(good) == expected_table[2:] and good[0]["source"] == str(folder / "test.parquet")
    with pytest.raises(DataFileError) as info:
        read_source(folder, "rl", 1024, columns=MAPPING)
    assert str(info.value) == (f"{folder}: the folder has splits train, test and none is named 'rl': "
                               "set dataset_split to one of them")
    _jsonl(tmp_path / "one" / "rl.jsonl", REVERSE[:1])  # a split named like ours is taken without dataset_split
    assert _view(read_source(tmp_path / "one", "rl", 1024, columns=MAPPING)[0]) == EXPECTED_REVERSE[:1]


def test_mapped_column_missing_is_a_file_error(tmp_path):
    _jsonl(tmp_path / "rev.jsonl", REVERSE)
    with pytest.raises(DataFileError) as info:
        read_source(tmp_path / "rev.jsonl", "rl", 1024, columns={"prompt": "query", "answer": "solution"})
    assert str(info.value) == (f"{tmp_path / 'rev.jsonl'}: no column 'query' (for prompt); "
                               "the file's columns: question, solution, difficulty")
    pd.DataFrame(REVERSE[:2]).to_parquet(tmp_path / "rev.parquet")
    with pytest.raises(DataFileError, match=r"rev.parquet: no column 'answer_text' \(for answer\); "
                                            "the file's columns: question, solution, difficulty"):
        read_source(tmp_path / "rev.parquet", "rl", 1024, columns={"prompt": "question", "answer": "answer_text"})
    with pytest.raises(DataFileError, match="no 'prompt' or 'messages' column"):  # unmapped: no prompt
        read_source(tmp_path / "rev.parquet", "rl", 1024)


def test_answers_of_any_type_and_extra_columns_kept(tmp_path):
    rows = [{"prompt": "capital of France?", "answer": ["paris", "Paris"], "difficulty": 3},
            {"prompt": "pi to 2 places?", "answer": 3.14, "unit": None},
            {"prompt": "2+2?", "answer": 4, "meta": {"tags": ["math"]}},
            {"prompt": "is the sky blue?", "answer": True},
            {"prompt": "spell it", "answer": {"text": "it", "case": "lower"}},
            {"prompt": "no answer here", "solution": "worked steps"},
            {"prompt": "blank answer", "answer": "  "}]
    good, rejected = read_source(_jsonl(tmp_path / "mixed.jsonl", rows), "rl", 1024)
    assert [(r["answer"], r["columns"]) for r in good] == [
        ('["paris", "Paris"]', {"answer": ["paris", "Paris"], "difficulty": 3}),
        ("3.14", {"answer": 3.14}),  # null columns are left out (decode_rows gives None for them)
        ("4", {"answer": 4, "meta": {"tags": ["math"]}}),
        ("True", {"answer": True}),
        ('{"text": "it", "case": "lower"}', {"answer": {"text": "it", "case": "lower"}}),
        (None, {"solution": "worked steps"})]
    assert [(r["line"], r["reason"]) for r in rejected] == [(7, "empty answer")]
    write_outputs([{**r, "split": "rl"} for r in good], [], {}, tmp_path / "out")
    df = pd.read_parquet(tmp_path / "out" / "rl.parquet")
    prompts, chats, columns = decode_rows(df)
    assert prompts[:2] == ["capital of France?", "pi to 2 places?"]
    assert chats[0] == [{"role": "user", "content": "capital of France?"}]
    assert columns == {"answer": [["paris", "Paris"], 3.14, 4, True, {"text": "it", "case": "lower"}, None],
                       "difficulty": [3, None, None, None, None, None],
                       "meta": [None, None, {"tags": ["math"]}, None, None, None],
                       "solution": [None, None, None, None, None, "worked steps"]}
    # files curated before chats and columns: single user turns, the answer as the only column
    old = pd.DataFrame({"prompt": ["1+1=?", "2+2=?"], "answer": ["2", None]})
    assert decode_rows(old) == (["1+1=?", "2+2=?"], [[{"role": "user", "content": "1+1=?"}],
                                                     [{"role": "user", "content": "2+2=?"}]], {"answer": ["2", None]})


def test_read_split_jsonl_fallback_keeps_json_text(tmp_path):
    from alignflow.stage import read_split
    rows, _ = read_source(_jsonl(tmp_path / "rev.jsonl", REVERSE), "rl", 1024, columns=MAPPING)
    out = tmp_path / "curated"
    write_outputs(rows, [], {}, out)
    pd.read_parquet(out / "rl.parquet").to_json(out / "rl.jsonl", orient="records", lines=True)  # export-splits
    (out / "rl.parquet").unlink()
    df = read_split(out, "rl")
    assert decode_rows(df) == ([r["prompt"] for r in rows], [r["messages"] for r in rows],
                               {"answer": ["tac", "esroh", ["drib", "DRIB"]], "difficulty": [1, 2, 3]})
    assert list(df["answer"]) == ["tac", "esroh", '["drib", "DRIB"]']


def test_system_prompts_and_multi_turn_chats(tmp_path):
    def chat(*turns):
        return {"messages": [{"role": role, "content": content} for role, content in turns]}
    rows = [chat(("system", "You reverse words."), ("user", "reverse: cat"), ("assistant", "tac")),
            chat(("user", "reverse: dog"), ("assistant", "god"), ("user", "and: pig"), ("assistant", "gip")),
            chat(("system", "Be terse."), ("user", "reverse: ox"), ("assistant", "xo"), ("user", "and: yak")),
            chat(("user", "reverse: eel"), ("assistant", "lee"))]
    path = _jsonl(tmp_path / "chats.jsonl", rows)
    sft, rejected = read_source(path, "sft", 1024)  # line 3 ends with the user: no demonstration
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (3, "sft row: the chat must end with an assistant turn (roles: system>user>assistant>user)")]
    assert [(r["prompt"], r["response"]) for r in sft] == [("reverse: cat", "tac"), ("and: pig", "gip"),
                                                            ("reverse: eel", "lee")]
    assert sft[0]["messages"] == [{"role": "system", "content": "You reverse words."},
                                  {"role": "user", "content": "reverse: cat"}]
    assert sft[1]["messages"] == [{"role": "user", "content": "reverse: dog"}, {"role": "assistant", "content": "god"},
                                  {"role": "user", "content": "and: pig"}]
    rl, rejected = read_source(path, "rl", 1024)  # other splits: a trailing assistant turn is the response
    assert not rejected and [(r["prompt"], r["response"]) for r in rl] == [
        ("reverse: cat", "tac"), ("and: pig", "gip"), ("and: yak", None), ("reverse: eel", "lee")]
    assert rl[2]["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "reverse: ox"},
                                 {"role": "assistant", "content": "xo"}, {"role": "user", "content": "and: yak"}]
    # a single-turn chat keeps the generator's id formula; a chat with context hashes its messages
    assert sft[2]["id"] == generated_like_id("sft", "reverse: eel", "lee")
    assert sft[0]["id"] != generated_like_id("sft", "reverse: cat", "tac")
    # curate.system_prompt goes first in every chat without one; a row's own system message stays
    _jsonl(tmp_path / "eval.jsonl", [{"prompt": "reverse: bee", "answer": "eeb"}])
    _jsonl(tmp_path / "logged.jsonl", [{"prompt": "reverse: ant", "answer": "tna"}])
    cfg = CurateConfig(generator=None, system_prompt="Reverse the word.", sources=[
        SourceConfig(path="chats.jsonl", split="sft"), SourceConfig(path="chats.jsonl", split="rl"),
        SourceConfig(path="eval.jsonl", split="eval"), SourceConfig(path="logged.jsonl", split="logged")])
    result = curate(cfg, tmp_path / "out", root=tmp_path)
    sft_df = pd.read_parquet(tmp_path / "out" / "sft.parquet")
    assert [json.loads(m)[0] for m in sft_df["messages"]] == [
        {"role": "system", "content": "You reverse words."}, {"role": "system", "content": "Reverse the word."},
        {"role": "system", "content": "Reverse the word."}]
    assert list(sft_df["id"]) == [r["id"] for r in sft]  # ids do not depend on the configured system prompt
    eval_df = pd.read_parquet(tmp_path / "out" / "eval.parquet")
    assert json.loads(eval_df["messages"][0]) == [{"role": "system", "content": "Reverse the word."},
                                                  {"role": "user", "content": "reverse: bee"}]
    assert result["counts"] == {"sft": 3, "rl": 4, "eval": 1, "logged": 1, "quarantined": 1}


def generated_like_id(split, prompt, response):
    import hashlib
    return hashlib.sha1(json.dumps([split, prompt, response]).encode()).hexdigest()[:16]


def test_bad_role_order_quarantined_with_file_and_line(tmp_path):
    def chat(*roles):
        return {"messages": [{"role": role, "content": f"text {i}"} for i, role in enumerate(roles)]}
    path = _jsonl(tmp_path / "roles.jsonl", [
        chat("user", "assistant"), chat("user", "user"), chat("user", "system", "assistant"),
        chat("system"), chat("user", "assistant", "assistant"), chat("system", "system", "user"),
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "q2"}], "response": "a2"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "response": "b"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7},
                      {"role": "user", "content": "q2"}]}])
    good, rejected = read_source(path, "rl", 1024)
    expected = "(expected [system] (user assistant)* user [assistant])"
    assert [r["line"] for r in good] == [1, 8]  # 8: a response given beside a chat ending with the user
    assert [(r["source"], r["line"], r["reason"]) for r in rejected] == [
        (str(path), 2, f"messages roles out of order: user>user {expected}"),
        (str(path), 3, f"messages roles out of order: user>system>assistant {expected}"),
        (str(path), 4, f"messages roles out of order: system {expected}"),
        (str(path), 5, f"messages roles out of order: user>assistant>assistant {expected}"),
        (str(path), 6, f"messages roles out of order: system>system>user {expected}"),
        (str(path), 7, "prompt messages end with an assistant turn (roles: user>assistant)"),
        (str(path), 9, "messages end with an assistant turn and a response/completion is given too"),
        (str(path), 10, "message 2 (assistant) content has wrong type (int)")]
    assert good[1]["response"] == "a2"


def test_empty_required_split_names_files_and_reason(tmp_path):
    _jsonl(tmp_path / "data" / "x.jsonl", [{"question": None}, {"question": ""}, {"question": 3}])
    _jsonl(tmp_path / "data" / "e.jsonl", [{"question": "reverse: cat"}])
    cfg = CurateConfig(generator=None, sources=[
        SourceConfig(path="data/x.jsonl", split="rl", columns={"prompt": "question"}),
        SourceConfig(path="data/e.jsonl", split="eval", columns={"prompt": "question"})])
    with pytest.raises(EmptySplitError) as info:
        curate(cfg, tmp_path / "out", root=tmp_path)
    assert str(info.value) == (
        "split 'rl' is empty: data/x.jsonl: 3 rows, all quarantined (first: line 1: missing or null prompt); "
        "split 'logged' is empty: no logged source, and 0 rl prompt(s): too few to hold any out")
    quarantine = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["source"], q["line"], q["reason"]) for q in quarantine] == [
        ("data/x.jsonl", 1, "missing or null prompt"), ("data/x.jsonl", 2, "empty prompt"),
        ("data/x.jsonl", 3, "prompt has wrong type (int)")]
    # an sft source named but giving nothing is an error too (SFT is skipped only when no source names it)
    cfg = CurateConfig(generator=None, sources=[SourceConfig(path="data/e.jsonl", split="sft",
                                                             columns={"prompt": "question"})])
    with pytest.raises(EmptySplitError, match=r"^split 'sft' is empty: data/e.jsonl: 1 rows, all quarantined "
                                              r"\(first: line 1: sft row without a response\); split 'rl'"):
        curate(cfg, tmp_path / "out", root=tmp_path)


def _reverse_rows(n: int) -> list[dict]:
    words = [f"w{i:03d}x" for i in range(n)]
    return [{"prompt": f"reverse: {w}", "answer": w[::-1]} for w in words]


def test_logged_held_out_of_rl_and_optional_splits_recorded(tmp_path):
    _jsonl(tmp_path / "rl.jsonl", _reverse_rows(40) + _reverse_rows(1))  # the repeat: a duplicate
    _jsonl(tmp_path / "eval.jsonl", [{"prompt": "reverse: zebra", "answer": "arbez"}])
    cfg = CurateConfig(generator=None, logged_share=0.25, sources=[
        SourceConfig(path="rl.jsonl", split="rl"), SourceConfig(path="eval.jsonl", split="eval")])
    result = curate(cfg, tmp_path / "out", root=tmp_path)
    assert result["derived_splits"] == {"logged": "held out 25% of rl prompts (11 of 40 prompts, 11 rows)"}
    assert result["missing_splits"] == {"sft": "no sft source: RL starts from base.path",
                                        "ood": "no ood source", "real": "no real source"}
    assert result["counts"] == {"rl": 29, "logged": 11, "eval": 1, "quarantined": 1}  # the repeat of w000x
    rl, logged = (pd.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("rl", "logged"))
    assert not set(rl["prompt"]) & set(logged["prompt"]) and len(set(rl["prompt"]) | set(logged["prompt"])) == 40
    assert sorted(logged["prompt"])[:3] == ["reverse: w001x", "reverse: w007x", "reverse: w010x"]
    assert all(i == generated_like_id("logged", p, None) for i, p in zip(logged["id"], logged["prompt"]))
    assert not (tmp_path / "out" / "sft.parquet").exists() and not (tmp_path / "out" / "ood.parquet").exists()
    again = curate(cfg, tmp_path / "again", root=tmp_path)  # deterministic
    assert again == result and list(pd.read_parquet(tmp_path / "again" / "logged.parquet")["id"]) == list(logged["id"])
    validation = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert validation["missing_splits"] == result["missing_splits"] and validation["success"] is True
    # an ood source whose rows are all bad: recorded, no error
    _jsonl(tmp_path / "ood.jsonl", [{"prompt": ""}])
    cfg = CurateConfig(generator=None, sources=[*cfg.sources, SourceConfig(path="ood.jsonl", split="ood")])
    result = curate(cfg, tmp_path / "out", root=tmp_path)
    assert result["missing_splits"]["ood"] == (
        "no valid rows: ood.jsonl: 1 rows, all quarantined (first: line 1: empty prompt)")
    # too few rl prompts to hold one out
    assert hold_out_logged(generated_rows(GeneratorConfig(**SMALL))[:0], 0.2)[1] == (
        "no logged source, and 0 rl prompt(s): too few to hold any out")


def test_generator_rows_unchanged():
    """The generator's ids and counts are those of the code before issue 15 (a digest of every id)."""
    import hashlib
    rows = generated_rows(GeneratorConfig(**SMALL, n_corpus=100))
    assert Counter(r["split"] for r in rows) == {"sft": 50, "rl": 20, "logged": 10, "eval": 10, "ood": 10,
                                                 "real": 10, "corpus": 100}
    assert hashlib.sha1(",".join(r["id"] for r in rows).encode()).hexdigest()[:16] == "3afd7b69133d2ab9"
    assert [r["id"] for r in rows if r["split"] == "rl"][:2] == ["a9034fe98cc18f68", "306fb9c4c908c32b"]
    rl = next(r for r in rows if r["split"] == "rl")
    assert rl["messages"] == [{"role": "user", "content": rl["prompt"]}]
    assert rl["columns"] == {"answer": rl["answer"]} and isinstance(rl["answer"], str)
    assert next(r for r in rows if r["split"] == "corpus")["columns"] == {}
