"""Data curation core: read raw sources, normalise, deduplicate, validate with Great Expectations, write splits.

A normalised row (in memory): id, prompt (content of the last user message), messages (the chat up to the
point of generation as [{"role", "content"}]: optional system message, earlier user/assistant turns, the last
user turn), response (the final assistant message, the demonstration, or None), answer (a display string of
the row's `answer` field or None), columns (every other field of the row, `answer` included, in its original
JSON type; passed to reward functions as keyword arguments), split, source (file path or "generator"), line
(1-based line number in a JSON Lines file, row number in a table; index within the split for the generator)
and id (a hash of split, prompt and response -- or of split, messages and response for a chat with more than
one user turn or a system message of its own -- stable across runs and file moves).
A rejected row: {source, line, reason, raw}; line 0 means the whole file.

The curated Parquet files (one per split) hold id, prompt, messages (JSON text), response, answer,
columns (JSON text), source and line; `decode_rows` turns them back into prompts, chats and reward columns.
No orchestration here: the Prefect flow calls these functions as tasks.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.config import CurateConfig, GeneratorConfig
from alignflow.data import task
from alignflow.layout import atomic_path

SPLITS = ("sft", "rl", "logged", "eval", "ood", "real", "corpus")
TRAIN_SPLITS = ("sft", "rl", "corpus")
HELD_OUT_SPLITS = ("eval", "ood", "real", "logged")
NEEDS_ANSWER = ("rl", "logged", "eval", "ood")  # the generator's rows: its reward checks the answer
OPTIONAL_SPLITS = ("ood", "real")
RAW_CHARS = 500
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
ROLES = ("system", "user", "assistant")
CHAT_SHAPE = "[system] (user assistant)* user [assistant]"
OWN_FIELDS = ("prompt", "response", "messages", "completion")  # consumed by normalising; the rest -> columns
TABLE_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json")
OUT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", pa.string()),
                        ("response", pa.string()), ("answer", pa.string()), ("columns", pa.string()),
                        ("source", pa.string()), ("line", pa.int64())])
ANSWERS_SCHEMA = pa.schema([OUT_SCHEMA.field("id"), OUT_SCHEMA.field("answer"), OUT_SCHEMA.field("columns")])


class DataFileError(ValueError):
    """A file that cannot be read at all; str() is one line naming the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


class EmptySplitError(DataFileError):
    """A required split with no valid row; str() names the split, the files that fed it and why."""

    def __init__(self, files: list[str], problem: str):
        self.path, self.problem = ", ".join(files), " ".join(problem.split())
        ValueError.__init__(self, self.problem)


class _BadRow(ValueError):
    """A row-level problem; the message is the quarantine reason."""


# ---------------------------------------------------------------- normalising one record
def _text(value: object, field: str, required: bool) -> str | None:
    """Check a text field: None only if optional, else a non-blank str."""
    if value is None:
        if required:
            raise _BadRow(f"missing or null {field}")
        return None
    if not isinstance(value, str):
        raise _BadRow(f"{field} has wrong type ({type(value).__name__})")
    if not value.strip():
        raise _BadRow(f"empty {field}")
    return value


def _chat_shape_ok(roles: list[str]) -> bool:
    """[system] (user assistant)* user [assistant]: after an optional system message, turns alternate from user."""
    body = roles[1:] if roles[:1] == ["system"] else roles
    return bool(body) and all(role == ("user", "assistant")[i % 2] for i, role in enumerate(body))


def _chat(messages: object, field: str) -> list[dict]:
    """A validated chat [{"role", "content"}] (other keys of a message dropped)."""
    if not isinstance(messages, list) or not messages:
        raise _BadRow(f"{field} must be a non-empty list of messages")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise _BadRow(f"{field}: every message needs a role and a content")
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise _BadRow(f"unknown role {unknown[0]!r} in {field}")
    if not _chat_shape_ok(roles):
        raise _BadRow(f"{field} roles out of order: {'>'.join(roles)} (expected {CHAT_SHAPE})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _roles(chat: list[dict]) -> str:
    return ">".join(m["role"] for m in chat)


def _completion(value: object) -> object:
    """TRL's completion: a string, or a conversational list of exactly one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise _BadRow("completion must be a single assistant message")
        return value[0].get("content")
    return value


def _answer(value: object) -> str | None:
    """A display string of an answer of any JSON type (the original value stays in `columns`)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _text(value, "answer", required=False).strip()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # Arrow reads a column mixing ints and floats as float64: 132 arrives as 132.0
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _chars(messages: list[dict], response: str | None) -> int:
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)) + len(response or "")


def _normalise(record: dict, max_chars: int, split: str) -> tuple[str, list[dict], str | None, str | None, dict]:
    """(prompt, messages, response, answer, columns) from prompt/response, TRL prompt/completion or chat messages."""
    response = record.get("response")
    if response is None:
        response = _completion(record.get("completion"))
    from_chat = record.get("messages") is not None or isinstance(record.get("prompt"), list)
    if record.get("messages") is not None:
        chat = _chat(record["messages"], "messages")
        if chat[-1]["role"] == "assistant":  # the final assistant turn is the demonstration
            if response is not None:
                raise _BadRow("messages end with an assistant turn and a response/completion is given too")
            response = _text(chat.pop()["content"], "response", required=True)
    elif isinstance(record.get("prompt"), list):  # TRL conversational prompt: ends with the user turn
        chat = _chat(record["prompt"], "prompt")
        if chat[-1]["role"] == "assistant":
            raise _BadRow(f"prompt messages end with an assistant turn (roles: {_roles(chat)})")
    else:
        chat = [{"role": "user", "content": _text(record.get("prompt"), "prompt", required=True)}]
    prompt = _text(chat[-1]["content"], "prompt", required=True)
    for i, message in enumerate(chat[:-1], 1):
        _text(message["content"], f"message {i} ({message['role']}) content", required=True)
    response = _text(response, "response", required=False)
    if split == "sft" and response is None:
        raise _BadRow(f"sft row: the chat must end with an assistant turn (roles: {_roles(chat)})" if from_chat
                      else "sft row without a response")
    answer = _answer(record.get("answer"))
    columns = {k: v for k, v in record.items() if k not in OWN_FIELDS and v is not None}
    n_chars = _chars(chat, response)
    if n_chars > max_chars:
        raise _BadRow(f"too long: {n_chars} chars > max_chars {max_chars}")
    return prompt, chat, response, answer, columns


def _single_turn(prompt: str, messages: list[dict]) -> bool:
    return messages == [{"role": "user", "content": prompt}]


def _row_id(split: str, prompt: str, messages: list[dict], response: str | None) -> str:
    """Content id: split, prompt and response (the generator's ids since the start); a chat with context
    (a system message of its own, earlier turns) hashes its messages instead of the prompt."""
    content = prompt if _single_turn(prompt, messages) else messages
    key = json.dumps([split, content, response], ensure_ascii=False).encode("utf-8")
    return hashlib.sha1(key).hexdigest()[:16]


def _row(prompt: str, messages: list[dict], response: str | None, answer: str | None, columns: dict,
         source: str, line: int, split: str) -> dict:
    """A normalised row with its content id."""
    return {"id": _row_id(split, prompt, messages, response), "prompt": prompt, "messages": messages,
            "response": response, "answer": answer, "columns": columns, "source": source, "line": line,
            "split": split}


def _rejected(source: str, line: int, reason: str, raw: object) -> dict:
    """A quarantine entry; raw is kept as text, cut to RAW_CHARS."""
    if not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False, default=str)
    return {"source": source, "line": int(line), "reason": reason, "raw": raw[:RAW_CHARS]}


def _reject_row(row: dict, reason: str) -> dict:
    return _rejected(row["source"], row["line"], reason,
                     {k: row.get(k) for k in ("split", "messages", "response", "answer", "columns")})


# ---------------------------------------------------------------- reading files
def _datasets():
    """Import `datasets` quietly and offline: sources here are always local files."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _load_builder(builder: str, data_file: Path, path: Path) -> list[dict]:
    """Records of a Parquet file via `datasets`, its Arrow cache in a throwaway dir (not ~/.cache)."""
    with tempfile.TemporaryDirectory() as cache:
        try:
            ds = _datasets().load_dataset(builder, data_files=str(data_file), split="train", cache_dir=cache)
            return ds.to_list()
        except Exception as err:  # reported, not swallowed: one line naming the file and the root cause
            while err.__cause__ is not None:
                err = err.__cause__
            raise DataFileError(path, f"datasets could not load it ({type(err).__name__}: {err})"[:300]) from None


def _unique_keys(pairs: list) -> dict:
    """json object hook: of two values for one key, which was meant is unknowable (Arrow refuses them too)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str):
    """json constant hook: NaN/Infinity are not JSON (and no curated file could carry them)."""
    raise ValueError(f"{name} is not JSON")


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(the JSON object of one JSONL line (bytes, no line end), None) or (None, why it is not one)."""
    if (nul := raw.find(b"\x00")) >= 0:
        return None, f"NUL byte at byte {nul}"
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        if b"\\u" in raw:  # "\ud800" parses in Python but is no character; no UTF-8 file can hold it
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}"
    except UnicodeEncodeError:
        return None, "invalid JSON: lone surrogate escape"
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err.msg} (column {err.colno})"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as err:
        return None, f"invalid JSON: {err}"
    if not isinstance(obj, dict):
        return None, f"not a JSON object ({JSON_TYPES.get(type(obj), 'null')})"
    return obj, None


def _read_jsonl(path: Path) -> tuple[list[dict], list[int], list[str], list[dict]]:
    """Parse line by line: each value keeps its JSON type, whatever the other lines hold (an answer may be a
    string on one line and a list on the next, which a columnar reader refuses for the whole file)."""
    records, good_lines, texts, rejected = [], [], [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM written by some editors; not part of the data
            if not raw.strip():
                continue  # blank lines carry no row
            obj, reason = _parse_line(raw)
            if reason:
                rejected.append(_rejected(str(path), n, reason, raw.decode("utf-8", errors="replace")))
            else:
                records.append(obj)
                good_lines.append(n)
                texts.append(raw.decode("utf-8"))
    if not good_lines and not rejected:
        raise DataFileError(path, "empty file")
    if rejected and rejected[0]["raw"].startswith("[") and rejected[0]["reason"].startswith("invalid JSON"):
        raise DataFileError(path, "a JSON array spread over lines, not JSON Lines (one object per line)")
    if not good_lines:
        first = rejected[0]
        raise DataFileError(path, f"not JSON Lines: none of its {len(rejected)} lines is a JSON object "
                                  f"(line {first['line']}: {first['reason']})")
    return records, good_lines, texts, rejected


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    """(records, column names) of a Parquet file."""
    try:  # the footer alone: cheap, and a clean message for a file that is not Parquet
        meta = pq.read_metadata(path)
    except Exception as err:
        raise DataFileError(path, f"not a readable Parquet file ({err})") from None
    if meta.num_rows == 0:  # datasets fails on it with an unhelpful message
        raise DataFileError(path, "no rows")
    return _load_builder("parquet", path, path), meta.schema.to_arrow_schema().names


def _pick_split(path: Path, available: list[str], split: str, dataset_split: str | None, what: str) -> str:
    """`dataset_split` if given, else the split named like ours, else the only one; an error lists them."""
    if dataset_split is not None:
        if dataset_split in available:
            return dataset_split
        raise DataFileError(path, f"{what} has no split {dataset_split!r} (dataset_split); its splits: "
                                  f"{', '.join(available)}")
    if split in available:
        return split
    if len(available) == 1:
        return available[0]
    raise DataFileError(path, f"{what} has splits {', '.join(available)} and none is named {split!r}: "
                              f"set dataset_split to one of them")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _read_saved(path: Path, split: str, dataset_split: str | None) -> tuple[list[dict], list[str]]:
    """Records of a save_to_disk directory (a DatasetDict: the split `_pick_split` chooses)."""
    try:
        ds = _datasets().load_from_disk(str(path))
    except Exception as err:
        raise DataFileError(path, f"not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, _datasets().DatasetDict):
        if not ds:
            raise DataFileError(path, "dataset has no splits")
        ds = ds[_pick_split(path, list(ds), split, dataset_split, "DatasetDict")]
    if len(ds) == 0:
        raise DataFileError(path, "no rows")
    return ds.to_list(), ds.column_names


def _folder_files(path: Path, split: str, dataset_split: str | None) -> list[Path]:
    """The data files of one split of a folder, as `datasets.load_dataset(folder)` assigns them (train.jsonl,
    test.parquet, data/train-00000-of-00002.parquet, ...); each is then read here, with its own line numbers."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    held = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    holds = ", ".join(held[:10]) + (f", ... ({len(held)} files)" if len(held) > 10 else "") if held else "nothing"
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:
        files = {}
    files = {str(name): [Path(f) for f in found if Path(f).suffix.lower() in JSONL_SUFFIXES + TABLE_SUFFIXES]
             for name, found in files.items()}
    files = {name: found for name, found in files.items() if found}
    if not files:
        raise DataFileError(path, "neither a dataset saved with save_to_disk nor a folder of data files "
                                  f"(.jsonl, .json, .parquet) that datasets.load_dataset reads; it holds: {holds}")
    return sorted(files[_pick_split(path, list(files), split, dataset_split, "the folder")])


def _mapped(records: list[dict], columns: dict[str, str], names: list[str], path: Path) -> list[dict]:
    """Rename the file's columns to ours ({ours: theirs}); a mapped column the file lacks is a file error."""
    if not columns:
        return records
    missing = [f"{theirs!r} (for {ours})" for ours, theirs in columns.items() if theirs not in names]
    if missing:
        raise DataFileError(path, f"no column {', '.join(missing)}; the file's columns: {', '.join(names) or 'none'}")
    theirs = set(columns.values())
    # the file's own column named like one of our mapped fields gives way to the mapping
    return [{**{k: v for k, v in r.items() if k not in theirs and k not in columns},
             **{ours: r.get(src) for ours, src in columns.items()}} for r in records]


def _read_file(path: Path, columns: dict[str, str], split: str, dataset_split: str | None
               ) -> tuple[list[dict], list[int], list, list[dict]]:
    """(records with our field names, their line/row numbers, raw forms, rejected lines) of one file or
    save_to_disk directory."""
    if path.is_dir():
        records, names = _read_saved(path, split, dataset_split)
        lines, raws, rejected = list(range(1, len(records) + 1)), list(records), []
    elif path.suffix.lower() in TABLE_SUFFIXES:
        records, names = _read_parquet(path)
        lines, raws, rejected = list(range(1, len(records) + 1)), list(records), []  # 1-based row numbers
    elif path.suffix.lower() in JSONL_SUFFIXES:
        records, lines, raws, rejected = _read_jsonl(path)
        names = list(dict.fromkeys(k for r in records for k in r))
    else:
        raise DataFileError(path, f"unsupported file type {path.suffix!r} (expected .jsonl, .json, .parquet, "
                                  "a save_to_disk directory or a folder of such files)")
    records = _mapped(records, columns, names, path)
    ours = (set(names) - set(columns.values())) | set(columns)
    if path.suffix.lower() not in JSONL_SUFFIXES and not {"prompt", "messages"} & ours:
        raise DataFileError(path, f"no 'prompt' or 'messages' column (columns: {', '.join(names) or 'none'}); "
                                  "map one with columns: {prompt: <column>}")
    if not any(r.get("prompt") is not None or r.get("messages") is not None for r in records):
        raise DataFileError(path, f"no row has a 'prompt' or 'messages' field (fields: {', '.join(map(str, names))})")
    return records, lines, raws, rejected


def read_source(path: str | Path, split: str, max_chars: int, columns: dict[str, str] | None = None,
                dataset_split: str | None = None) -> tuple[list[dict], list[dict]]:
    """Read a JSONL/Parquet file, a save_to_disk directory or a folder of data files into (normalised rows,
    rejected rows). `columns` maps our fields to the file's columns. A folder's rows carry the data file
    they came from as their source."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "no such file or directory")
    try:
        if path.is_dir() and not _is_saved_dataset(path):
            files = _folder_files(path, split, dataset_split)
        else:
            files = [path]
        good, rejected = [], []
        for file in files:
            records, lines, raws, bad = _read_file(file, columns or {}, split, dataset_split)
            if not records:
                raise DataFileError(file, "no rows")
            rejected += bad
            for record, line, raw in zip(records, lines, raws, strict=True):
                try:
                    good.append(_row(*_normalise(record, max_chars, split), str(file), line, split))
                except _BadRow as err:
                    rejected.append(_rejected(str(file), line, str(err), raw))
    except OSError as err:  # permissions, a vanished file, a full /tmp: the file, not a row, is the problem
        raise DataFileError(path, f"cannot read it ({err.strerror or err})") from None
    rejected.sort(key=lambda r: (r["source"], r["line"]))
    return good, rejected


def generated_rows(gen: GeneratorConfig) -> list[dict]:
    """Rows of the built-in task generator, every split including the pre-training corpus. The arithmetic
    reward compares strings, so the `answer` column is the answer as a string."""
    splits = task.generate(**gen.model_dump())
    return [_row(r["prompt"], [{"role": "user", "content": r["prompt"]}], r["response"], r["answer"],
                 {"answer": r["answer"]} if r["answer"] is not None else {}, "generator", i, split)
            for split, split_rows in splits.items() for i, r in enumerate(split_rows)]


# ---------------------------------------------------------------- splits
def _context_key(row: dict) -> str:
    """What a policy is asked: the turns up to the last user message (system text aside)."""
    return json.dumps([m for m in row["messages"] if m["role"] != "system"], ensure_ascii=False)


def _unit_hash(text: str) -> float:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def hold_out_logged(rows: list[dict], share: float) -> tuple[list[dict], str]:
    """Move `share` of the rl prompts (chosen by a hash of the prompt, so deterministic and stable as rows
    are added; copies of one prompt move together) to the logged split; (rows, what was done)."""
    keys = sorted({_context_key(r) for r in rows if r["split"] == "rl"}, key=_unit_hash)
    if len(keys) < 2:
        return rows, f"no logged source, and {len(keys)} rl prompt(s): too few to hold any out"
    chosen = {k for k in keys if _unit_hash(k) < share} or {keys[0]}
    if len(chosen) == len(keys):
        chosen.discard(keys[-1])
    moved = []
    for row in rows:
        if row["split"] == "rl" and _context_key(row) in chosen:
            row = {**row, "split": "logged", "id": _row_id("logged", row["prompt"], row["messages"], row["response"])}
        moved.append(row)
    n = sum(r["split"] == "logged" for r in moved)
    return moved, f"held out {share:.0%} of rl prompts ({len(chosen)} of {len(keys)} prompts, {n} rows)"


def add_system_prompt(rows: list[dict], text: str) -> list[dict]:
    """Put `text` first in every chat without a system message (ids unchanged; the corpus is no chat)."""
    system = {"role": "system", "content": text}
    return [r if r["split"] == "corpus" or r["messages"][0]["role"] == "system"
            else {**r, "messages": [system, *r["messages"]]} for r in rows]


# ---------------------------------------------------------------- dedupe and validation
def deduplicate(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop exact repeats of (split, chat, response) and training rows whose prompt is held out."""
    first_seen: dict[str, str] = {}
    unique, rejected = [], []
    for row in rows:
        # The generated pre-training corpus samples sums with replacement on purpose: repeats are its
        # frequencies, not copies (and user sources cannot target it).
        if row["id"] in first_seen and row["split"] != "corpus":
            rejected.append(_reject_row(row, f"duplicate of {first_seen[row['id']]}"))
        else:
            first_seen[row["id"]] = f"{row['source']}:{row['line']}"
            unique.append(row)
    held_out: dict[str, dict] = {}
    for row in unique:
        if row["split"] in HELD_OUT_SPLITS:
            held_out.setdefault(_context_key(row), row)
    kept = []
    for row in unique:
        other = held_out.get(_context_key(row)) if row["split"] in TRAIN_SPLITS else None
        if other is None:
            kept.append(row)
        else:  # the held-out copy wins: training on it would inflate every evaluation that uses it
            rejected.append(_reject_row(row, f"leak: prompt also in held-out split {other['split']} "
                                             f"({other['source']}:{other['line']})"))
    return kept, rejected


def _expectations(max_chars: int) -> list:
    """The schema of a curated row as GX expectations."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column
    E, split = gx.expectations, Column("split")
    generated = Column("source") == "generator"
    return [
        E.ExpectColumnValuesToNotBeNull(column="prompt"),
        E.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1, max_value=max_chars),
        E.ExpectColumnValuesToNotBeNull(column="messages"),
        E.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1),  # nulls are skipped
        E.ExpectColumnValuesToBeBetween(column="chars", min_value=1, max_value=max_chars),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        E.ExpectColumnValuesToNotBeNull(column="response", row_condition=split == "sft"),
        # The generator's task is checked by its integer answer; a user's rewards may read any column.
        E.ExpectColumnValuesToNotBeNull(column="answer", row_condition=split.is_in(NEEDS_ANSWER) & generated),
        E.ExpectColumnValuesToMatchRegex(column="answer", regex=r"^-?\d+$", row_condition=generated),
    ]


def _empty_summary() -> dict:
    return {"success": False, "rows": 0, "evaluated_expectations": 0, "unexpected_rows": 0, "per_expectation": {}}


def validate_with_gx(rows: list[dict], max_chars: int) -> tuple[list[dict], list[dict], dict]:
    """Run a GX suite on the rows: (clean rows, rejected rows, JSON-serialisable summary)."""
    if not rows:
        return [], [], _empty_summary()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = ctx.data_sources.add_pandas("rows").add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="curated"))
    for expectation in _expectations(max_chars):
        suite.add_expectation(expectation)
    run = ctx.validation_definitions.add(gx.ValidationDefinition(name="curated", data=batch, suite=suite))
    # object dtype keeps values as given (no str coercion); `_row` is the position GX reports back
    df = pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object)
                       for c in ("prompt", "response", "answer", "split", "source")})
    df["messages"] = pd.Series([json.dumps(r["messages"], ensure_ascii=False) if r.get("messages") else None
                                for r in rows], dtype=object)
    df["chars"] = [_chars(r.get("messages") or [{"content": r.get("prompt")}], r.get("response")
                          if isinstance(r.get("response"), str) else None) for r in rows]
    df["_row"] = range(len(rows))
    result = run.run(batch_parameters={"dataframe": df},
                     result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]})
    failed: dict[int, list[str]] = {}
    per_expectation = {}
    for res in result.results:  # not in the order added: key on type + column
        name = f"{res.expectation_config.type}({res.expectation_config.kwargs['column']})"
        if res.exception_info.get("raised_exception"):  # a check that did not run must not pass
            raise RuntimeError(f"GX expectation {name} failed to run: {res.exception_info.get('exception_message')}")
        for hit in res.result.get("unexpected_index_list") or []:
            failed.setdefault(int(hit["_row"]), []).append(f"gx: {name}")
        per_expectation[name] = {"success": bool(res.success),
                                 "element_count": int(res.result.get("element_count") or 0),
                                 "unexpected_count": int(res.result.get("unexpected_count") or 0)}
    clean = [r for i, r in enumerate(rows) if i not in failed]
    rejected = [_reject_row(rows[i], "; ".join(sorted(reasons))) for i, reasons in sorted(failed.items())]
    summary = {"success": bool(result.success), "rows": len(rows),
               "evaluated_expectations": int(result.statistics["evaluated_expectations"]),
               "unexpected_rows": len(failed), "per_expectation": per_expectation}
    return clean, rejected, summary


# ---------------------------------------------------------------- outputs
def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with atomic_path(path) as tmp:
        tmp.write_text(lines, encoding="utf-8", errors="backslashreplace")


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _out_record(row: dict) -> dict:
    """A row as the curated files hold it: messages and columns as JSON text."""
    return {**row, "messages": _dumps(row["messages"]), "columns": _dumps(row.get("columns") or {})}


def _write_parquet(path: Path, records: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in records], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_outputs(rows: list[dict], rejected: list[dict], summary: dict, out_dir: Path) -> dict[str, int]:
    """Write <split>.parquet per split, real_answers.parquet, quarantine.jsonl and validation.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(_out_record(row))
    for split, split_rows in by_split.items():
        if split == "real":  # unlabelled split: answers and reward columns live apart, only for true values
            _write_parquet(out_dir / "real_answers.parquet", split_rows, ANSWERS_SCHEMA)
            split_rows = [{**r, "answer": None, "columns": "{}"} for r in split_rows]
        _write_parquet(out_dir / f"{split}.parquet", split_rows, OUT_SCHEMA)
    # A split gone since the last run must not leave a stale file behind for the next stage to read.
    stale = [s for s in SPLITS if s not in by_split] + ([] if "real" in by_split else ["real_answers"])
    for name in stale:
        (out_dir / f"{name}.parquet").unlink(missing_ok=True)
    _write_jsonl(out_dir / "quarantine.jsonl", rejected)
    with atomic_path(out_dir / "validation.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {**{s: len(r) for s, r in by_split.items()}, "quarantined": len(rejected)}


def decode_rows(df: pd.DataFrame) -> tuple[list[str], list[list[dict]], dict[str, list]]:
    """(prompts, chats, reward columns) of a curated split: the last user messages, the chats up to the point
    of generation, and {column: values aligned with the rows} over the union of the rows' columns (None where
    a row lacks one) -- TRL's keyword arguments of a reward function. Files written before chats and columns
    were curated read as single user turns with an `answer` column."""
    from alignflow.data.rows import TaskRows  # the one decoder the stages use
    rows = TaskRows.from_frame(df)
    return rows.prompts, rows.messages, rows.columns


# ---------------------------------------------------------------- the stage and the CLI check
def _read_sources(sources: list[tuple[Path, str, str, dict, str | None]], max_chars: int
                  ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Read (path, split, name, columns, dataset_split) sources into rows, rejected rows, unreadable files
    [{path, problem}] and what each source gave [{name, split, rows, problem}]."""
    rows, rejected, unreadable, fed = [], [], [], []
    for path, split, name, columns, dataset_split in sources:
        # Provenance as the user wrote it, not this machine's absolute path (ids are content hashes); a
        # folder's rows keep the data file within it.
        rename = lambda source: name + source[len(str(path)):] if source.startswith(str(path)) else source  # noqa: E731
        try:
            good, bad = read_source(path, split, max_chars, columns, dataset_split)
        except DataFileError as err:  # one bad file must not sink the rest: report it and go on
            problem = err.problem if err.path == str(path) else f"{rename(err.path)}: {err.problem}"
            unreadable.append({"path": name, "problem": problem})
            rejected.append(_rejected(name, 0, problem, ""))
            fed.append({"name": name, "split": split, "rows": 0, "problem": problem})
            continue
        rows += [{**r, "source": rename(r["source"])} for r in good]
        rejected += [{**r, "source": rename(r["source"])} for r in bad]
        fed.append({"name": name, "split": split, "rows": len(good) + len(bad), "problem": None})
    return rows, rejected, unreadable, fed


def _why_empty(split: str, fed: list[dict], rejected: list[dict], generator: bool) -> str:
    """What each file that fed a split gave, for a split with no valid row."""
    mine = [f for f in fed if f["split"] == split]
    if not mine:
        return f"no source has split {split}" + (" (and the generator gives none)" if generator else "")
    parts = []
    for f in mine:
        if f["problem"]:
            parts.append(f"{f['name']}: unreadable ({f['problem']})")
            continue
        bad = sorted((r for r in rejected if _in_source(r["source"], f["name"]) and r["line"] > 0),
                     key=lambda r: r["line"])
        first = f" (first: line {bad[0]['line']}: {bad[0]['reason']})" if bad else ""
        parts.append(f"{f['name']}: {f['rows']} rows, all quarantined{first}")
    return "; ".join(parts)


def _in_source(source: str, name: str) -> bool:
    """Whether a row's source is the file `name` or a data file within the folder `name`."""
    return source == name or source.startswith(name.rstrip("/") + "/")


def curate(cfg: CurateConfig, out_dir: Path, root: Path) -> dict:
    """Generator + sources -> (logged held out of rl) -> dedupe -> system prompt -> GX -> Parquet.

    Returns {"counts": {split: rows, "quarantined": n}, "unreadable": [{path, problem}],
    "missing_splits": {split: why it is absent} (sft skipped, ood/real optional),
    "derived_splits": {split: how it was made} (logged held out of rl)}. A required split (rl, eval, logged,
    and sft unless no source and no generator gives one) left with no valid row raises EmptySplitError,
    after the quarantine is written."""
    sources = [(Path(root) / s.path, s.split, s.path, s.columns, s.dataset_split) for s in cfg.sources]
    rows, rejected, unreadable, fed = _read_sources(sources, cfg.max_chars)
    generator = cfg.generator is not None
    rows = (generated_rows(cfg.generator) if generator else []) + rows  # generator first: it wins dedupe
    derived, missing = {}, {}
    has_logged_source = generator or any(s.split == "logged" for s in cfg.sources)
    if not has_logged_source:
        rows, derived["logged"] = hold_out_logged(rows, cfg.logged_share)
    rows, dupes = deduplicate(rows)
    if cfg.system_prompt:
        rows = add_system_prompt(rows, cfg.system_prompt)
    clean, failed, summary = validate_with_gx(rows, cfg.max_chars)
    rejected += dupes + failed
    present = {r["split"] for r in clean}
    required = ["rl", "eval", "logged"]
    if generator or any(s.split == "sft" for s in cfg.sources):
        required.insert(0, "sft")
    else:
        missing["sft"] = "no sft source: RL starts from base.path"
    empty = []
    for split in required:
        if split in present:
            continue
        if split == "logged" and not has_logged_source:
            why = derived["logged"] + (", all of them quarantined" if "held out" in derived["logged"] else "")
        else:
            why = _why_empty(split, fed, rejected, generator)
        empty.append(f"split {split!r} is empty: {why}")
    for split in OPTIONAL_SPLITS:
        if split not in present:
            mine = [f for f in fed if f["split"] == split]
            missing[split] = (f"no {split} source" if not mine
                              else "no valid rows: " + _why_empty(split, fed, rejected, generator))
    summary = {**summary, "missing_splits": missing, "derived_splits": derived}
    counts = write_outputs(clean, rejected, summary, out_dir)
    if empty:
        raise EmptySplitError([f["name"] for f in fed] or ["generator"], "; ".join(empty))
    return {"counts": counts, "unreadable": unreadable, "missing_splits": missing, "derived_splits": derived}


def validate_data(paths: list[str], quarantine_path: Path, max_chars: int = 1024, split: str = "sft",
                  columns: dict[str, str] | None = None, dataset_split: str | None = None) -> int:
    """Check data files as `curate` would (with a source's `columns` mapping and `dataset_split`); print per-file
    counts, write the quarantine; exit code 0/1."""
    from rich.console import Console
    from rich.table import Table
    console = Console(soft_wrap=True, highlight=False)  # soft_wrap: an error stays on one line
    rows, rejected, unreadable, _ = _read_sources([(Path(p), split, str(p), columns or {}, dataset_split)
                                                   for p in paths], max_chars)
    for bad_file in unreadable:
        console.print(f"{bad_file['path']}: {bad_file['problem']}", markup=False)
    rows, dupes = deduplicate(rows)
    clean, failed, _ = validate_with_gx(rows, max_chars)
    rejected += dupes + failed
    _write_jsonl(Path(quarantine_path), rejected)
    unreadable_paths = {u["path"] for u in unreadable}
    table = Table("file", "good", "quarantined", title="validate-data")
    for path in map(str, paths):
        good = sum(_in_source(r["source"], path) for r in clean)
        bad = sum(_in_source(r["source"], path) for r in rejected)
        table.add_row(path, "-" if path in unreadable_paths else str(good), str(bad))
    console.print(table)
    if clean:
        return 0
    reason = ("no readable file" if len(unreadable) == len(paths)
              else f"all {len(rejected) - len(unreadable)} rows quarantined (see {quarantine_path})")
    console.print(f"no valid rows: {reason}", markup=False)
    return 1
