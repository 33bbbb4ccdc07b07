"""Write docs/reference.md, the configuration reference, from the schemas in rlctl/config.py.

    python scripts/config_reference.py           # rewrite docs/reference.md
    python scripts/config_reference.py --check   # exit 1 if docs/reference.md is stale

Every key of every command, with its type (from the schema's annotation), its default as the
command composes it (the schema's default, or what the command's config groups set) and the
comment the schema gives it. tests/test_docs.py fails when the file differs from what this writes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_SOURCE = ROOT / "rlctl" / "config.py"
REFERENCE = ROOT / "docs" / "reference.md"
COMMANDS = ("train", "sft", "rm", "dpo", "eval", "generate")


def schema_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): comment} from the source of config.py: a field's comment is the
    one on its own line(s), or else the comment lines just above it."""
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            own = [comments[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments]
            if not own:
                above, n = [], item.lineno - 1
                while n >= 1 and lines[n - 1].strip().startswith("#"):
                    above.insert(0, comments[n])
                    n -= 1
                own = above
            found[(node.name, item.target.id)] = " ".join(c for c in own if c != "fmt: skip").strip()
    return found


def annotations(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): the annotation as written}."""
    return {
        (node.name, item.target.id): ast.unparse(item.annotation)
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
        for item in node.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }


NEWLINE = "\\n"  # a default with line breaks shows them as \n, keeping its table row on one line


def composed_defaults(command: str):
    """The command's config as `rlctl COMMAND` composes it with no overrides, interpolations unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlctl.cli import CONF_DIR
    from rlctl.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(command)


def show(value) -> str:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list):
        return "`[" + ", ".join(_plain(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}`"
    return f"`{value}`"


def _plain(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def rows(schema: type, node, prefix: str, comments, types) -> list[tuple[str, str, str, str]]:
    from omegaconf import Container, OmegaConf

    """(key, type, default, meaning) for every leaf key under ``schema``; a list of dataclasses
    (reward.terms) is shown whole and its elements' keys as ``key[].field``."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            out += rows(kind, node[f.name], f"{key}.", comments, types)
            continue
        child = node._get_node(f.name)
        # unresolved: a `${...}` default stays as written
        value = OmegaConf.to_container(child, resolve=False) if isinstance(child, Container) else child._value()
        owner = _declaring_class(schema, f.name)
        out.append((key, types[(owner, f.name)], show(value), comments[(owner, f.name)]))
        args = typing.get_args(kind)
        element = args[0] if typing.get_origin(kind) is list and args else None
        if element is not None and dataclasses.is_dataclass(element):
            for sub in dataclasses.fields(element):
                default = sub.default if sub.default is not dataclasses.MISSING else sub.default_factory()
                owner = _declaring_class(element, sub.name)
                out.append(
                    (f"{key}[].{sub.name}", types[(owner, sub.name)], show(default), comments[(owner, sub.name)])
                )
    return out


def _declaring_class(schema: type, name: str) -> str:
    """The class in the schema's bases whose body declares the field (SFTDataConfig inherits DataConfig's)."""
    return next(c.__name__ for c in schema.__mro__ if name in getattr(c, "__annotations__", {}))


def group_options() -> list[tuple[str, list[tuple[str, str]]]]:
    """Every config group in conf/ with its options and each option's first comment line."""
    from rlctl.cli import CONF_DIR

    groups = []
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = []
        for option in sorted(folder.glob("*.yaml")):
            head = []  # the leading comment block, the option's own description
            for line in option.read_text().splitlines():
                if not line.startswith("#"):
                    break
                if "@package" not in line:
                    head.append(line.lstrip("# ").strip())
            options.append((option.stem, " ".join(head)))
        groups.append((folder.name, options))
    return groups


def render() -> str:
    from rlctl.config import SCHEMAS

    source = CONFIG_SOURCE.read_text()
    comments, types = schema_comments(source), annotations(source)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python scripts/config_reference.py` from rlctl/config.py and conf/; do not edit."
        " tests/test_docs.py fails when it is stale. -->",
        "",
        "Every key of every command: its type, its default as that command composes it (the schema's",
        "default, or what the command's default config groups set) and what it means. Set any key with",
        "`key=value` (`optim.lr=1e-5`), pick a group's option with `group=option` (`algo=ppo`). A key",
        "that is not here is an error naming it. `${...}` defaults are resolved at start-up.",
        "",
        "Commands: " + ", ".join(f"[`rlctl {c}`](#rlctl-{c})" for c in COMMANDS) + "; [config groups](#config-groups).",
        "",
        "## Config groups",
        "",
        "`group=option` loads `conf/GROUP/OPTION.yaml`, which sets keys of that group.",
        "",
        "| group | option | what it sets |",
        "|---|---|---|",
    ]
    for group, options in group_options():
        for i, (option, line) in enumerate(options):
            out.append(f"| {'`' + group + '`' if i == 0 else ''} | `{option}` | {line} |")
    for command in COMMANDS:
        schema = SCHEMAS[command]
        cfg = composed_defaults(command)
        out += ["", f"## rlctl {command}", "", f"Schema: `{schema.__name__}`.", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]  # fmt: skip
        for key, kind, default, meaning in rows(schema, cfg, "", comments, types):
            out.append(f"| `{key}` | `{kind.replace('|', '&#124;')}` | {default.replace('|', '&#124;').replace(chr(10), NEWLINE)} | "
                       f"{meaning.replace('|', '&#124;')} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not REFERENCE.exists() or REFERENCE.read_text() != text:
            print(f"{REFERENCE.relative_to(ROOT)} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        print(f"{REFERENCE.relative_to(ROOT)} is up to date")
        return 0
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
