"""Data curation core: read raw sources, normalise, deduplicate, validate with Great Expectations, write splits.

A normalised row: prompt (user message), response (assistant demonstration or None), answer (checkable
final answer or None), split, source (file path or "generator"), line (1-based line/row number in the
file; index within the split for the generator) and id (a hash of split, prompt and response, stable
across runs and file moves). A rejected row: {source, line, reason, raw}; line 0 means the whole file.
No orchestration here: the Prefect flow calls these functions as tasks.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.config import CurateConfig, GeneratorConfig
from alignflow.data import task

SPLITS = ("sft", "rl", "logged", "eval", "ood", "real", "corpus")
TRAIN_SPLITS = ("sft", "rl", "corpus")
HELD_OUT_SPLITS = ("eval", "ood", "real", "logged")
NEEDS_ANSWER = ("rl", "logged", "eval", "ood")  # rewards and accuracy need a checkable answer; `real` is unlabelled
RAW_CHARS = 500
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
# A chat is one exchange: the row schema has one prompt and one response (system text is not kept).
CHAT_SHAPES = {("user",), ("system", "user"), ("user", "assistant"), ("system", "user", "assistant")}
OUT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
                        ("answer", pa.string()), ("source", pa.string()), ("line", pa.int64())])
ANSWERS_SCHEMA = pa.schema([OUT_SCHEMA.field("id"), OUT_SCHEMA.field("answer")])


class DataFileError(ValueError):
    """A file that cannot be read at all; str() is one line naming the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


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


def _from_messages(messages: object, field: str) -> tuple[object, object]:
    """(user content, assistant content or None) from a chat list shaped [system] user [assistant]."""
    if not isinstance(messages, list) or not messages:
        raise _BadRow(f"{field} must be a non-empty list of messages")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise _BadRow(f"{field}: every message needs a role and a content")
    roles = tuple(m["role"] for m in messages)
    unknown = [r for r in roles if r not in ("system", "user", "assistant")]
    if unknown:
        raise _BadRow(f"unknown role {unknown[0]!r} in {field}")
    if roles not in CHAT_SHAPES:
        raise _BadRow(f"{field} roles out of order: {'>'.join(roles)} (expected [system] user [assistant])")
    content = {m["role"]: m["content"] for m in messages}
    return content["user"], content.get("assistant")


def _answer(value: object, response: str | None) -> str | None:
    """The checkable answer as a string; taken from an `A:<n>` response ending when not given."""
    if value is None:
        return task.extract_answer(response) if response else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    # Arrow reads a column mixing ints and floats as float64, so 132 may arrive as 132.0.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return _text(value, "answer", required=False).strip()


def _normalise(record: dict, max_chars: int) -> tuple[str, str | None, str | None]:
    """(prompt, response, answer) from prompt/response/answer, TRL prompt/completion, or chat messages."""
    if record.get("messages") is not None:
        prompt, response = _from_messages(record["messages"], "messages")
    else:
        prompt = record.get("prompt")
        if isinstance(prompt, list):  # TRL conversational prompt: no assistant turn allowed
            prompt, extra = _from_messages(prompt, "prompt")
            if extra is not None:
                raise _BadRow("prompt messages contain an assistant turn")
        response = record.get("response")
        if response is None:
            response = record.get("completion")
            if isinstance(response, list):
                if len(response) != 1 or not isinstance(response[0], dict) or response[0].get("role") != "assistant":
                    raise _BadRow("completion must be a single assistant message")
                response = response[0].get("content")
    prompt = _text(prompt, "prompt", required=True)
    response = _text(response, "response", required=False)
    answer = _answer(record.get("answer"), response)
    n_chars = len(prompt) + len(response or "")
    if n_chars > max_chars:
        raise _BadRow(f"too long: {n_chars} chars > max_chars {max_chars}")
    return prompt, response, answer


def _row(prompt: str, response: str | None, answer: str | None, source: str, line: int, split: str) -> dict:
    """A normalised row with its content id."""
    key = json.dumps([split, prompt, response], ensure_ascii=False).encode("utf-8")
    return {"id": hashlib.sha1(key).hexdigest()[:16], "prompt": prompt, "response": response, "answer": answer,
            "source": source, "line": line, "split": split}


def _rejected(source: str, line: int, reason: str, raw: object) -> dict:
    """A quarantine entry; raw is kept as text, cut to RAW_CHARS."""
    if not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False, default=str)
    return {"source": source, "line": int(line), "reason": reason, "raw": raw[:RAW_CHARS]}


def _reject_row(row: dict, reason: str) -> dict:
    return _rejected(row["source"], row["line"], reason,
                     {k: row.get(k) for k in ("split", "prompt", "response", "answer")})


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
    """Records of a JSON/Parquet file via `datasets`, its Arrow cache in a throwaway dir (not ~/.cache)."""
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
    """json constant hook: NaN/Infinity are not JSON, and Arrow would refuse the whole file for one."""
    raise ValueError(f"{name} is not JSON")


def _line_problem(raw: bytes) -> str | None:
    """Why one JSONL line (bytes, no line end) is not a JSON object, or None if it is."""
    if (nul := raw.find(b"\x00")) >= 0:
        return f"NUL byte at byte {nul}"
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        if b"\\u" in raw:  # "\ud800" parses in Python but is no character; Arrow refuses the whole file
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError as err:
        return f"invalid UTF-8 at byte {err.start}"
    except UnicodeEncodeError:
        return "invalid JSON: lone surrogate escape"
    except json.JSONDecodeError as err:
        return f"invalid JSON: {err.msg} (column {err.colno})"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError as err:
        return f"invalid JSON: {err}"
    return None if isinstance(obj, dict) else f"not a JSON object ({JSON_TYPES.get(type(obj), 'null')})"


def _read_jsonl(path: Path) -> tuple[list[dict], list[int], list[str], list[dict]]:
    """Scan bytes line by line for bad lines, then load the good ones through `datasets`."""
    good_lines, texts, rejected = [], [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM written by some editors; not part of the data
            if not raw.strip():
                continue  # blank lines carry no row
            reason = _line_problem(raw)
            if reason:
                rejected.append(_rejected(str(path), n, reason, raw.decode("utf-8", errors="replace")))
            else:
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
    with tempfile.TemporaryDirectory() as tmp:
        good_file = Path(tmp) / "good.jsonl"  # only the good lines, in order: row i is good_lines[i]
        good_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
        records = _load_builder("json", good_file, path)
    if len(records) != len(good_lines):  # never guess which line a row came from
        raise DataFileError(path, f"datasets read {len(records)} rows from {len(good_lines)} good lines")
    return records, good_lines, texts, rejected


def _read_table(path: Path, split: str) -> list[dict]:
    """Records of a Parquet file or a save_to_disk directory (DatasetDict: `split`, else its first split)."""
    if path.is_dir():
        try:
            ds = _datasets().load_from_disk(str(path))
        except Exception as err:
            raise DataFileError(path, f"not a dataset saved with save_to_disk ({err})") from None
        if isinstance(ds, _datasets().DatasetDict):
            if not ds:
                raise DataFileError(path, "dataset has no splits")
            ds = ds[split] if split in ds else ds[next(iter(ds))]
        columns = ds.column_names
    else:
        try:  # the footer alone: cheap, and a clean message for a file that is not Parquet
            meta = pq.read_metadata(path)
        except Exception as err:
            raise DataFileError(path, f"not a readable Parquet file ({err})") from None
        if meta.num_rows == 0:  # datasets fails on it with an unhelpful message
            raise DataFileError(path, "no rows")
        columns = meta.schema.to_arrow_schema().names
    if "prompt" not in columns and "messages" not in columns:
        raise DataFileError(path, f"no 'prompt' or 'messages' column (columns: {', '.join(columns) or 'none'})")
    return ds.to_list() if path.is_dir() else _load_builder("parquet", path, path)


def read_source(path: str | Path, split: str, max_chars: int) -> tuple[list[dict], list[dict]]:
    """Read a JSONL/Parquet file or save_to_disk directory into (normalised rows, rejected rows)."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "no such file or directory")
    try:
        if path.is_dir() or path.suffix.lower() in (".parquet", ".pq"):
            records, rejected = _read_table(path, split), []
            lines, raws = list(range(1, len(records) + 1)), list(records)  # 1-based row numbers
        elif path.suffix.lower() in (".jsonl", ".json"):
            records, lines, raws, rejected = _read_jsonl(path)
        else:
            raise DataFileError(path, f"unsupported file type {path.suffix!r} (expected .jsonl, .json, "
                                      ".parquet or a save_to_disk directory)")
    except OSError as err:  # permissions, a vanished file, a full /tmp: the file, not a row, is the problem
        raise DataFileError(path, f"cannot read it ({err.strerror or err})") from None
    if not records:
        raise DataFileError(path, "no rows")
    if not any(r.get("prompt") is not None or r.get("messages") is not None for r in records):
        raise DataFileError(path, "no row has a 'prompt' or 'messages' field")
    good = []
    for record, line, raw in zip(records, lines, raws, strict=True):
        try:
            good.append(_row(*_normalise(record, max_chars), str(path), line, split))
        except _BadRow as err:
            rejected.append(_rejected(str(path), line, str(err), raw))
    rejected.sort(key=lambda r: r["line"])
    return good, rejected


def generated_rows(gen: GeneratorConfig) -> list[dict]:
    """Rows of the built-in task generator, every split including the pre-training corpus."""
    splits = task.generate(**gen.model_dump())
    return [_row(r["prompt"], r["response"], r["answer"], "generator", i, split)
            for split, split_rows in splits.items() for i, r in enumerate(split_rows)]


# ---------------------------------------------------------------- dedupe and validation
def deduplicate(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop exact repeats of (split, prompt, response) and training rows whose prompt is held out."""
    first_seen: dict[tuple, str] = {}
    unique, rejected = [], []
    for row in rows:
        key = (row["split"], row["prompt"], row["response"])
        # The generated pre-training corpus samples sums with replacement on purpose: repeats are its
        # frequencies, not copies (and user sources cannot target it).
        if key in first_seen and row["split"] != "corpus":
            rejected.append(_reject_row(row, f"duplicate of {first_seen[key]}"))
        else:
            first_seen[key] = f"{row['source']}:{row['line']}"
            unique.append(row)
    held_out: dict[str, dict] = {}
    for row in unique:
        if row["split"] in HELD_OUT_SPLITS:
            held_out.setdefault(row["prompt"], row)
    kept = []
    for row in unique:
        other = held_out.get(row["prompt"]) if row["split"] in TRAIN_SPLITS else None
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
    return [
        E.ExpectColumnValuesToNotBeNull(column="prompt"),
        E.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1, max_value=max_chars),
        E.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1),  # nulls are skipped
        E.ExpectColumnValuesToBeBetween(column="chars", min_value=1, max_value=max_chars),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        E.ExpectColumnValuesToNotBeNull(column="response", row_condition=split == "sft"),
        E.ExpectColumnValuesToNotBeNull(column="answer", row_condition=split.is_in(NEEDS_ANSWER)),
        E.ExpectColumnValuesToMatchRegex(column="answer", regex=r"^-?\d+$"),
    ]


def validate_with_gx(rows: list[dict], max_chars: int) -> tuple[list[dict], list[dict], dict]:
    """Run a GX suite on the rows: (clean rows, rejected rows, JSON-serialisable summary)."""
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
                       for c in ("prompt", "response", "answer", "split")})
    df["chars"] = [sum(len(r[c]) for c in ("prompt", "response") if isinstance(r.get(c), str)) for r in rows]
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
def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8", errors="backslashreplace"))


def _write_parquet(path: Path, records: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in records], schema=schema)
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_outputs(rows: list[dict], rejected: list[dict], summary: dict, out_dir: Path) -> dict[str, int]:
    """Write <split>.parquet per split, real_answers.parquet, quarantine.jsonl and validation.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(row)
    for split, split_rows in by_split.items():
        if split == "real":  # unlabelled split: answers live apart, only for measuring true values
            _write_parquet(out_dir / "real_answers.parquet", split_rows, ANSWERS_SCHEMA)
            split_rows = [{**r, "answer": None} for r in split_rows]
        _write_parquet(out_dir / f"{split}.parquet", split_rows, OUT_SCHEMA)
    # A split gone since the last run must not leave a stale file behind for the next stage to read.
    stale = [s for s in SPLITS if s not in by_split] + ([] if "real" in by_split else ["real_answers"])
    for name in stale:
        (out_dir / f"{name}.parquet").unlink(missing_ok=True)
    _write_jsonl(out_dir / "quarantine.jsonl", rejected)
    _atomic_write(out_dir / "validation.json",
                  lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"))
    return {**{s: len(r) for s, r in by_split.items()}, "quarantined": len(rejected)}


# ---------------------------------------------------------------- the stage and the CLI check
def _read_sources(sources: list[tuple[Path, str, str]], max_chars: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Read (path, split, name) sources into rows, rejected rows and unreadable files [{path, problem}]."""
    rows, rejected, unreadable = [], [], []
    for path, split, name in sources:
        try:
            good, bad = read_source(path, split, max_chars)
        except DataFileError as err:  # one bad file must not sink the rest: report it and go on
            unreadable.append({"path": name, "problem": err.problem})
            rejected.append(_rejected(name, 0, err.problem, ""))
            continue
        # Provenance as the user wrote it, not this machine's absolute path (ids are content hashes).
        rows += [{**r, "source": name} for r in good]
        rejected += [{**r, "source": name} for r in bad]
    return rows, rejected, unreadable


def curate(cfg: CurateConfig, out_dir: Path, root: Path) -> dict:
    """Generator + sources -> dedupe -> GX -> Parquet: {"counts": {...}, "unreadable": [{path, problem}]}."""
    rows, rejected, unreadable = _read_sources(
        [(Path(root) / s.path, s.split, s.path) for s in cfg.sources], cfg.max_chars)
    rows = (generated_rows(cfg.generator) if cfg.generator else []) + rows  # generator first: it wins dedupe
    rows, dupes = deduplicate(rows)
    clean, failed, summary = validate_with_gx(rows, cfg.max_chars)
    rejected += dupes + failed
    if not clean:
        names = ", ".join(s.path for s in cfg.sources) or "generator"
        raise DataFileError(names, f"no valid rows: {len(rejected)} quarantined, {len(unreadable)} unreadable files")
    return {"counts": write_outputs(clean, rejected, summary, out_dir), "unreadable": unreadable}


def validate_data(paths: list[str], quarantine_path: Path, max_chars: int = 1024, split: str = "sft") -> int:
    """Check data files as `curate` would; print per-file counts, write the quarantine; exit code 0/1."""
    from rich.console import Console
    from rich.table import Table
    console = Console(soft_wrap=True, highlight=False)  # soft_wrap: an error stays on one line
    rows, rejected, unreadable = _read_sources([(Path(p), split, str(p)) for p in paths], max_chars)
    for bad_file in unreadable:
        console.print(f"{bad_file['path']}: {bad_file['problem']}", markup=False)
    rows, dupes = deduplicate(rows)
    clean, failed, _ = validate_with_gx(rows, max_chars) if rows else ([], [], {})
    rejected += dupes + failed
    _write_jsonl(Path(quarantine_path), rejected)
    good_per, bad_per = Counter(r["source"] for r in clean), Counter(r["source"] for r in rejected)
    unreadable_paths = {u["path"] for u in unreadable}
    table = Table("file", "good", "quarantined", title="validate-data")
    for path in map(str, paths):
        table.add_row(path, "-" if path in unreadable_paths else str(good_per[path]), str(bad_per[path]))
    console.print(table)
    if clean:
        return 0
    reason = ("no readable file" if len(unreadable) == len(paths)
              else f"all {len(rejected) - len(unreadable)} rows quarantined (see {quarantine_path})")
    console.print(f"no valid rows: {reason}", markup=False)
    return 1
