"""Writes the bad-data corpus next to this file (bytes exact). Run once: python tests/data/bad/make_corpus.py

What each file holds, line by line, is asserted in tests/unit/test_curate.py. Prompts are phrased
"compute a+b" so that they never collide with the built-in generator's "a+b=?" prompts.
"""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent


def good(a: int, b: int) -> bytes:
    return (f'{{"prompt": "compute {a}+{b}", "response": "{a}+{b}={a + b};A:{a + b}", '
            f'"answer": "{a + b}"}}').encode()


def chat(*turns: tuple[str, str]) -> bytes:
    msgs = ", ".join(f'{{"role": "{role}", "content": "{content}"}}' for role, content in turns)
    return f'{{"messages": [{msgs}]}}'.encode()


FILES: dict[str, bytes] = {
    # line 2 is cut off mid-object
    "truncated.jsonl": b"\n".join([good(1, 1), b'{"prompt": "compute 2+2", "response": "2+2=4;A:4', good(3, 3)]) + b"\n",
    # line 2 has a Latin-1 byte (0xe9) that is not valid UTF-8
    "invalid_utf8.jsonl": b"\n".join([good(1, 2), b'{"prompt": "caf\xe9 compute 2+3", "response": "A:5"}',
                                      good(3, 4)]) + b"\n",
    # UTF-8 BOM at the start, CRLF line ends: both rows are good
    "bom.jsonl": b"\xef\xbb\xbf" + good(4, 4) + b"\r\n" + good(5, 5) + b"\r\n",
    "empty.jsonl": b"",
    "missing_fields.jsonl": b"\n".join([
        good(1, 3),                                        # 1 good
        b'{"response": "A:2", "answer": "2"}',             # 2 no prompt
        b'{"prompt": null, "response": "A:3"}',            # 3 null prompt
        b'{"prompt": "", "response": "A:4"}',              # 4 empty prompt
        b'{"prompt": "compute 5+0", "response": ""}',      # 5 empty response
        b'{"prompt": "compute 6+0"}',                      # 6 good (prompt only)
        b'{"prompt": "   "}',                              # 7 blank prompt
    ]) + b"\n",
    "wrong_types.jsonl": b"\n".join([
        b'{"prompt": 42, "response": "A:42"}',             # 1 number
        b'{"prompt": {"text": "compute 1+1"}}',            # 2 object
        b'{"prompt": "compute 1+2", "response": 3}',       # 3 response is a number
        b'{"prompt": "compute 1+3", "answer": [4]}',       # 4 answer is a list
        b'{"prompt": true}',                               # 5 boolean
        b'{"prompt": "compute 1+4", "answer": 5}',         # 6 good: integer answer -> "5"
        b'{"prompt": "compute 1+5", "answer": "6"}',       # 7 good
    ]) + b"\n",
    # line 2 holds a raw NUL byte (not the \u0000 escape)
    "nul.jsonl": b"\n".join([good(2, 1), b'{"prompt": "compute\x00 2+2"}', good(2, 3)]) + b"\n",
    "oversized.jsonl": b"\n".join([
        good(3, 1),                                                        # 1 good
        b'{"prompt": "' + b"9" * 1500 + b'"}',                            # 2 prompt alone 1500 chars
        b'{"prompt": "' + b"8" * 1000 + b'", "response": "' + b"7" * 30 + b'"}',  # 3 1030 chars together
        b'{"prompt": "' + b"6" * 1000 + b'", "response": "' + b"5" * 24 + b'"}',  # 4 good: exactly 1024
    ]) + b"\n",
    "duplicates.jsonl": b"\n".join([
        good(7, 1), good(7, 1), good(7, 2), good(7, 1),                   # 2 and 4 repeat 1
        b'{"prompt": "compute 7+1", "response": "A:8"}',                  # 5 same prompt, other response: kept
    ]) + b"\n",
    "non_objects.jsonl": b"\n".join([
        good(8, 1), b"[1, 2]", b'"just a string"', b"42", b"null",
        b'{"prompt": NaN}', b'{"prompt": "compute 8+2", "prompt": "compute 8+3"}', good(8, 4),
        b'{"prompt": "compute 8+5 \\ud800"}',  # 9: a lone surrogate escape is no character
    ]) + b"\n",
    # a JSON array pretty-printed over lines, not JSON Lines
    "array.json": b'[\n  {"prompt": "compute 1+1"},\n  {"prompt": "compute 2+2"}\n]\n',
    "csv.jsonl": b"prompt,response,answer\ncompute 1+1,A:2,2\ncompute 2+2,A:4,4\n",
    "not_parquet.parquet": b"this is plain text, not Parquet\n",
    "chat_bad_roles.jsonl": b"\n".join([
        chat(("system", "be brief"), ("user", "compute 9+1"), ("assistant", "9+1=10;A:10")),  # 1 good
        chat(("user", "compute 9+2"), ("bot", "A:11")),                                     # 2 unknown role
        chat(("assistant", "A:12"), ("user", "compute 9+3")),                               # 3 out of order
        chat(("user", "compute 9+4"), ("assistant", "A:13"), ("user", "and 1?"), ("assistant", "A:14")),  # 4
        b'{"messages": [{"role": "user"}]}',                                               # 5 no content
        chat(("user", "compute 9+5"), ("assistant", "9+5=14;A:14")),                        # 6 good
    ]) + b"\n",
    "trl.jsonl": b"\n".join([
        b'{"prompt": "compute 6+1", "completion": "6+1=7;A:7"}',
        b'{"prompt": [{"role": "user", "content": "compute 6+2"}], '
        b'"completion": [{"role": "assistant", "content": "6+2=8;A:8"}]}',
        b'{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "compute 6+3"}], '
        b'"completion": [{"role": "assistant", "content": "A:9"}]}',
        b'{"prompt": "compute 6+4"}',
        b'{"prompt": "compute 6+5", "completion": [{"role": "user", "content": "A:11"}]}',  # 5 bad completion
    ]) + b"\n",
    "chat_good.jsonl": b"\n".join([
        chat(("user", "compute 5+1"), ("assistant", "5+1=6;A:6")),
        chat(("system", "answer with A:n"), ("user", "compute 5+2"), ("assistant", "5+2=7;A:7")),
        chat(("user", "compute 5+3")),
    ]) + b"\n",
}


def main() -> None:
    for name, data in FILES.items():
        (HERE / name).write_bytes(data)
    # Parquet with no usable column: neither prompt nor messages
    pq.write_table(pa.table({"text": ["compute 1+1"], "label": [2]}), HERE / "wrong_schema.parquet")


if __name__ == "__main__":
    main()
