"""The reward layer: loading by name, the weighted sum, failure handling, built-in verifiers (hand-written values)."""
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

from alignflow.config import RewardSpec
from alignflow.rewards import (RewardError, RewardSet, exact_match, format_regex, length_penalty, load_function,
                               math_answer)

REWARD_FILE = '''
def exact(prompts, completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def half(prompts, completions, **kwargs):
    return [0.5 for _ in completions]

NOT_A_FUNCTION = 3
'''


def spec(function, **kw):
    return RewardSpec(function=function, **kw)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading
def test_load_from_a_relative_file_an_absolute_file_and_a_module(tmp_path):
    path = write(tmp_path, "rewards/mytask.py", REWARD_FILE)
    exact = load_function("rewards/mytask.py:exact", tmp_path)
    assert exact(["p", "p"], ["7 ", "8"], answer=["7", "7"]) == [1.0, 0.0]
    assert load_function(f"{path}:half", tmp_path / "elsewhere")(["p"], ["c"]) == [0.5]
    assert load_function("alignflow.rewards:exact_match", tmp_path) is exact_match


def test_two_files_of_the_same_name_do_not_clash(tmp_path):
    write(tmp_path, "a/r.py", "def f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    write(tmp_path, "b/r.py", "def f(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    assert load_function("a/r.py:f", tmp_path)([""], [""]) == [1.0]
    assert load_function("b/r.py:f", tmp_path)([""], [""]) == [2.0]


def test_error_missing_file(tmp_path):
    with pytest.raises(RewardError) as err:
        load_function("rewards/nope.py:exact", tmp_path)
    msg = str(err.value)
    assert "'rewards/nope.py:exact'" in msg and str(tmp_path / "rewards" / "nope.py") in msg and "does not exist" in msg


def test_error_file_that_raises_at_import(tmp_path):
    path = write(tmp_path, "bad.py", "import json\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(RewardError) as err:
        load_function("bad.py:f", tmp_path)
    msg = str(err.value)
    assert "'bad.py:f'" in msg and str(path) in msg and "RuntimeError: no GPU here" in msg


def test_error_file_with_a_syntax_error(tmp_path):
    write(tmp_path, "syn.py", "def f(:\n")
    with pytest.raises(RewardError, match="SyntaxError"):
        load_function("syn.py:f", tmp_path)


def test_error_missing_attribute_lists_the_callables(tmp_path):
    write(tmp_path, "r.py", REWARD_FILE)
    with pytest.raises(RewardError) as err:
        load_function("r.py:exact_match", tmp_path)
    msg = str(err.value)
    assert "'r.py:exact_match'" in msg and "no attribute 'exact_match'" in msg and "exact, half" in msg


def test_error_not_callable(tmp_path):
    write(tmp_path, "r.py", REWARD_FILE)
    with pytest.raises(RewardError, match=r"'r.py:NOT_A_FUNCTION'.*NOT_A_FUNCTION is a int, not a function"):
        load_function("r.py:NOT_A_FUNCTION", tmp_path)


def test_error_missing_module(tmp_path):
    with pytest.raises(RewardError, match=r"'no_such_pkg_xyz.mod:f': no module named 'no_such_pkg_xyz'"):
        load_function("no_such_pkg_xyz.mod:f", tmp_path)


def test_error_duplicate_labels(tmp_path):
    write(tmp_path, "r.py", REWARD_FILE)
    with pytest.raises(RewardError, match=r"rewards\[1\] 'alignflow.rewards:half'.*rewards\[0\] 'r.py:half'.*"
                                          r"share the label 'half'"):
        RewardSet([spec("r.py:half"), spec("alignflow.rewards:half")], tmp_path)
    # a name tells them apart
    assert RewardSet([spec("r.py:half"), spec("r.py:half", name="half2")], tmp_path).labels == ["half", "half2"]


def test_error_invalid_regex_at_construction(tmp_path):
    with pytest.raises(RewardError, match=r"rewards\[0\] 'alignflow.rewards:format_regex'.*not a valid regular"):
        RewardSet([spec("alignflow.rewards:format_regex", kwargs={"pattern": "(<answer>"})], tmp_path)


def test_error_at_construction_names_the_index(tmp_path):
    with pytest.raises(RewardError, match=r"^rewards\[1\] 'gone.py:f': file .* does not exist"):
        RewardSet([spec("alignflow.rewards:exact_match"), spec("gone.py:f")], tmp_path)


def test_error_kwarg_the_function_does_not_take(tmp_path):
    write(tmp_path, "r.py", "def f(prompts, completions, answer):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RewardError, match=r"kwargs scale not accepted; the function takes: answer"):
        RewardSet([spec("r.py:f", kwargs={"scale": 2})], tmp_path)


# ---------------------------------------------------------------- scoring
def test_weighted_sum_with_none_and_means(tmp_path):
    write(tmp_path, "r.py", '''
def a(prompts, completions, **kw):
    return [1.0, None, 0.0, None]

def b(prompts, completions, **kw):
    return [0.5, None, 1, True]
''')
    rs = RewardSet([spec("r.py:a", weight=2.0), spec("r.py:b", weight=0.5)], tmp_path)
    result = rs(["p"] * 4, ["c"] * 4, {})
    # sample 0: 2*1 + 0.5*0.5 = 2.25; 1: nothing applicable -> 0; 2: 2*0 + 0.5*1 = 0.5; 3: 0.5*1 = 0.5
    assert result.total == [2.25, 0.0, 0.5, 0.5]
    assert result.per_function == {"a": [1.0, None, 0.0, None], "b": [0.5, None, 1.0, 1.0]}
    assert result.errors == {"a": 0, "b": 0}
    means = result.means()
    assert means["a"] == 0.5 and means["b"] == pytest.approx(2.5 / 3)


def test_mean_of_a_function_that_scored_nothing_is_nan(tmp_path):
    write(tmp_path, "r.py", "def none(prompts, completions, **kw):\n    return [None] * len(completions)\n")
    result = RewardSet([spec("r.py:none")], tmp_path)(["p"] * 2, ["c"] * 2, {})
    assert result.total == [0.0, 0.0] and math.isnan(result.means()["none"]) and result.errors == {"none": 0}


def test_one_raising_sample_costs_only_itself(tmp_path, caplog):
    write(tmp_path, "r.py", '''
def flaky(prompts, completions, **kw):
    if any("boom" in c for c in completions):
        raise ValueError("boom in " + completions[0] if len(completions) == 1 else "boom")
    return [1.0] * len(completions)
''')
    rs = RewardSet([spec("r.py:flaky")], tmp_path)
    with caplog.at_level(logging.WARNING, logger="alignflow.rewards"):
        result = rs(["a", "b", "c", "d"], ["ok", "boom", "ok", "boom"], {})
    assert result.per_function["flaky"] == [1.0, None, 1.0, None]
    assert result.total == [1.0, 0.0, 1.0, 0.0] and result.errors == {"flaky": 2}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per call, not once per sample
    assert "flaky" in warnings[0].getMessage() and "2 of 4" in warnings[0].getMessage()
    assert "ValueError: boom in boom (sample 1)" in warnings[0].getMessage()


def test_wrong_length_is_retried_sample_by_sample(tmp_path):
    write(tmp_path, "r.py", '''
def short(prompts, completions, **kw):
    return [1.0] if len(completions) > 1 else [0.25]
''')
    result = RewardSet([spec("r.py:short")], tmp_path)(["p"] * 3, ["c"] * 3, {})
    assert result.per_function["short"] == [0.25, 0.25, 0.25] and result.errors == {"short": 0}
    assert "returned 1 values for 3 samples" in result.problems["short"]


def test_always_wrong_length_counts_every_sample(tmp_path):
    write(tmp_path, "r.py", "def empty(prompts, completions, **kw):\n    return []\n")
    result = RewardSet([spec("r.py:empty")], tmp_path)(["p"] * 3, ["c"] * 3, {})
    assert result.per_function["empty"] == [None, None, None] and result.errors == {"empty": 3}
    assert result.total == [0.0, 0.0, 0.0]


def test_nan_and_inf_are_errors(tmp_path):
    write(tmp_path, "r.py", '''
import math
import numpy as np
def bad(prompts, completions, **kw):
    return [1.0, math.nan, np.float32(0.5), float("inf"), np.int64(2)]
''')
    result = RewardSet([spec("r.py:bad")], tmp_path)(["p"] * 5, ["c"] * 5, {})
    assert result.per_function["bad"] == [1.0, None, 0.5, None, 2.0]
    assert result.errors == {"bad": 2} and result.total == [1.0, 0.0, 0.5, 0.0, 2.0]


def test_strings_are_errors_and_check_reports_them(tmp_path):
    write(tmp_path, "rewards/mytask.py", '''
def exact_match(prompts, completions, answer, **kw):
    return ["1" if c == a else "0" for c, a in zip(completions, answer)]
''')
    rs = RewardSet([spec("alignflow.rewards:length_penalty"), spec("rewards/mytask.py:exact_match")], tmp_path)
    result = rs(["p", "p"], ["1", "2"], {"answer": ["1", "1"]})
    assert result.per_function["exact_match"] == [None, None]  # never float("1")
    assert result.errors == {"length_penalty": 0, "exact_match": 2} and result.total == [0.0, 0.0]
    assert rs.check(["p", "p"], ["1", "2"], {"answer": ["1", "1"]}) == [
        "rewards[1] rewards/mytask.py:exact_match returned str values ('1', '0'); expected numbers or None"]


def test_check_is_empty_when_fine_and_reports_raises(tmp_path):
    write(tmp_path, "r.py", "def needs_solution(prompts, completions, solution):\n    return [0.0] * len(completions)\n")
    fine = RewardSet([spec("alignflow.rewards:exact_match")], tmp_path)
    assert fine.check(["p"] * 6, ["a"] * 6, {"answer": ["a"] * 6}) == []
    problems = RewardSet([spec("r.py:needs_solution")], tmp_path).check(["p"], ["a"], {"answer": ["a"]})
    assert len(problems) == 1 and problems[0].startswith("rewards[0] r.py:needs_solution raised TypeError")
    assert "solution" in problems[0] and "columns passed: answer" in problems[0]


def test_timeout_counts_and_returns_promptly(tmp_path, caplog):
    write(tmp_path, "r.py", '''
import time
def slow(prompts, completions, **kw):
    time.sleep(3)
    return [1.0] * len(completions)

def quick(prompts, completions, **kw):
    return [1.0] * len(completions)
''')
    rs = RewardSet([spec("r.py:slow", timeout=0.2), spec("r.py:quick")], tmp_path)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="alignflow.rewards"):
        result = rs(["p"] * 3, ["c"] * 3, {})
    assert time.monotonic() - start < 1.5
    assert result.per_function == {"slow": [None, None, None], "quick": [1.0, 1.0, 1.0]}
    assert result.errors == {"slow": 3, "quick": 0} and result.total == [1.0, 1.0, 1.0]
    assert "slow" in caplog.text and "timeout (0.2 s)" in caplog.text
    start = time.monotonic()
    assert rs.check(["p"], ["c"], {}) == ["rewards[0] r.py:slow took longer than its timeout (0.2 s) on 1 samples"]
    assert time.monotonic() - start < 1.5


def test_kwargs_win_over_columns_and_extra_columns_arrive(tmp_path):
    write(tmp_path, "r.py", '''
def seen(prompts, completions, answer, difficulty, scale, **kw):
    return [scale * d + (c == a) for c, a, d in zip(completions, answer, difficulty)]

def by_keyword(completions, **kwargs):  # TRL calls by keyword; a function may omit prompts
    assert kwargs["prompts"] == ["p1", "p2"]
    return [float(len(c)) for c in completions]

def only_answer(p, c, answer):  # positional, no **kwargs: gets only the columns it names
    return [float(x == y) for x, y in zip(c, answer)]
''')
    rs = RewardSet([spec("r.py:seen", kwargs={"scale": 10, "answer": ["x", "x"]}), spec("r.py:by_keyword"),
                    spec("r.py:only_answer")], tmp_path)
    result = rs(["p1", "p2"], ["x", "yy"], {"answer": ["x", "yy"], "difficulty": [1, 2], "source": ["a", "b"]})
    # seen: the kwarg answer ["x", "x"] wins over the column: 10*1 + 1 = 11, 10*2 + 0 = 20
    assert result.per_function == {"seen": [11.0, 20.0], "by_keyword": [1.0, 2.0], "only_answer": [1.0, 1.0]}
    assert result.errors == {"seen": 0, "by_keyword": 0, "only_answer": 0}


def test_per_sample_retry_slices_columns(tmp_path):
    write(tmp_path, "r.py", '''
def picky(prompts, completions, answer, **kw):
    if len(completions) > 1:
        raise RuntimeError("one at a time")
    assert len(answer) == 1
    return [1.0 if completions[0] == answer[0] else 0.0]
''')
    result = RewardSet([spec("r.py:picky")], tmp_path)(["p"] * 3, ["a", "b", "c"],
                                                        {"answer": np.array(["a", "x", "c"])})
    assert result.per_function["picky"] == [1.0, 0.0, 1.0] and result.errors == {"picky": 0}


def test_column_length_mismatch_is_a_caller_error(tmp_path):
    rs = RewardSet([spec("alignflow.rewards:exact_match")], tmp_path)
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 prompts"):
        rs(["p", "p"], ["a", "b"], {"answer": ["a"]})


def test_default_arithmetic_reward_set(tmp_path):
    rs = RewardSet([RewardSpec(function="alignflow.rewards:accuracy_reward")], tmp_path)
    result = rs(["47+85=?", "47+85=?"], ["7+5=12;4+8+1=13;A:132", "A:131"], {"answer": ["132", "132"]})
    assert rs.labels == ["accuracy_reward"] and result.total == [1.0, 0.0]


# ---------------------------------------------------------------- built-in verifiers
def test_exact_match():
    completions = ['  "Paris." ', "paris, france", "The  Answer\nis 4", "4", "'yes'.", "x", "3.0"]
    answers = ["paris", "Paris", "the answer is 4.", [3, "4"], "Yes", None, 3]
    assert exact_match(["q"] * 7, completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, 1.0, None, 0.0]
    assert exact_match(["q"], ["b"], answer=[np.array(["a", "b"])]) == [1.0]
    assert exact_match(["q"], ["b"], answer=[[]]) == [None]


def test_math_answer():
    completions = [
        r"so the result is \boxed{\frac{3}{4}}",
        r"\boxed{1{,}000}? no: \boxed{12}",   # the last boxed counts
        "It costs 1,234 dollars.",
        "8-5=3",                              # a minus after a digit is subtraction, not a sign
        "the temperature is -7 degrees",
        "half: 3/4.",
        "a tiny 2.5e-3",
        "no number here",
        "1,2,3",
        r"\boxed{Paris}",
        "0.1 + 0.2 = 0.30000000000000004",
        "it is 42",
    ]
    answers = [0.75, "12", 1234, "3", "-7", "0.75", 0.0025, "5", 3, "paris", 0.3, None]
    assert math_answer(["q"] * 12, completions, answer=answers) == [
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, None]
    # answers written the ways datasets write them
    assert math_answer(["q"] * 4, ["72", "72", "72", "-0.5"],
                       answer=[r"\boxed{72}", "A: 72", "Natalia sold 48/2 = 24 ... 48+24 = 72\n#### 72", "-1/2"]) == [
        1.0, 1.0, 1.0, 1.0]
    assert math_answer(["q"] * 3, ["it is 100", "1000002", "1000000.5"], answer=[101, 1000000, 1000000]) == [
        0.0, 0.0, 1.0]  # relative tolerance 1e-6: 1000000.5 is within 1e-6 * 1000000.5, 1000002 is not
    assert math_answer(["q"], ["maybe 7 or 8"], answer=[["8", "9"]]) == [1.0]


def test_format_regex():
    completions = [" <answer>4</answer>\n", "4", "<answer>a\nb</answer>", "<answer>4</answer> trailing"]
    assert format_regex(["q"] * 4, completions, pattern=r"<answer>.*</answer>") == [1.0, 0.0, 1.0, 0.0]


def test_length_penalty():
    completions = ["x" * 10, "x" * 11, "x" * 15, "x" * 20, "x" * 50]
    assert length_penalty(["q"] * 5, completions, max_chars=10) == [0.0, -0.1, -0.5, -1.0, -1.0]
    assert length_penalty(["q"], ["x" * 1000], ) == [0.0] and length_penalty(["q"], ["x" * 1500]) == [-0.5]


def test_builtins_through_a_reward_set_with_weights(tmp_path):
    rs = RewardSet([
        spec("alignflow.rewards:math_answer", weight=1.0),
        spec("alignflow.rewards:format_regex", weight=0.2, kwargs={"pattern": r".*\\boxed\{.*\}"}),
        spec("alignflow.rewards:length_penalty", weight=0.5, kwargs={"max_chars": 20}),
    ], tmp_path)
    completions = [r"so \boxed{4}", "it is 4", r"a long way round to get \boxed{5}"]
    result = rs(["q"] * 3, completions, {"answer": ["4", "4", "4"]})
    # 1: 1 + 0.2*1 + 0 = 1.2; 2: 1 + 0 + 0 = 1.0; 3 (33 chars): 0 + 0.2*1 + 0.5*-(13/20) = 0.2 - 0.325 = -0.125
    assert result.total == pytest.approx([1.2, 1.0, -0.125])
    assert result.means() == pytest.approx({"math_answer": 2 / 3, "format_regex": 2 / 3, "length_penalty": -0.65 / 3})


def test_invalid_length_penalty_kwarg(tmp_path):
    with pytest.raises(RewardError, match="max_chars must be a positive number"):
        RewardSet([spec("alignflow.rewards:length_penalty", kwargs={"max_chars": 0})], tmp_path)


def test_module_form_finds_modules_under_the_project_root(tmp_path):
    write(tmp_path, "rootmod_ok_af15.py", REWARD_FILE)
    assert load_function("rootmod_ok_af15:half", tmp_path)(["p"], ["c"]) == [0.5]
    path = write(tmp_path, "rootmod_bad_af15.py", "raise ImportError('needs sympy')\n")
    with pytest.raises(RewardError) as err:
        load_function("rootmod_bad_af15:f", tmp_path)
    assert str(err.value) == f"'rootmod_bad_af15:f': importing {path} raised ImportError: needs sympy"


def test_a_function_that_needs_the_main_thread_still_scores(tmp_path):
    write(tmp_path, "r.py", '''
import signal
def alarmed(prompts, completions, **kw):
    signal.signal(signal.SIGALRM, signal.getsignal(signal.SIGALRM))  # only allowed in the main thread
    return [1.0] * len(completions)
''')
    result = RewardSet([spec("r.py:alarmed")], tmp_path)(["p"] * 2, ["c"] * 2, {})
    assert result.per_function["alarmed"] == [1.0, 1.0] and result.errors == {"alarmed": 0}


def test_safe_rewards_shim_for_old_callers():
    from alignflow.rewards import accuracy_reward, safe_rewards
    assert safe_rewards(accuracy_reward, ["1+2=?"] * 2, ["A:3", "A:4"], answer=["3", "3"]) == ([1.0, 0.0], 0)
