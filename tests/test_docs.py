"""The documentation stays true: the configuration reference is what the schema generates, every
`rlctl …` command in the README and docs/ composes and passes the checks its command runs before
loading a model, and every relative link (and its #anchor) resolves."""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MISTAKES = ROOT / "docs" / "mistakes.md"
HYDRA_APPS = ("train", "sft", "rm", "dpo", "eval", "generate")
OTHER_COMMANDS = ("recipes", "report", "doctor", "--version", "--help")
# Words the docs write for "your value here", and a value that stands for each.
PLACEHOLDERS = {"RUN_DIR": "runs/example", "RUN": "runs/example", "NAME": "smoke", "URL": "http://127.0.0.1:8000/score",
                "PATH": "runs/example", "[overrides]": ""}  # fmt: skip


def _config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_what_the_schema_generates():
    reference = _config_reference()
    assert reference.REFERENCE.read_text() == reference.render(), (
        "docs/reference.md is stale: run `python scripts/config_reference.py` (make docs)"
    )


def test_every_schema_key_has_a_comment_in_the_reference():
    reference = _config_reference()
    rows = [line for line in reference.render().splitlines() if line.startswith("| `") and line.count("|") >= 5]
    undocumented = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert rows and not undocumented, f"keys without a comment in rlctl/config.py: {undocumented}"


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/algorithms.md:12"
    text: str  # as written, from `rlctl` on


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of code: indented blocks and ``` fences; continuation lines joined."""
    out, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        if not pending:
            start = number
        pending += " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append((start, pending.strip()))
        pending = ""
    return out


def doc_commands() -> list[DocCommand]:
    """Every `rlctl …` command of the README and docs/: each line of a code block that runs rlctl
    (directly, after `&&`, or as `-m rlctl` under a launcher), and each inline `rlctl …` span."""
    found = []
    for path in DOCS:
        text, name = path.read_text(), path.relative_to(ROOT)
        for number, line in _code_lines(text):
            line = re.split(r"\s+#\s", line)[0]  # a trailing comment
            for part in line.split("&&"):
                match = re.search(r"(?:^|\s-m\s|^\S+=\S+\s)(rlctl\s.*|rlctl$)", part.strip())
                if match and not part.strip().startswith("#"):
                    found.append(DocCommand(f"{name}:{number}", match.group(1).strip()))
        for number, line in enumerate(text.splitlines(), 1):
            for span in re.findall(r"`(rlctl [^`]+)`", line):
                found.append(DocCommand(f"{name}:{number}", span.strip()))
    return found


def _words(command: str) -> list[str]:
    for word, value in PLACEHOLDERS.items():
        command = re.sub(rf"(?<![\w.]){re.escape(word)}(?![\w])", value, command)
    return shlex.split(command)


def _first_of_sweep(override: str) -> str:
    key, _, value = override.partition("=")
    return f"{key}={value.split(',')[0]}" if "[" not in value and "{" not in value else override


def check_command(command: DocCommand) -> str:
    """Compose the command as its app would and run the checks it runs before loading a model.
    Returns what was checked; raises with the command's place in the docs when it fails."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlctl.cli import CONF_DIR
    from rlctl.config import SCHEMAS, check_known_keys, register_schemas
    from rlctl.distributed import Ranks

    words = _words(command.text)
    assert words[0] == "rlctl", command
    if any("…" in w or "..." in w or w.isupper() for w in words):  # "rlctl …", "rlctl COMMAND": a pattern
        return "template"
    name = words[1] if len(words) > 1 else "--help"
    if name in OTHER_COMMANDS:
        return "command"
    assert name in HYDRA_APPS, f"{command.where}: `{command.text}`: no command {name!r}"
    flags = {"--cfg", "job", "--help", "-m", "--multirun", "[overrides]"}
    sweep = "-m" in words or "--multirun" in words
    overrides = [_first_of_sweep(w) if sweep else w for w in words[2:] if w not in flags]
    if name in ("eval", "generate"):  # recipe=NAME: the CLI composes the recipe as train would, then drops it
        from rlctl.cli import _recipe_for

        _, overrides = _recipe_for(name, overrides)
    register_schemas()
    GlobalHydra.instance().clear()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlctl.errors import RlctlError

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(name, overrides=overrides)
        check_known_keys(cfg, SCHEMAS[name])
    except (HydraException, OmegaConfBaseException, RlctlError) as err:
        first = str(err).strip().splitlines()[0]
        raise AssertionError(f"{command.where}: `{command.text}` does not compose: {first}") from None
    from rlctl.build import read_train_settings
    from rlctl.data.demonstrations import load_demonstrations
    from rlctl.data.preferences import load_pairs
    from rlctl.dpo import read_dpo_settings
    from rlctl.rm import read_rm_settings
    from rlctl.sft import read_sft_settings

    # What each command checks before it loads a model: its settings, then (sft, rm, dpo) its data.
    checks = {"train": lambda: read_train_settings(cfg, Ranks()),
              "sft": lambda: load_demonstrations(*read_sft_settings(cfg, Ranks())[2:5]),
              "rm": lambda: load_pairs(read_rm_settings(cfg, Ranks())[1]),
              "dpo": lambda: load_pairs(read_dpo_settings(cfg, Ranks())[3])}  # fmt: skip
    if name not in checks:
        return "composed"
    try:
        checks[name]()
    except RlctlError as err:
        # A command that reads what an earlier command of the docs writes (a run folder, your reward
        # file) composes, and stops only at the missing file: the message names it.
        missing = [v.split(":")[0] for w in overrides for v in [w.partition("=")[2].strip("[]")]
                   if v and ("/" in v or v.endswith(".py") or ".py:" in v) and not (ROOT / v.split(":")[0]).exists()]  # fmt: skip
        if not any(m and m in str(err) for m in missing):
            raise AssertionError(f"{command.where}: `{command.text}` fails its checks: {err}") from None
        return "needs a file the docs make"
    return "dry run"


def _unique(commands: list[DocCommand]) -> list[DocCommand]:
    seen, out = set(), []
    for c in commands:
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out


def test_every_rlctl_command_in_the_docs_composes_and_passes_its_checks(monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' relative paths (../shared/data/…) are from the repository root
    commands = _unique([c for c in doc_commands() if not c.where.startswith(str(MISTAKES.relative_to(ROOT)))])
    results = {c.text: check_command(c) for c in commands}
    counts = {kind: sum(1 for r in results.values() if r == kind) for kind in set(results.values())}
    print(f"{len(results)} distinct commands: {counts}")
    assert len(results) >= 40, "the docs lost their commands?"
    assert counts.get("dry run", 0) >= 20


def test_the_mistakes_page_commands_are_refused(monkeypatch):
    # Its `rlctl …` spans are mistakes on purpose: each must fail its checks or its composition.
    monkeypatch.chdir(ROOT)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlctl.errors import RlctlError

    table = []  # the "you ran" cell of each row that starts with rlctl
    for number, line in enumerate(MISTAKES.read_text().splitlines(), 1):
        cells = line.split("|")
        spans = re.findall(r"`(rlctl [^`]+)`", cells[1]) if line.startswith("|") and len(cells) > 2 else []
        table += [DocCommand(f"docs/mistakes.md:{number}", span) for span in spans]
    assert len(table) >= 5
    for command in table:
        if command.text.strip() == "rlctl train":  # "where vLLM is not installed": needs another environment
            continue
        try:
            result = check_command(command)
        except (RlctlError, HydraException, OmegaConfBaseException, AssertionError, ValueError):
            continue
        if result in ("composed", "template"):  # eval and generate check values once they run; "…" is a pattern
            continue
        raise AssertionError(f"{command.where}: `{command.text}` is listed as a mistake but passes ({result})")


def test_the_command_extractor_catches_a_broken_command(monkeypatch):
    # What the docs test is for: a renamed key or option in a doc would fail like these.
    monkeypatch.chdir(ROOT)
    with pytest.raises(AssertionError, match=r"x.md:1: `rlctl train optim.lrr=1` does not compose: .*lrr"):
        check_command(DocCommand("x.md:1", "rlctl train optim.lrr=1"))
    with pytest.raises(AssertionError, match="dual_clip"):
        check_command(DocCommand("x.md:2", "rlctl train algo.dual_clip=0.5"))
    assert check_command(DocCommand("x.md:3", "rlctl train algo=ppo model=qwen-1.5b")) == "dry run"
    assert doc_commands_of("Run `rlctl eval model.path=RUN` or\n\n    rlctl sft a=1 \\\n        b=2   # note\n") == [
        "rlctl eval model.path=RUN", "rlctl sft a=1 b=2"]  # fmt: skip


def doc_commands_of(text: str) -> list[str]:
    spans = []
    for _, line in _code_lines(text):
        line = re.split(r"\s+#\s", line)[0]
        spans += [m.group(1).strip() for m in [re.search(r"(rlctl\s.*)", line)] if m]
    return [*re.findall(r"`(rlctl [^`]+)`", text), *spans]


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.add(github_anchor(line.lstrip("#")))
    return out


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                    continue
                file, _, fragment = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                if not linked.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (no such file)")
                elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = set(re.findall(r"\(docs/([\w\-]+\.md)\)", "\n".join(lines)))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
