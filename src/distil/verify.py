"""Verifiers for rejection sampling: is a teacher's completion right for its prompt?

A verifier is anything with ``__call__(record, completion) -> Verdict`` (the :class:`Verifier`
protocol): ``record`` is the prompt record (``id``, ``prompt`` and the prompt file's other fields,
e.g. ``answer`` or ``tests``), ``completion`` the teacher's text. Shipped verifiers, chosen in a
config by ``verify.check.kind``:

- ``exact``: the (extracted) answer equals ``record[field]`` after whitespace/case folding;
- ``numeric``: the last number of the completion (or of the extracted answer) equals
  ``record[field]`` within a tolerance;
- ``regex``: a regular expression is found (or matches the whole completion);
- ``json_schema``: the completion (fences stripped) parses as JSON and validates;
- ``python``: a function given by import path, ``fn(record, completion)`` returning a bool, a
  float score or a :class:`Verdict`;
- ``unit_tests``: the completion's code, followed by ``record[tests_field]``, runs in a fresh
  Python subprocess with a wall-clock and an address-space limit and no network (a network
  namespace via ``unshare -rn`` where the kernel allows it, and sockets disabled in any case);
  exit status 0 passes.

:func:`select_samples` then decides which samples of a prompt are kept for training (all, the
passing ones, or the best passing one); the others are kept apart with their verdicts, so
negative traces stay available.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from distil.config.base import StrictModel
from distil.errors import DistilError


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one completion.

    Attributes:
        passed: Whether the completion is acceptable.
        score: Ranks samples of one prompt for ``keep: best`` (higher is better; 1/0 for yes/no).
        reason: Why it failed (or a note), for the record.
    """

    passed: bool
    score: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """The verdict as a JSON object (stored with the record)."""
        return asdict(self)


class Verifier(Protocol):
    """Judges one completion of one prompt record."""

    def __call__(self, record: Mapping[str, Any], completion: str) -> Verdict:
        """Return the verdict; must not raise for a wrong or malformed completion."""
        ...


def as_verdict(value: bool | float | Verdict, *, threshold: float = 0.5) -> Verdict:
    """A verifier function's result as a Verdict: a bool passes or fails (score 1/0); a float is
    a score that passes at ``>= threshold``.

    Raises:
        DistilError: For any other type (the function's contract is bool, float or Verdict).
    """
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(value, 1.0 if value else 0.0, "" if value else "returned False")
    if isinstance(value, int | float) and math.isfinite(float(value)):
        score = float(value)
        passed = score >= threshold
        return Verdict(passed, score, "" if passed else f"score {score:g} < {threshold:g}")
    raise DistilError(
        f"a verifier returned {value!r} ({type(value).__name__}); return a bool, a finite float "
        "score or a distil.verify.Verdict"
    )


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)```", re.S)


def strip_fences(text: str) -> str:
    """The first fenced code block's body, or the text itself when it has none."""
    found = _FENCE.search(text)
    return found.group(1) if found else text


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands commas allowed), or None."""
    for raw in reversed(_NUMBER.findall(text)):
        try:
            return float(raw.replace(",", ""))
        except ValueError:
            continue
    return None


def _extract(completion: str, pattern: str | None) -> str | None:
    """The answer part of a completion: the last match's first group (or whole match)."""
    if pattern is None:
        return completion
    matches = list(re.finditer(pattern, completion, re.S))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.groups() else last.group(0)


def _reference(record: Mapping[str, Any], field: str) -> Any:
    if field not in record:
        raise DistilError(
            f"prompt record {record.get('id')!r} has no field {field!r} to verify against; add it "
            "to every line of the prompts file, or set verify.check.field"
        )
    return record[field]


class ExactCheck(StrictModel):
    """The answer equals the record's reference text."""

    kind: Literal["exact"] = "exact"
    field: str = Field(default="answer", description="the prompt record's reference field")
    answer_pattern: str | None = Field(
        default=None,
        description="regex whose last match (group 1) is the answer; whole text if null",
    )
    case_sensitive: bool = False

    def build(self) -> Verifier:
        """The verifier this spec describes."""

        def check(record: Mapping[str, Any], completion: str) -> Verdict:
            answer = _extract(completion, self.answer_pattern)
            if answer is None:
                return Verdict(False, 0.0, "no answer found")
            want = str(_reference(record, self.field))
            norm: Callable[[str], str] = lambda s: " ".join(s.split())  # noqa: E731
            a, b = norm(answer), norm(want)
            if not self.case_sensitive:
                a, b = a.casefold(), b.casefold()
            return (
                Verdict(True, 1.0) if a == b else Verdict(False, 0.0, f"{a[:40]!r} != {b[:40]!r}")
            )

        return check


class NumericCheck(StrictModel):
    """The last number of the answer equals the record's reference number."""

    kind: Literal["numeric"] = "numeric"
    field: str = "answer"
    answer_pattern: str | None = Field(
        default=None, description="regex isolating the answer first (e.g. '####\\s*(.+)')"
    )
    tolerance: float = Field(default=1e-6, ge=0, description="absolute")

    def build(self) -> Verifier:
        """The verifier this spec describes."""

        def check(record: Mapping[str, Any], completion: str) -> Verdict:
            answer = _extract(completion, self.answer_pattern)
            got = None if answer is None else last_number(answer)
            if got is None:
                return Verdict(False, 0.0, "no number in the answer")
            ref = _reference(record, self.field)
            want = float(ref) if isinstance(ref, int | float) else last_number(str(ref))
            if want is None:
                raise DistilError(f"record {record.get('id')!r}: {self.field}={ref!r} is no number")
            if abs(got - want) <= self.tolerance:
                return Verdict(True, 1.0)
            return Verdict(False, 0.0, f"{got:g} != {want:g}")

        return check


class RegexCheck(StrictModel):
    """A regular expression is found in (or, with ``fullmatch``, matches) the completion."""

    kind: Literal["regex"] = "regex"
    pattern: str
    fullmatch: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return v

    def build(self) -> Verifier:
        """The verifier this spec describes."""
        compiled = re.compile(self.pattern, re.S)

        def check(record: Mapping[str, Any], completion: str) -> Verdict:
            del record
            hit = compiled.fullmatch(completion) if self.fullmatch else compiled.search(completion)
            return (
                Verdict(True, 1.0) if hit else Verdict(False, 0.0, f"no match for {self.pattern!r}")
            )

        return check


class JsonSchemaCheck(StrictModel):
    """The completion (code fences stripped) is JSON that validates against a schema."""

    kind: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] = Field(description="a JSON schema (any draft jsonschema knows)")

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import validators
        from jsonschema.exceptions import SchemaError

        try:
            validators.validator_for(v).check_schema(v)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON schema: {exc.message}") from exc
        return v

    def build(self) -> Verifier:
        """The verifier this spec describes."""
        from jsonschema import validators

        validator = validators.validator_for(self.json_schema)(self.json_schema)

        def check(record: Mapping[str, Any], completion: str) -> Verdict:
            del record
            try:
                value = json.loads(strip_fences(completion).strip())
            except json.JSONDecodeError as exc:
                return Verdict(False, 0.0, f"not JSON: {exc.msg}")
            error = next(iter(validator.iter_errors(value)), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "<root>"
                return Verdict(False, 0.0, f"{where}: {error.message[:120]}")
            return Verdict(True, 1.0)

        return check


def import_function(path: str) -> Callable[..., Any]:
    """``package.module:function`` → the function.

    Raises:
        DistilError: If the module cannot be imported or has no such callable.
    """
    module_name, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise DistilError(
            f"cannot import the verifier {path!r} ({exc}); give package.module:function on the "
            "Python path (PYTHONPATH)"
        ) from exc
    if not callable(fn):
        raise DistilError(f"verifier {path!r} is not callable")
    return fn


class PythonCheck(StrictModel):
    """A function ``fn(record: dict, completion: str) -> bool | float | Verdict`` by import path."""

    kind: Literal["python"] = "python"
    function: str = Field(description="package.module:function")
    threshold: float = Field(default=0.5, description="a float score passes at >= this")

    @field_validator("function")
    @classmethod
    def _path(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError("must look like package.module:function")
        return v

    def build(self) -> Verifier:
        """The verifier this spec describes (imports the function now, so errors come first)."""
        fn = import_function(self.function)

        def check(record: Mapping[str, Any], completion: str) -> Verdict:
            return as_verdict(fn(dict(record), completion), threshold=self.threshold)

        return check


class UnitTestsCheck(StrictModel):
    """The completion's code plus the record's tests exit 0 in a sandboxed subprocess."""

    kind: Literal["unit_tests"] = "unit_tests"
    tests_field: str = Field(default="tests", description="the prompt record's test code")
    timeout_s: float = Field(default=10.0, gt=0, description="wall-clock limit")
    memory_mb: int = Field(default=512, ge=32, description="address-space limit")

    def build(self) -> Verifier:
        """The verifier this spec describes."""

        def check(record: Mapping[str, Any], completion: str) -> Verdict:
            tests = str(_reference(record, self.tests_field))
            return run_unit_tests(
                strip_fences(completion), tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb
            )

        return check


VerifierSpec = Annotated[
    ExactCheck | NumericCheck | RegexCheck | JsonSchemaCheck | PythonCheck | UnitTestsCheck,
    Field(discriminator="kind"),
]


class KeepPolicy(str, Enum):
    """Which samples of a prompt go into the training shards (the rest are kept apart, marked)."""

    ALL = "all"  # every sample, each marked with its verdict
    PASSING = "passing"  # the passing ones
    BEST = "best"  # the best passing one (highest score, then lowest sample index)


class VerifySection(StrictModel):
    """Rejection sampling: a check per completion, and which samples to keep."""

    check: VerifierSpec
    keep: KeepPolicy = KeepPolicy.PASSING

    @model_validator(mode="after")
    def _importable(self) -> VerifySection:
        if isinstance(self.check, PythonCheck):
            try:  # a typo is a validation error, not a crash after the first answer
                import_function(self.check.function)
            except DistilError as exc:
                raise ValueError(str(exc)) from exc
        return self


def select_samples(verdicts: Sequence[Verdict], keep: KeepPolicy) -> list[bool]:
    """Which of one prompt's samples (in sample order) to keep for training.

    Args:
        verdicts: One verdict per sample.
        keep: ``all``, ``passing`` or ``best`` (ties go to the lowest sample index).

    Returns:
        A flag per sample.
    """
    if keep is KeepPolicy.ALL:
        return [True] * len(verdicts)
    passing = [v.passed for v in verdicts]
    if keep is KeepPolicy.PASSING or not any(passing):
        return passing
    best = max(
        (i for i, v in enumerate(verdicts) if v.passed), key=lambda i: (verdicts[i].score, -i)
    )
    return [i == best for i in range(len(verdicts))]


# Runs before the program: no sockets even where no network namespace can be made.
_NO_NETWORK = """\
import socket as _s
def _distil_no_network(*a, **k):
    raise OSError("network access is disabled in distil's unit-test sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _distil_no_network
del _s
"""


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` can run a process without network here (probed once)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return (
            subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limit(memory_bytes: int, cpu_s: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        os.setsid()  # its own process group: a timeout kills every child too
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_unit_tests(code: str, tests: str, *, timeout_s: float, memory_mb: int) -> Verdict:
    """Run ``code`` followed by ``tests`` as one fresh Python program in a sandbox.

    The program runs with ``python -I`` (no user site, no PYTHON* variables) in an empty temp
    folder as working directory and home, a minimal environment, ``RLIMIT_AS`` of
    ``memory_mb``, a CPU limit, a 64 MiB file-size limit and no sockets; inside ``unshare -rn``
    (no network interfaces) when available.

    Returns:
        Passed on exit status 0; otherwise the last line of stderr (e.g. the AssertionError),
        ``timed out after …`` or ``memory limit …`` as the reason.
    """
    with tempfile.TemporaryDirectory(prefix="distil-verify-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(_NO_NETWORK + code + "\n\n" + tests + "\n", encoding="utf-8")
        command = [sys.executable, "-I", str(program)]
        if network_namespace_available():
            command = ["unshare", "-rn", *command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            command,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_limit(memory_mb << 20, math.ceil(timeout_s) + 1),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return Verdict(False, 0.0, f"timed out after {timeout_s:g}s")
    if proc.returncode == 0:
        return Verdict(True, 1.0)
    text = err.decode("utf-8", "replace").strip()
    if "MemoryError" in text:
        return Verdict(False, 0.0, f"memory limit of {memory_mb} MiB")
    last = text.splitlines()[-1] if text else f"exit status {proc.returncode}"
    return Verdict(False, 0.0, last[:200])
