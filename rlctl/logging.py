"""Metric sinks: rich console, a JSONL file, Weights & Biases. The loop calls a ``Loggers`` that
fans out to whichever sinks are on, so it never needs ``if logger:``."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from rlctl.errors import RlctlError, check_fields

SUMMARY_KEYS = (("reward/mean", "reward"), ("accuracy", "acc"), ("kl", "kl"), ("loss/policy", "loss"),
                ("response_len/mean", "len"), ("loss/rm", "loss"), ("loss/judge", "loss"), ("rm/accuracy", "acc"),
                ("rm/margin", "margin"), ("loss/sft", "loss"), ("loss/dpo", "loss"), ("dpo/accuracy", "acc"),
                ("dpo/reward_margin", "margin"))  # fmt: skip


@dataclass(frozen=True)
class LogSpec:
    """The ``logger`` config group, filled by field name."""

    console: bool  # rich progress bar and sample tables
    sample_every: int  # steps between sample tables (0 = never)
    samples_shown: int  # rows per sample table
    wandb: bool  # also log to Weights & Biases
    wandb_project: str
    wandb_entity: str | None

    def __post_init__(self) -> None:
        check_fields(self, [(key, getattr(self, key) >= 0, "must be ≥ 0") for key in ("sample_every", "samples_shown")])


class Sink(Protocol):
    def metrics(self, values: dict[str, float], step: int) -> None: ...
    def samples(self, rows: list[dict[str, Any]], step: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def step_line(values: dict[str, float], step: int, total: int) -> str | None:
    """The one-line summary of a training step (None for rows that are not steps, e.g. evaluations)."""
    if "time/step_s" not in values:  # evaluation results are printed by message()
        return None
    parts = [f"{short} {_fmt(values[key])}" for key, short in SUMMARY_KEYS if key in values]
    seconds = f"  {values['time/step_s']:.1f}s" if "time/step_s" in values else ""
    return f"step {step}/{total}  " + "  ".join(parts) + seconds


def samples_table(rows: list[dict[str, Any]], step: int) -> Table:
    """Prompt, completion, answer, reward and whether `accuracy` counts it correct (reward.accuracy)."""
    table = Table(title=f"samples at step {step}", show_lines=True)
    for column in ("prompt", "completion", "answer", "reward", "correct"):
        table.add_column(column, overflow="fold")
    for row in rows:
        correct = {True: "yes", False: "no"}.get(row.get("correct"), "")
        table.add_row(escape(str(row["prompt"])), escape(row["completion"]), escape(str(row["answer"])),
                      _fmt(row["reward"]), correct)  # fmt: skip
    return table


class ConsoleSink:
    """A progress bar with ETA, a one-line summary per step, and a periodic table of samples."""

    def __init__(self, total_steps: int, console: Console | None = None):
        self.console = console or Console()
        self.total = total_steps
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True,
        )  # fmt: skip
        self.task = self.progress.add_task("train", total=total_steps)
        self.progress.start()

    def metrics(self, values: dict[str, float], step: int) -> None:
        line = step_line(values, step, self.total)
        if line is not None:
            self.progress.console.print(line)
            self.progress.update(self.task, completed=step)

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.progress.console.print(samples_table(rows, step))

    def message(self, text: str) -> None:
        self.progress.console.print(text, soft_wrap=True)  # a long line wraps in the terminal, not in the log

    def close(self) -> None:
        self.progress.stop()


LIBRARY_LOGGERS = ("", "transformers", "DeepSpeed", "torch")  # "" is the root logger


class LogFileSink:
    """``train.log``: what the console shows (markup stripped), plus the warnings libraries log.
    Appends, so a resumed run keeps its earlier lines."""

    def __init__(self, path: Path, total_steps: int):
        self.total = total_steps
        self.handle = path.open("a", encoding="utf-8")
        self.console = Console(file=self.handle, width=120, no_color=True, highlight=False, soft_wrap=True)
        self.handler = _FileHandler(self)
        for name in LIBRARY_LOGGERS:  # the root logger, and libraries that do not propagate to it
            logging.getLogger(name).addHandler(self.handler)
        logging.captureWarnings(True)

    def write(self, text: str) -> None:
        self.handle.write(Text.from_markup(text).plain.rstrip("\n") + "\n")
        self.handle.flush()

    def metrics(self, values: dict[str, float], step: int) -> None:
        line = step_line(values, step, self.total)
        if line is not None:
            self.write(line)

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.console.print(samples_table(rows, step))
        self.handle.flush()

    def message(self, text: str) -> None:
        self.write(text)

    def close(self) -> None:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handle.close()


class _FileHandler(logging.Handler):
    def __init__(self, sink: LogFileSink):
        super().__init__(level=logging.WARNING)
        self.sink = sink
        self.last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record is self.last:  # attached to a library's logger and to the root: one record, one line
            return
        self.last = record
        try:
            self.sink.handle.write(f"{record.levelname.lower()}: {record.getMessage()}\n")
            self.sink.handle.flush()
        except ValueError:  # closed
            pass


def append_to_log(run_dir: Path, text: str) -> None:
    """Add a line (e.g. the error that ended the run) to ``RUN/train.log``."""
    if run_dir.is_dir():
        with (run_dir / "train.log").open("a", encoding="utf-8") as handle:
            handle.write(Text.from_markup(text).plain + "\n")


class JsonlSink:
    """One JSON object per line: {"step": n, "time": unix seconds, metric: value, ...}."""

    def __init__(self, path: Path):
        self.handle = path.open("a", encoding="utf-8")

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.handle.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.handle.flush()

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.handle.close()


class WandbSink:
    """Weights & Biases; WANDB_MODE=offline works without a network."""

    def __init__(self, project: str, entity: str | None, run_dir: Path, config: dict[str, Any]):
        import wandb  # imported here: wandb is slow to import and only needed when enabled

        self.wandb = wandb
        try:
            self.run = wandb.init(project=project, entity=entity, dir=str(run_dir), config=config, name=run_dir.name)
        except Exception as err:  # no login, no network, a bad entity: wandb raises several kinds
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RlctlError(
                f"logger.wandb: W&B could not start a run ({type(err).__name__}: {first}); log in with `wandb login`, "
                "or set WANDB_MODE=offline to keep the W&B run on disk"
            ) from None

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        columns = ["prompt", "completion", "answer", "reward", "correct"]
        table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({"samples": table}, step=step)

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fans out to the sinks that are on; with no sinks every call does nothing."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def metrics(self, values: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.metrics(values, step)

    def samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for sink in self.sinks:
            sink.samples(rows, step)

    def message(self, text: str) -> None:
        for sink in self.sinks:
            sink.message(text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def seconds_since_start() -> float:
    """Wall seconds since this process started (imports, model loads and all), as `time` would say."""
    import psutil  # a dependency of deepspeed and accelerate

    return time.time() - psutil.Process().create_time()


class Timer:
    """Seconds spent in named sections of a step: ``with timer("rollout"): ...`` -> ``time/rollout_s``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}_s"] = self.seconds.get(f"time/{name}_s", 0.0) + time.perf_counter() - start
