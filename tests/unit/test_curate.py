"""alignflow.data.curate on the bad-data corpus in tests/data/bad (written by its make_corpus.py)."""
import os
import tempfile

# Before `datasets`/GX are imported anywhere: offline, no usage statistics, no writes to ~/.cache.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-datasets-"))

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from alignflow.config import CurateConfig, GeneratorConfig, SourceConfig  # noqa: E402
from alignflow.data import task  # noqa: E402
from alignflow.data.curate import (DataFileError, curate, deduplicate, generated_rows, read_source,  # noqa: E402
                                   validate_data, validate_with_gx, write_outputs)

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
SMALL = dict(n_sft=50, n_rl=20, n_logged=10, n_eval=10, n_ood=10, n_real=10)

# file -> (good rows, {line: reason}) at max_chars=1024
ROW_LEVEL = {
    "truncated.jsonl": (2, {2: "invalid JSON: Unterminated string starting at (column 39)"}),
    "invalid_utf8.jsonl": (2, {2: "invalid UTF-8 at byte 15"}),
    "bom.jsonl": (2, {}),
    "missing_fields.jsonl": (2, {2: "missing or null prompt", 3: "missing or null prompt", 4: "empty prompt",
                                 5: "empty response", 7: "empty prompt"}),
    "wrong_types.jsonl": (2, {1: "prompt has wrong type (int)", 2: "prompt has wrong type (dict)",
                              3: "response has wrong type (int)", 4: "answer has wrong type (list)",
                              5: "prompt has wrong type (bool)"}),
    "nul.jsonl": (2, {2: "NUL byte at byte 19"}),
    "oversized.jsonl": (2, {2: "too long: 1500 chars > max_chars 1024", 3: "too long: 1030 chars > max_chars 1024"}),
    "duplicates.jsonl": (5, {}),  # duplicates are read fine; deduplicate() drops them
    "non_objects.jsonl": (2, {2: "not a JSON object (array)", 3: "not a JSON object (string)",
                              4: "not a JSON object (number)", 5: "not a JSON object (null)",
                              6: "invalid JSON: NaN is not JSON", 7: "invalid JSON: duplicate key 'prompt'",
                              9: "invalid JSON: lone surrogate escape"}),
    "chat_bad_roles.jsonl": (2, {
        2: "unknown role 'bot' in messages",
        3: "messages roles out of order: assistant>user (expected [system] user [assistant])",
        4: "messages roles out of order: user>assistant>user>assistant (expected [system] user [assistant])",
        5: "messages: every message needs a role and a content"}),
    "trl.jsonl": (4, {5: "completion must be a single assistant message"}),
    "chat_good.jsonl": (3, {}),
}

FILE_LEVEL = {
    "empty.jsonl": "empty file",
    "array.json": "a JSON array spread over lines, not JSON Lines (one object per line)",
    "csv.jsonl": "not JSON Lines: none of its 3 lines is a JSON object (line 1: invalid JSON: Expecting value",
    "wrong_schema.parquet": "no 'prompt' or 'messages' column (columns: text, label)",
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
    good, rejected = read_source(BAD / name, "sft", 1024)
    assert len(good) == n_good
    assert {r["line"]: r["reason"] for r in rejected} == reasons
    for r in rejected:
        assert r["source"] == str(BAD / name) and isinstance(r["raw"], str) and len(r["raw"]) <= 500
    lines = sorted(r["line"] for r in good) + sorted(reasons)
    assert len(set(lines)) == len(lines)  # no line both kept and quarantined
    for row in good:
        assert isinstance(row["prompt"], str) and row["prompt"].strip() and row["split"] == "sft"
        assert row["id"] and row["source"] == str(BAD / name)


def test_normalised_values():
    good, _ = read_source(BAD / "bom.jsonl", "rl", 1024)
    assert [r["prompt"] for r in good] == ["compute 4+4", "compute 5+5"]  # BOM and \r stripped
    assert [r["line"] for r in good] == [1, 2] and {r["split"] for r in good} == {"rl"}
    good, _ = read_source(BAD / "trl.jsonl", "sft", 1024)
    assert [(r["prompt"], r["response"], r["answer"]) for r in good] == [
        ("compute 6+1", "6+1=7;A:7", "7"), ("compute 6+2", "6+2=8;A:8", "8"),
        ("compute 6+3", "A:9", "9"), ("compute 6+4", None, None)]
    good, _ = read_source(BAD / "chat_good.jsonl", "sft", 1024)
    assert [(r["prompt"], r["response"], r["line"]) for r in good] == [
        ("compute 5+1", "5+1=6;A:6", 1), ("compute 5+2", "5+2=7;A:7", 2), ("compute 5+3", None, 3)]
    good, _ = read_source(BAD / "wrong_types.jsonl", "sft", 1024)
    assert [(r["line"], r["answer"]) for r in good] == [(6, "5"), (7, "6")]
    good, rejected = read_source(BAD / "oversized.jsonl", "sft", 2000)  # the cap is max_chars
    assert len(good) == 4 and not rejected


@pytest.mark.parametrize("name", sorted(FILE_LEVEL))
def test_unreadable_files(name):
    with pytest.raises(DataFileError) as info:
        read_source(BAD / name, "sft", 1024)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith(f"{BAD / name}: {FILE_LEVEL[name]}")


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
    assert [(r["prompt"], r["answer"], r["split"]) for r in good] == [("compute 3+3", "6", "eval")]
    assert [(r["line"], r["reason"][:27]) for r in rejected] == [(2, "messages roles out of order")]
    good, rejected = read_source(tmp_path / "dd", "rl", 1024)  # no such split: the first one
    assert len(good) == 2 and [r["line"] for r in rejected] == [2]
    Dataset.from_list(rows[:1]).save_to_disk(tmp_path / "single")
    assert len(read_source(tmp_path / "single", "sft", 1024)[0]) == 1
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(DataFileError, match="not a dataset saved with save_to_disk"):
        read_source(tmp_path / "not_a_dataset", "sft", 1024)


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
           dict(rows[3], answer="twelve", line=105), dict(rows[0], prompt="x" * 70, line=106)]
    clean, rejected, summary = validate_with_gx(rows + bad, max_chars=60)
    assert len(clean) == n_clean
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert reasons == {
        101: "gx: expect_column_values_to_be_in_set(split)",
        102: "gx: expect_column_value_lengths_to_be_between(prompt)",  # empty
        103: "gx: expect_column_values_to_not_be_null(response)",
        104: "gx: expect_column_values_to_not_be_null(answer)",
        105: "gx: expect_column_values_to_match_regex(answer)",
        106: "gx: expect_column_value_lengths_to_be_between(prompt); gx: expect_column_values_to_be_between(chars)",
    }
    assert summary["success"] is False and summary["unexpected_rows"] == 6
    assert summary["evaluated_expectations"] == 8 and summary["rows"] == n_clean + 6
    assert summary["per_expectation"]["expect_column_values_to_be_in_set(split)"]["unexpected_count"] == 1
    json.dumps(summary)  # JSON-serialisable (no numpy ints)
    unlabelled = [dict(r, answer=None) for r in rows if r["split"] in ("real", "sft")]  # answers optional there
    clean, rejected, summary = validate_with_gx(rows + unlabelled, max_chars=60)
    assert len(unlabelled) == 4 and len(clean) == n_clean + 4 and not rejected and summary["success"] is True


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
    assert list(real.columns) == ["id", "prompt", "response", "answer", "source", "line"]
    assert real["answer"].isna().all()
    answers = pd.read_parquet(tmp_path / "real_answers.parquet")
    assert list(answers.columns) == ["id", "answer"] and list(answers["id"]) == list(real["id"])
    assert answers["answer"].notna().all()


def test_curate_end_to_end(tmp_path):
    cfg = CurateConfig(generator=GeneratorConfig(**SMALL), max_chars=1024, sources=[
        SourceConfig(path="truncated.jsonl", split="sft"), SourceConfig(path="csv.jsonl", split="sft"),
        SourceConfig(path="duplicates.jsonl", split="rl")])
    out = tmp_path / "curated"
    result = curate(cfg, out, root=BAD)
    assert result["unreadable"] == [{"path": "csv.jsonl", "problem": result["unreadable"][0]["problem"]}]
    counts = result["counts"]
    # sft: 50 generated + 2 good lines; rl: 20 + 3 unique lines of duplicates.jsonl; corpus: task default
    assert counts == {"sft": 52, "rl": 23, "logged": 10, "eval": 10, "ood": 10, "real": 10, "corpus": 40000,
                      "quarantined": 4}
    sft = pd.read_parquet(out / "sft.parquet")
    assert len(sft) == 52 and sft["prompt"].notna().all() and sft["response"].notna().all()
    extra = sft[sft["source"] == "truncated.jsonl"]
    assert list(extra["line"]) == [1, 3] and list(extra["answer"]) == ["2", "6"]
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
    with pytest.raises(DataFileError, match="no valid rows"):
        curate(cfg, tmp_path / "out", root=BAD)


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
