"""Rewards in TRL's convention, loaded by name and scored without ever crashing a run.

A reward function is `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`: every
dataset column arrives as a keyword argument (a list aligned with `prompts`), the spec's `kwargs` are merged
over the columns, and `None` means "not applicable to this sample". A pipeline names its functions in
`rewards:` (see `alignflow.config.RewardSpec` and docs/byo_rewards.md); `RewardSet` loads them once and
scores batches with their weighted sum:

    rewards = RewardSet(cfg.reward_specs, root)            # a bad file or kwarg fails here, before any stage
    result = rewards(prompts, completions, {"answer": answers})
    result.total, result.per_function, result.errors, result.means()

A function that raises, returns the wrong length, NaN/inf, strings, or hangs past its timeout costs only the
samples it failed on (they score None for it and are counted in `errors`), never the run.

Built-in verifiers: `exact_match`, `math_answer`, `format_regex`, `length_penalty`, and the generator task's
`accuracy_reward` and `steps_consistent`.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import numbers
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from alignflow.data.task import extract_answer, worked_steps

if TYPE_CHECKING:
    from alignflow.config import RewardSpec

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """A reward that cannot be used, phrased for the user: the spec's function string, the file, the problem."""


# ---------------------------------------------------------------- loading
def _is_file_target(target: str) -> bool:
    return target.lower().endswith(".py") or "/" in target or "\\" in target


def _callables_of(module) -> list[str]:
    """Public callables defined in the module (else any public callable it holds), for 'did you mean'."""
    public = {n: v for n, v in vars(module).items() if not n.startswith("_") and callable(v)}
    own = [n for n, v in public.items() if getattr(v, "__module__", None) == module.__name__]
    return sorted(own or public)


def _attribute(module, function: str, attr: str, where: str) -> Callable:
    if not hasattr(module, attr):
        names = _callables_of(module)
        listed = ", ".join(names) if names else "none"
        raise RewardError(f"{function!r}: {where} has no attribute {attr!r}; the callables it defines: {listed}")
    obj = getattr(module, attr)
    if not callable(obj):
        raise RewardError(f"{function!r}: {where}:{attr} is a {type(obj).__name__}, not a function")
    return obj


def _load_file(path: Path):
    """Import a file as a module of its own (unique name: two `rewards.py` in different folders never clash).
    The file's folder is on sys.path while it imports, so it may import a helper module next to it."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"alignflow_user_reward_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path, loader=importlib.machinery.SourceFileLoader(name, str(path)))
    if spec is None or spec.loader is None:
        raise ImportError(f"not a loadable Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the user's file look themselves up here
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass
    return module


def load_function(target: str, root: Path) -> Callable:
    """The callable that `target` names: "path/to/file.py:fn" (relative to `root`, or absolute) or "pkg.mod:fn".

    Raises RewardError naming `target`, the file and the problem: a missing file, an import that raised (its
    exception type and message), a missing attribute (with the callables the module has), a non-callable."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise RewardError(f"{target!r}: expected 'path/to/file.py:function' or 'module:function'")
    if _is_file_target(where):
        path = Path(where).expanduser()
        if not path.is_absolute():
            path = Path(root) / path
        path = path.resolve()
        if not path.is_file():
            hint = "" if Path(where).is_absolute() else f" (relative paths are resolved against {Path(root).resolve()})"
            raise RewardError(f"{target!r}: file {path} does not exist{hint}")
        try:
            module = _load_file(path)
        except (Exception, SystemExit) as err:
            raise RewardError(f"{target!r}: importing {path} raised {type(err).__name__}: {err}") from err
        return _attribute(module, target, attr, str(path))
    try:
        module = _import_module(where, Path(root))
    except (Exception, SystemExit) as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name and (where + ".").startswith(err.name + ".")
        if missing:
            raise RewardError(f"{target!r}: no module named {err.name!r} (a file is written "
                              f"'path/to/file.py:{attr}', relative to {Path(root).resolve()})") from err
        raise RewardError(f"{target!r}: importing {_origin(where, Path(root))} raised {type(err).__name__}: {err}") from err
    return _attribute(module, target, attr, getattr(module, "__file__", None) or f"module {where}")


def _origin(name: str, root: Path) -> str:
    """The module's file, for messages (looked up from here, then from the project root; else its name)."""
    for extra in (None, str(Path(root).resolve())):
        added = extra is not None and extra not in sys.path
        if added:
            sys.path.insert(0, extra)
        try:
            spec = importlib.util.find_spec(name)
        except (Exception, SystemExit):
            spec = None
        finally:
            if added:
                sys.path.remove(extra)
        if getattr(spec, "origin", None):
            return spec.origin
    return f"module {name}"


def _import_module(name: str, root: Path):
    """import_module, retried with the project root on sys.path when the module is not found from here."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        folder = str(root.resolve())
        if folder in sys.path or not (err.name and name.split(".")[0] == err.name.split(".")[0]):
            raise
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass


# ---------------------------------------------------------------- calling
@dataclass
class _Function:
    """One loaded function and how to call it (decided once, from its signature)."""
    label: str
    function: str           # the spec's string, for messages
    fn: Callable
    weight: float
    kwargs: dict[str, Any]
    timeout: float | None
    by_keyword: bool        # call fn(prompts=..., completions=...) (TRL does) vs. positionally
    accepts: set[str] | None  # keyword names it takes; None: it takes **kwargs (everything)
    main_thread: bool = False  # set when it turned out to need the main thread (signal-based code)

    @classmethod
    def of(cls, fn: Callable, *, label: str, function: str, weight: float = 1.0,
           kwargs: dict | None = None, timeout: float | None = None) -> "_Function":
        by_keyword, accepts = False, None
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # some builtins have no signature: call positionally, pass everything
            params = None
        if params is not None:
            named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            by_keyword = "completions" in named
            if not by_keyword:  # the first two positional parameters take prompts and completions
                positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                named = [n for n in named if n not in positional[:2]]
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                accepts = set(named) | ({"prompts", "completions"} if by_keyword else set())
        return cls(label, function, fn, float(weight), dict(kwargs or {}), timeout, by_keyword, accepts)

    def call(self, prompts: Sequence, completions: Sequence, columns: dict[str, Any]):
        merged = {**columns, **self.kwargs}
        merged.pop("prompts", None)
        merged.pop("completions", None)
        if self.by_keyword:
            merged["prompts"], merged["completions"] = prompts, completions
        if self.accepts is not None:
            merged = {k: v for k, v in merged.items() if k in self.accepts}
        if self.by_keyword:
            return self.fn(**merged)
        return self.fn(prompts, completions, **merged)


def _in_thread(work: Callable[[], Any], timeout: float | None, name: str):
    """Run `work` in a daemon thread and wait at most `timeout` seconds; raises concurrent.futures.TimeoutError.
    A plain daemon thread, not an executor: a hung reward must neither block the next call nor the process exit."""
    if timeout is None:
        return work()
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as err:  # handed to the caller, who counts it
            future.set_exception(err)

    threading.Thread(target=run, name=f"reward-{name}", daemon=True).start()
    return future.result(timeout)


def _describe(err: BaseException) -> str:
    msg = str(err)
    return f"raised {type(err).__name__}: {msg if len(msg) <= 200 else msg[:197] + '...'}"


def _guarded(f: "_Function", work: Callable[[], Any]):
    """`work` in a worker thread under f's timeout; in the main thread (no timeout) for a function that
    needs it (one that uses signal, e.g. a math verifier's own alarm-based timeout)."""
    if f.main_thread:
        return work()
    try:
        return _in_thread(work, f.timeout, f.label)
    except ValueError as err:
        if "main thread" not in str(err):
            raise
        log.warning("reward %s (%s) needs the main thread (%s); calling it there, without its timeout",
                    f.label, f.function, err)
        f.main_thread = True
        return work()


def _as_list(out) -> list | None:
    if isinstance(out, (list, tuple)):
        return list(out)
    if isinstance(out, np.ndarray) and out.ndim == 1:
        return out.tolist()
    if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # a 1-d tensor
        return out.tolist()
    return None


def _value(v) -> tuple[float | None, str | None]:
    """(the number, None), (None, None) for not applicable, or (None, the problem)."""
    if v is None:
        return None, None
    if isinstance(v, (bool, np.bool_)):
        return float(v), None
    if isinstance(v, numbers.Real) and not isinstance(v, str):
        x = float(v)
        if not math.isfinite(x):
            return None, f"returned a non-finite value ({x})"
        return x, None
    return None, "bad type"


def _bad_types(values: list, limit: int = 3) -> str:
    """"returned str values ('1', 'x'); expected numbers or None" for the first offending values."""
    bad = [v for v in values if _value(v)[1] == "bad type"]
    kinds = sorted({type(v).__name__ for v in bad})
    shown = ", ".join(repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..." for v in bad[:limit])
    return f"returned {'/'.join(kinds)} values ({shown}); expected numbers or None"


def _check_values(values: list) -> tuple[list[float | None], int, str | None]:
    out, errors, first = [], 0, None
    for v in values:
        x, problem = _value(v)
        if problem is not None:
            errors += 1
            if first is None:
                first = _bad_types(values) if problem == "bad type" else problem
        out.append(x)
    return out, errors, first


def _score(f: _Function, prompts: list, completions: list, columns: dict[str, Any]
           ) -> tuple[list[float | None], int, str | None]:
    """(values, samples failed, the first problem or None). The batch first; if it raises or returns the wrong
    length, sample by sample so that one bad sample costs only itself."""
    n = len(completions)
    if n == 0:
        return [], 0, None
    batch_problem = None
    try:
        out = _guarded(f, lambda: f.call(prompts, completions, columns))
    except concurrent.futures.TimeoutError:
        return [None] * n, n, f"took longer than its timeout ({f.timeout:g} s) on a batch of {n}"
    except (Exception, SystemExit) as err:
        batch_problem = _describe(err)
    else:
        values = _as_list(out)
        if values is None:
            batch_problem = f"returned a {type(out).__name__}, expected a list of {n} values"
        elif len(values) != n:
            batch_problem = f"returned {len(values)} values for {n} samples"
        else:
            return _check_values(values)

    # sample by sample, in one worker thread, within one more timeout; samples not reached by then fail
    results: list = [None] * n
    problems: list[str | None] = [None] * n
    done = [0]
    stop = threading.Event()

    def one_by_one():
        for i in range(n):
            if stop.is_set():
                return
            cols = {k: v[i:i + 1] if isinstance(v, np.ndarray) else [v[i]] for k, v in columns.items()}
            try:
                values = _as_list(f.call([prompts[i]], [completions[i]], cols))
                if values is None or len(values) != 1:
                    problems[i] = batch_problem if values is None else f"returned {len(values)} values for 1 sample"
                else:
                    results[i] = values[0]
            except (Exception, SystemExit) as err:
                problems[i] = _describe(err)
            done[0] = i + 1

    try:
        _guarded(f, one_by_one)
    except concurrent.futures.TimeoutError:
        stop.set()
    reached = done[0]
    values, errors, first = [], 0, None
    for i in range(n):
        if i >= reached:
            values.append(None)
            errors += 1
            first = first or f"took longer than its timeout ({f.timeout:g} s) scoring sample by sample"
            continue
        if problems[i] is not None:
            values.append(None)
            errors += 1
            first = first or f"{problems[i]} (sample {i})"
            continue
        x, problem = _value(results[i])
        if problem is not None:
            errors += 1
            first = first or (_bad_types([results[i]]) if problem == "bad type" else problem) + f" (sample {i})"
        values.append(x)
    if errors == 0:  # only the batch call failed; say so once, it costs a call per sample
        first = f"{batch_problem} on the batch (scored sample by sample, every sample fine)"
    elif first is not None:
        first = f"{batch_problem} on the batch; sample by sample: {first}"
    return values, errors, first


# ---------------------------------------------------------------- the set
@dataclass
class RewardResult:
    total: list[float]                              # weighted sum of the applicable values (0.0 if none)
    per_function: dict[str, list[float | None]]     # label -> value per sample (None: not applicable or failed)
    errors: dict[str, int]                          # label -> samples that failed
    problems: dict[str, str] = field(default_factory=dict)  # label -> the first problem, for functions that had one

    def means(self) -> dict[str, float]:
        """label -> mean over the samples it scored (nan where it scored none)."""
        out = {}
        for label, values in self.per_function.items():
            scored = [v for v in values if v is not None]
            out[label] = sum(scored) / len(scored) if scored else float("nan")
        return out

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


class RewardSet:
    """The pipeline's reward: functions loaded once (a bad file, attribute, kwarg or duplicate label raises
    RewardError here, before any stage runs) and scored as one weighted sum.

    `key` names the config list in messages ("rewards", "evaluate.metrics")."""

    def __init__(self, specs: list[RewardSpec], root: Path, key: str = "rewards"):
        if not specs:
            raise RewardError(f"{key}: an empty list; name at least one function")
        self.specs = list(specs)
        self.root = Path(root)
        self.key = key
        self.functions: list[_Function] = []
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.specs):
            where = f"{key}[{i}]"
            if spec.label in seen:
                raise RewardError(f"{where} {spec.function!r} and {key}[{seen[spec.label]}] "
                                  f"{self.specs[seen[spec.label]].function!r} share the label {spec.label!r}; "
                                  f"set name: on one of them")
            seen[spec.label] = i
            try:
                fn = load_function(spec.function, self.root)
            except RewardError as err:
                raise RewardError(f"{where} {err}") from err
            f = _Function.of(fn, label=spec.label, function=spec.function, weight=spec.weight,
                             kwargs=spec.kwargs, timeout=spec.timeout)
            self._check_kwargs(where, f)
            self.functions.append(f)
        self.labels: list[str] = [f.label for f in self.functions]

    @classmethod
    def of(cls, fn: Callable, weight: float = 1.0) -> "RewardSet":
        """One function object (not named in a config), e.g. `RewardSet.of(accuracy_reward)` in tests and benches."""
        self = cls.__new__(cls)
        name = getattr(fn, "__name__", "reward")
        self.specs, self.root, self.key = [], Path.cwd(), "rewards"
        self.functions = [_Function.of(fn, label=name, function=name, weight=weight)]
        self.labels = [name]
        return self

    @staticmethod
    def _check_kwargs(where: str, f: _Function) -> None:
        reserved = {"prompts", "completions"} & set(f.kwargs)
        if reserved:
            raise RewardError(f"{where} {f.function!r}: kwargs may not set {', '.join(sorted(reserved))} "
                              f"(the pipeline passes them)")
        if f.accepts is not None:
            unknown = sorted(set(f.kwargs) - f.accepts)
            if unknown:
                raise RewardError(f"{where} {f.function!r}: kwargs {', '.join(unknown)} not accepted; the function "
                                  f"takes: {', '.join(sorted(f.accepts - {'prompts', 'completions'})) or 'none'}")
        hook = getattr(f.fn, "check_kwargs", None)  # a function may validate its kwargs up front
        if callable(hook):
            try:
                hook(dict(f.kwargs))
            except (ValueError, TypeError, re.error) as err:
                raise RewardError(f"{where} {f.function!r}: {err}") from err

    def __len__(self) -> int:
        return len(self.functions)

    def _columns(self, prompts, completions, columns) -> dict[str, Any]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        columns = dict(columns or {})
        for name, values in columns.items():
            if len(values) != len(prompts):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} prompts")
        return columns

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None
                 ) -> RewardResult:
        columns = self._columns(prompts, completions, columns)
        n = len(completions)
        total = [0.0] * n
        per_function, errors, problems = {}, {}, {}
        for f in self.functions:
            values, failed, problem = _score(f, prompts, completions, columns)
            per_function[f.label], errors[f.label] = values, failed
            if problem is not None:
                problems[f.label] = problem
                log.warning("reward %s (%s): %d of %d samples failed; %s", f.label, f.function, failed, n, problem)
            for i, v in enumerate(values):
                if v is not None:
                    total[i] += f.weight * v
        return RewardResult(total=total, per_function=per_function, errors=errors, problems=problems)

    def check(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None,
              n: int = 4) -> list[str]:
        """Pre-flight: call each function on the first `n` samples (the batch as a whole, no sample-by-sample
        rescue) and return its problems phrased for the user; [] if every function is fine."""
        columns = self._columns(prompts, completions, columns)
        k = min(n, len(completions))
        p, c = list(prompts[:k]), list(completions[:k])
        cols = {name: v[:k] for name, v in columns.items()}
        out = []
        for i, f in enumerate(self.functions):
            where = f"{self.key}[{i}] {f.function}"
            try:
                raw = _guarded(f, lambda f=f: f.call(p, c, cols))
            except concurrent.futures.TimeoutError:
                out.append(f"{where} took longer than its timeout ({f.timeout:g} s) on {k} samples")
                continue
            except (Exception, SystemExit) as err:
                out.append(f"{where} {_describe(err)} on {k} samples (columns passed: "
                           f"{', '.join(sorted(cols)) or 'none'})")
                continue
            values = _as_list(raw)
            if values is None:
                out.append(f"{where} returned a {type(raw).__name__}; expected a list of {k} numbers or None")
            elif len(values) != k:
                out.append(f"{where} returned {len(values)} values for {k} samples")
            else:
                _, failed, problem = _check_values(values)
                if problem is not None:
                    out.append(f"{where} {problem}")
                elif k and all(v is None for v in values):
                    out.append(f"{where} returned None (not applicable) for all {k} samples; check the columns it "
                               f"reads (passed: {', '.join(sorted(cols)) or 'none'})")
        return out


def safe_rewards(fn, prompts, completions, **columns) -> tuple[list[float], int]:
    """Deprecated shim for callers not yet on RewardSet: one function, no timeout, failed or inapplicable
    samples score 0.0. Returns (rewards, samples failed)."""
    f = _Function.of(fn, label=getattr(fn, "__name__", "reward"), function=getattr(fn, "__name__", "reward"))
    values, failed, problem = _score(f, list(prompts), list(completions), columns)
    if problem is not None:
        log.warning("reward %s: %d of %d samples failed; %s", f.label, failed, len(completions), problem)
    return [0.0 if v is None else v for v in values], failed


# ---------------------------------------------------------------- built-in verifiers
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}


def normalize(text) -> str:
    """strip, casefold, collapse whitespace, drop surrounding quotes and a trailing period (repeatedly)."""
    s = " ".join(str(text).casefold().split())
    while True:
        before = s
        s = s.strip()
        if s.endswith("."):
            s = s[:-1]
        if len(s) >= 2 and s[0] in _QUOTES and s[-1] == _QUOTES[s[0]]:
            s = s[1:-1]
        if s == before:
            return s


def _candidates(answer) -> list | None:
    """Acceptable answers: a list/tuple/array of them, or one; None (or an empty list) -> None."""
    if answer is None:
        return None
    if isinstance(answer, np.ndarray):
        answer = answer.tolist()
    if isinstance(answer, (list, tuple, set)):
        items = [a for a in answer if a is not None]
        return items or None
    return [answer]


def exact_match(prompts: list[str], completions: list[str], answer: list, **_) -> list[float | None]:
    """1.0 when the normalised completion equals the normalised answer (or any of a list of answers), else 0.0;
    None where the answer is None. Normalised: strip, casefold, whitespace collapsed, surrounding quotes and a
    trailing period removed.

    >>> exact_match(["q", "q", "q"], ['  "Paris." ', "paris, france", "4"], answer=["paris", "Paris", [3, 4]])
    [1.0, 0.0, 1.0]
    """
    return _per_answer(completions, answer,
                       lambda completion, cands: any(normalize(completion) == normalize(c) for c in cands))


def _per_answer(completions: list[str], answer: list, matches) -> list[float | None]:
    """1.0 / 0.0 per sample from `matches(completion, acceptable answers)`; None where the answer is None."""
    out: list[float | None] = []
    for completion, a in zip(completions, answer):
        cands = _candidates(a)
        out.append(None if cands is None else float(matches(completion, cands)))
    return out


_NUMBER = re.compile(
    r"(?<![\w.])(-)?(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+\.\d+|\d+|\.\d+)(?:[eE]([-+]?\d+))?(?:/(\d+))?")
_FRAC = re.compile(r"^(-)?\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        j = i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i:j - 1]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def _match_number(m: re.Match) -> float:
    sign, body, exp, den = m.groups()
    x = float(body.replace(",", "")) * (10 ** int(exp) if exp else 1)
    if den is not None:
        d = float(den)
        x = x / d if d else float("nan")
    return -x if sign else x


def parse_number(text) -> float | None:
    r"""A number written alone: "1,234", "-3.5", "3/4", "\frac{3}{4}", "$5$", "50%" (-> 50), "A: 7"; else None."""
    if isinstance(text, (bool, np.bool_)):
        return None
    if isinstance(text, numbers.Real):
        x = float(text)
        return x if math.isfinite(x) else None
    s = str(text).strip()
    if "####" in s:  # a GSM8K-style solution: the answer follows the last ####
        s = s.rsplit("####", 1)[1].strip()
    for prefix in ("answer:", "a:"):
        if s.casefold().startswith(prefix):
            s = s[len(prefix):].strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    assigned = re.fullmatch(r"[A-Za-z]\w*\s*=\s*(.+)", s.strip(), re.DOTALL)  # "x = 5"
    if assigned:
        s = assigned.group(1)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    s = s.strip().rstrip(".").strip()
    s = s.removesuffix("\\%").removesuffix("%").strip()
    m = _FRAC.match(s.replace(" ", ""))
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den in (None, 0.0):
            return None
        return (-1 if m.group(1) else 1) * num / den
    m = _NUMBER.fullmatch(s)
    if m is None:
        m = _NUMBER.fullmatch(s.replace(" ", ""))
    if m is None:
        return None
    x = _match_number(m)
    return x if math.isfinite(x) else None


def final_answer(completion: str) -> str | None:
    r"""The completion's final answer: the last `\boxed{...}`'s content, else the last number, else None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    matches = list(_NUMBER.finditer(completion))
    return matches[-1].group(0) if matches else None


def math_answer(prompts: list[str], completions: list[str], answer: list, **_) -> list[float | None]:
    r"""1.0 when the completion's final answer equals the answer, else 0.0; None where the answer is None.

    Final answer: the content of the last `\boxed{...}`, else the last number in the text (integers,
    decimals, negatives, thousands separators "1,234", fractions "3/4"). Numeric answers (a number, or a string
    such as "1,234", "-0.5", "3/4", "\frac{3}{4}", "\boxed{7}", "A: 7", "#### 7") are compared as numbers with a
    relative tolerance of 1e-6 (absolute 1e-9 near 0); other answers by normalised string equality with the
    boxed content (or, without one, the whole completion). A list of acceptable answers matches any.

    >>> math_answer(["q"] * 3, ["so x = \\boxed{\\frac{3}{4}}", "It costs 1,234 dollars.", "maybe 7 or 8"],
    ...             answer=[0.75, "1234", "7"])
    [1.0, 1.0, 0.0]
    """
    def matches(completion: str, cands: list) -> bool:
        boxed, final = last_boxed(completion), final_answer(completion)
        got = parse_number(final) if final is not None else None
        for c in cands:
            want = parse_number(c)
            if want is not None:
                if got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
                    return True
            elif normalize(boxed if boxed is not None else completion) == normalize(c):
                return True
        return False
    return _per_answer(completions, answer, matches)


def format_regex(prompts: list[str], completions: list[str], pattern, **_) -> list[float]:
    """1.0 when the whole stripped completion matches `pattern` (re.fullmatch, re.DOTALL), else 0.0. `pattern`
    is a spec kwarg (one pattern) or a column (one per sample); an invalid one fails at RewardSet construction.

    >>> format_regex(["q", "q"], [" <answer>4</answer>\\n", "4"], pattern=r"<answer>.*</answer>")
    [1.0, 0.0]
    """
    patterns = pattern if isinstance(pattern, (list, tuple, np.ndarray)) else [pattern] * len(completions)
    return [float(re.fullmatch(p, c.strip(), re.DOTALL) is not None) for c, p in zip(completions, patterns)]


def _check_format_regex(kwargs: dict) -> None:
    if "pattern" not in kwargs:
        return  # may come from a column
    try:
        re.compile(kwargs["pattern"], re.DOTALL)
    except (re.error, TypeError) as err:
        raise ValueError(f"kwargs.pattern {kwargs['pattern']!r} is not a valid regular expression: {err}") from err


format_regex.check_kwargs = _check_format_regex


def length_penalty(prompts: list[str], completions: list[str], max_chars: int = 1000, **_) -> list[float]:
    """0.0 for a completion of at most `max_chars` characters (len of the text as generated); beyond,
    -(len - max_chars) / max_chars, capped at -1.0 (reached at twice max_chars). Give it a small weight.

    >>> length_penalty(["q"] * 3, ["x" * 10, "x" * 15, "x" * 50], max_chars=10)
    [0.0, -0.5, -1.0]
    """
    return [0.0 if len(c) <= max_chars else -min(1.0, (len(c) - max_chars) / max_chars) for c in completions]


def _check_length_penalty(kwargs: dict) -> None:
    m = kwargs.get("max_chars", 1000)
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or m <= 0:
        raise ValueError(f"kwargs.max_chars must be a positive number, got {m!r}")


length_penalty.check_kwargs = _check_length_penalty


# ---------------------------------------------------------------- the generator's arithmetic task
def accuracy_reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion ends with `A:<the right answer>`, else 0.0.

    >>> accuracy_reward(["1+2=?"], ["1+2=3;A:3"], answer=["3"])
    [1.0]
    """
    return [float(extract_answer(c) == str(a)) for c, a in zip(completions, answer)]


def steps_consistent(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the worked steps are exactly the column steps of the sum in the prompt (not just the answer)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        try:
            a, b = (int(x) for x in prompt.removesuffix("=?").split("+"))
        except ValueError:
            out.append(0.0)
            continue
        out.append(float(completion.strip() == worked_steps(a, b)))
    return out
