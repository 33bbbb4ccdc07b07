"""Where prompts come from. Each source returns (train, held_out) lists of :class:`Example`.

Sources: ``arithmetic`` (built in, generated), ``gsm8k`` (hub or a local JSONL), ``jsonl`` (any
file with configurable field names), ``hf`` (any hub dataset). Row problems are reported with the
file and the 1-based row number.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlctl.errors import RlctlError, check_fields, first_line

Prompt = str | list  # a plain string, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class Example:
    prompt: Prompt  # what the policy is asked
    answer: str | None  # the reference answer the reward compares against (None: the row has none)
    origin: str  # where it came from ("train.jsonl:17"), for error messages and sample tables


@dataclass(frozen=True)
class SourceSpec:
    """The plain values a source needs; filled from the ``data`` config group by field name."""

    source: str = "arithmetic"
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    eval_path: str | None = None
    eval_split: str = "test"
    prompt_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "plain"
    eval_size: int = 64
    eval_fraction: float = 0.2
    seed: int = 0
    digits: int = 1
    num_operands: int = 2
    operators: str = "+"
    instruction: str = "Answer with just the number."

    def __post_init__(self) -> None:
        check_fields(self, (("eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1): the share of rows held out"),
                            ("eval_size", self.eval_size >= 0, "must be ≥ 0")))  # fmt: skip


SOURCES: dict[str, Callable[[SourceSpec], tuple[list[Example], list[Example]]]] = {}


def source(name: str):
    def add(fn):
        SOURCES[name] = fn
        return fn

    return add


def load_examples(name: str, spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    if name not in SOURCES:
        raise RlctlError(f"data.source: unknown source {name!r}; known: {sorted(SOURCES)}")
    train, held_out = SOURCES[name](spec)
    if not train:
        raise RlctlError(f"data: the {name!r} source gave no training prompts")
    return train, held_out[: spec.eval_size]


# --- built-in arithmetic -------------------------------------------------------------------------

ARITHMETIC_INSTRUCTION = "Answer with just the number."
_MAX_ENUMERATED = 200_000  # problem spaces up to this size are enumerated; larger ones are sampled


def _is_held_out(expression: str, fraction: float, seed: int) -> bool:
    """A fixed hash of the expression decides the split, so train and held-out never share a problem."""
    return zlib.crc32(f"{seed}:{expression}".encode()) % 10_000 < fraction * 10_000


def _evaluate(operands: list[int], ops: list[str]) -> int:
    # Python's precedence (× before + and −) is the one people expect when they read the prompt.
    return eval("".join(f"{o}{op}" for o, op in zip(operands, ops + [""])))  # noqa: S307 (digits and +-* only)


@source("arithmetic")
def arithmetic(spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    """ "What is 3 + 4? Answer with just the number." with `digits`-digit operands.

    The split is by problem (a hash of the expression), so no held-out problem is ever trained on.
    """
    if spec.digits < 1 or spec.num_operands < 2 or not spec.operators or set(spec.operators) - set("+-*"):
        raise RlctlError(
            "data: arithmetic needs digits ≥ 1, num_operands ≥ 2 and operators drawn from '+-*' "
            f"(got digits={spec.digits}, num_operands={spec.num_operands}, operators={spec.operators!r})"
        )
    low, high = (0 if spec.digits == 1 else 10 ** (spec.digits - 1)), 10**spec.digits - 1
    n_values, n_ops = high - low + 1, len(spec.operators)
    space = n_values**spec.num_operands * n_ops ** (spec.num_operands - 1)
    rng = random.Random(spec.seed)

    def problem(operands: list[int], ops: list[str]) -> tuple[str, int]:
        expression = " ".join(f"{o} {op}" for o, op in zip(operands, ops)) + f" {operands[-1]}"
        return expression, _evaluate(operands, ops)

    if space <= _MAX_ENUMERATED:
        problems = []
        for index in range(space):
            operands, ops = [], []
            for _ in range(spec.num_operands):
                index, value = divmod(index, n_values)
                operands.append(low + value)
            for _ in range(spec.num_operands - 1):
                index, op = divmod(index, n_ops)
                ops.append(spec.operators[op])
            problems.append(problem(operands, ops))
        rng.shuffle(problems)
    else:
        seen: set[str] = set()
        problems = []
        while len(problems) < 20_000:
            expression, value = problem(
                [rng.randint(low, high) for _ in range(spec.num_operands)],
                [rng.choice(spec.operators) for _ in range(spec.num_operands - 1)],
            )
            if expression not in seen:
                seen.add(expression)
                problems.append((expression, value))
    train, held_out = [], []
    for expression, value in problems:
        example = Example(f"What is {expression}? {spec.instruction}", str(value), f"arithmetic:{expression}")
        (held_out if _is_held_out(expression, spec.eval_fraction, spec.seed) else train).append(example)
    return train, held_out


@source("calculator")
def calculator_problems(spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    """The arithmetic problems, meant to be solved with the calculator tool (``env=calculator``);
    ``rlctl sft`` turns them into demonstrations that call it."""
    return arithmetic(spec)


# --- files and hub datasets ----------------------------------------------------------------------


TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}  # read through `datasets`


def is_hub_id(path: str) -> bool:
    """ "org/name" with no such local path and no file suffix: a hub dataset id."""
    file = Path(path).expanduser()
    return not file.exists() and not file.suffix and not path.startswith((".", "/", "~")) and path.count("/") == 1


def read_rows(path: str, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Rows of a data file with their origin ("file:row", 1-based), in the formats `datasets` reads:
    JSONL, JSON (an array of objects, or one object per line), CSV, Parquet, Arrow, a folder written
    by `Dataset.save_to_disk` (a `DatasetDict` one gives its ``split``), or a hub id (``split``)."""
    file = Path(path).expanduser()
    if file.is_dir():
        return _saved_dataset_rows(file, split)
    if is_hub_id(path):
        return _hub_rows(path, None, split)
    if not file.is_file():
        raise RlctlError(f"data: file not found: {file}")
    if file.suffix in TABLE_FORMATS:
        return _table_rows(file, TABLE_FORMATS[file.suffix])
    if file.suffix == ".json" and file.read_text(encoding="utf-8").lstrip().startswith("["):
        return _json_array_rows(file)
    return _json_lines(file)


def _json_lines(file: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RlctlError(
                    f"data: {file}:{number} is not valid JSON ({err.msg}); is this a JSONL file? (JSONL, JSON, CSV, "
                    "Parquet, Arrow and save_to_disk folders are read by their suffix)"
                ) from None
            except UnicodeDecodeError:
                raise RlctlError(
                    f"data: {file} is not text; rlctl reads JSONL, JSON, CSV (.csv), Parquet (.parquet), Arrow (.arrow) "
                    "and save_to_disk folders, by their suffix"
                ) from None
            if not isinstance(row, dict):
                raise RlctlError(f"data: {file}:{number} is a JSON {type(row).__name__}, expected an object")
            rows.append((f"{file}:{number}", row))
    return rows


def _json_array_rows(file: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RlctlError(f"data: {file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    bad = next((i for i, row in enumerate(table) if not isinstance(row, dict)), None)
    if bad is not None:
        raise RlctlError(
            f"data: {file}: item {bad + 1} of the array is a JSON {type(table[bad]).__name__}, expected an object"
        )
    return [(f"{file}:{i + 1}", row) for i, row in enumerate(table)]


def _table_rows(file: Path, kind: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets  # imported here: loading it costs a second, and only these formats need it

    try:
        table = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as err:  # a malformed file: datasets and pyarrow raise many kinds
        raise RlctlError(f"data: {file} could not be read as {kind}: {_first_line(err)}") from None
    return [(f"{file}:{i + 1}", dict(row)) for i, row in enumerate(table)]


def _saved_dataset_rows(folder: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise RlctlError(
            f"data: {folder} is a folder but not one written by save_to_disk: {_first_line(err)}"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise RlctlError(f"data: {folder} has splits {sorted(saved)}, not {split!r}; pick one with data.split")
        saved = saved[split]
    return [(f"{folder}[{split}]:{i + 1}", dict(row)) for i, row in enumerate(saved)]


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


def gsm8k_final_answer(text: str) -> str:
    """GSM8K solutions end with "#### 1,234"; the answer is what follows, without thousands separators."""
    return text.split("####")[-1].strip().replace(",", "")


def rows_to_examples(rows: list[tuple[str, dict[str, Any]]], spec: SourceSpec) -> list[Example]:
    examples = []
    for origin, row in rows:
        if spec.prompt_field not in row:
            raise RlctlError(f"data: row {origin} has no field {spec.prompt_field!r} (fields: {sorted(row)})")
        if spec.answer_field not in row:  # prompt-only: fine for a reward that reads no answer (build checks)
            examples.append(Example(row[spec.prompt_field], None, origin))
            continue
        prompt, answer = row[spec.prompt_field], row[spec.answer_field]
        if not isinstance(prompt, (str, list)) or not prompt:
            raise RlctlError(
                f"data: row {origin}: field {spec.prompt_field!r} must be a non-empty string or chat messages"
            )
        if isinstance(prompt, list) and not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
            raise RlctlError(f"data: row {origin}: chat messages need 'role' and 'content' in every message")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
            raise RlctlError(
                f"data: row {origin}: field {spec.answer_field!r} must be a non-empty string or number, got {answer!r}"
            )
        answer = str(answer)
        if spec.answer_format == "gsm8k":
            answer = gsm8k_final_answer(answer)
        elif spec.answer_format != "plain":
            raise RlctlError(f"data.answer_format: unknown format {spec.answer_format!r}; known: ['gsm8k', 'plain']")
        examples.append(Example(prompt, answer, origin))
    return examples


def split_held_out(examples: list[Example], spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded, fixed share of rows when the source has no held-out split."""
    order = list(range(len(examples)))
    random.Random(spec.seed).shuffle(order)
    n_held = max(1, int(len(examples) * spec.eval_fraction)) if len(examples) > 1 else 0
    held = set(order[:n_held])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n_held]]


@source("jsonl")
def jsonl(spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    if not spec.path:
        raise RlctlError("data.path: the jsonl source needs a file (data.path=/path/to/train.jsonl)")
    examples = rows_to_examples(read_rows(spec.path, spec.split), spec)
    if spec.eval_path:
        return examples, rows_to_examples(read_rows(spec.eval_path, spec.eval_split), spec)
    return split_held_out(examples, spec)


def _hub_rows(dataset_id: str, subset: str | None, split: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets  # imported here: loading it costs a second, and only hub sources need it

    try:
        table = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as err:  # datasets raises many types for "not found / offline"
        offline = " (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: no hub here)" if _offline() else ""
        raise RlctlError(
            f"data: cannot load hub dataset {dataset_id!r} (subset {subset!r}, split {split!r}){offline}: {_first_line(err)}"
        ) from None
    return [(f"{dataset_id}[{split}]:{i + 1}", dict(row)) for i, row in enumerate(table)]


def _offline() -> bool:
    import os

    return any(os.environ.get(k, "0") not in ("", "0", "false") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@source("hf")
def hub(spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    if not spec.path:
        raise RlctlError("data.path: the hf source needs a dataset id (data.path=org/name)")
    train = rows_to_examples(_hub_rows(spec.path, spec.subset, spec.split), spec)
    return train, rows_to_examples(_hub_rows(spec.path, spec.subset, spec.eval_split), spec)


@source("gsm8k")
def gsm8k(spec: SourceSpec) -> tuple[list[Example], list[Example]]:
    """GSM8K: a local JSONL when data.path is set (works offline), else the hub's openai/gsm8k."""
    if spec.path:
        return jsonl(spec)
    return hub(SourceSpec(**{**spec.__dict__, "path": "openai/gsm8k", "subset": spec.subset or "main"}))
