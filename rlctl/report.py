"""Reporting: curves of a run as a PNG, a model card for the final checkpoint, a sweep's closing table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlctl.errors import RlctlError

CURVES = (("reward/mean", "reward"), ("accuracy", "accuracy (train samples)"), ("kl", "KL to reference"),
          ("response_len/mean", "response length (tokens)"))  # fmt: skip
# `rlctl rm` runs: what each panel shows, and the held-out key drawn on the accuracy panel.
RM_CURVES = (("loss/rm", "Bradley-Terry loss"), ("rm/accuracy", "pairwise accuracy (train pairs)"),
             ("rm/margin", "r_chosen − r_rejected"), ("grad_norm", "gradient norm"))  # fmt: skip
JUDGE_CURVES = (("loss/judge", "cross-entropy of the Yes/No answer"), ("rm/accuracy", "pairwise accuracy (train pairs)"),
                ("rm/margin", "P(Yes | chosen) − P(Yes | rejected)"), ("judge/p_yes_chosen", "P(Yes | chosen)"))  # fmt: skip
SFT_CURVES = (("loss/sft", "token NLL of the completions"), ("grad_norm", "gradient norm"), ("lr", "learning rate"),
              ("time/step_s", "seconds per step"))  # fmt: skip
DPO_CURVES = (("loss/dpo", "preference loss"), ("dpo/accuracy", "preference accuracy (train pairs)"),
              ("dpo/reward_margin", "implicit reward margin"), ("dpo/reward_chosen", "implicit reward of chosen"))  # fmt: skip
# The step key a command's metrics rows hold -> (its panels, the panel the held-out results join, their key).
PANELS = {"reward/mean": (CURVES, "accuracy", "accuracy"), "loss/rm": (RM_CURVES, "rm/accuracy", "pairwise_accuracy"),
          "loss/judge": (JUDGE_CURVES, "rm/accuracy", "pairwise_accuracy"),
          "loss/sft": (SFT_CURVES, "loss/sft", "loss"), "loss/dpo": (DPO_CURVES, "dpo/accuracy", "preference_accuracy")}  # fmt: skip
STEP_KEYS = tuple(PANELS)  # a metrics row holding one of these is a training step
SWEEP_COLUMNS = ("reward/mean", "accuracy", "kl", "response_len/mean")
# Per command: the last step's metrics a sweep table shows, and the held-out result of eval.json it compares.
SWEEP_OF = {"train": (SWEEP_COLUMNS, "accuracy"), "sft": (("loss/sft", "sft/token_nll"), "loss"),
            "dpo": (("loss/dpo", "dpo/accuracy", "dpo/reward_margin"), "preference_accuracy"),
            "rm": (("loss/rm", "loss/judge", "rm/accuracy"), "pairwise_accuracy")}  # fmt: skip
SHORT_NAMES = {"reward/mean": "reward", "accuracy": "acc", "response_len/mean": "len", "eval before": "before",
               "eval after": "after"}  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Per-step rows of metrics.jsonl (the last row wins when a resumed run repeated a step)."""
    file = Path(run_dir) / "metrics.jsonl"
    if not file.exists():
        raise RlctlError(f"report: no metrics.jsonl in {run_dir}")
    by_step: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in file.read_text().splitlines():
        row = json.loads(line)
        if any(key in row for key in STEP_KEYS):
            by_step[row["step"]] = row
        elif any(key.startswith("eval/") for key in row):
            evals.setdefault(row["step"], {}).update(row)  # a step may log several eval rows (a warning)
    rows = [by_step[k] for k in sorted(by_step)]
    for row in rows:
        row.update({k: v for k, v in evals.get(row["step"], {}).items() if k.startswith("eval/")})
    return rows


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The held-out evaluations of metrics.jsonl by step, before training (step 0) included."""
    evals: dict[int, dict[str, Any]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if any(key.startswith("eval/") for key in row) and not any(key in row for key in STEP_KEYS):
            evals.setdefault(row["step"], {}).update(row)
    return [evals[step] for step in sorted(evals)]


def plot_gold(ax, evaluations: list[dict[str, Any]], gold_name: str) -> None:
    """The over-optimisation panel: the trained reward (left axis) and the gold reward (right axis) on held-out prompts."""
    points = [(e["step"], e["eval/reward_mean"], e["eval/gold_mean"]) for e in evaluations if "eval/gold_mean" in e]
    steps, trained, gold = zip(*points)
    ax.plot(steps, trained, marker="o", color="tab:blue", label="trained reward")
    ax.set_ylabel("trained reward", color="tab:blue")
    twin = ax.twinx()
    twin.plot(steps, gold, marker="s", color="tab:red", label=f"gold ({gold_name})")
    twin.set_ylabel(f"gold: {gold_name}", color="tab:red")
    ax.set_title("held-out: the trained reward and the gold reward (over-optimisation shows as a gap opening)")
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")


def plot_run(run_dir: Path) -> Path:
    """Write ``RUN/curves.png``: reward, accuracy (train and held-out), KL and response length by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(run_dir)
    if not rows:
        raise RlctlError(f"report: {run_dir}/metrics.jsonl holds no training steps yet")
    curves, accuracy_key, held_out_key = next(PANELS[key] for key in STEP_KEYS if key in rows[0])
    evals = [(r["step"], r[f"eval/{held_out_key}"]) for r in rows if f"eval/{held_out_key}" in r]
    eval_file = Path(run_dir) / "eval.json"
    if eval_file.exists():
        both = json.loads(eval_file.read_text())
        if (both.get("before") or {}).get(held_out_key) is not None:
            evals.insert(0, (0, both["before"][held_out_key]))
        if (both.get("after") or {}).get(held_out_key) is not None:
            evals.append((rows[-1]["step"], both["after"][held_out_key]))
    evaluations = read_evaluations(run_dir)
    gold = any("eval/gold_mean" in e for e in evaluations)
    figure = plt.figure(figsize=(10, 10.5 if gold else 7))
    grid = figure.add_gridspec(3 if gold else 2, 2)
    axes = np.array([[figure.add_subplot(grid[row, col]) for col in range(2)] for row in range(2)])
    for ax, (key, title) in zip(axes.flat, curves):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker=".", label="training batch")
        if key == accuracy_key and evals:
            ax.plot(*zip(*sorted(set(evals))), marker="o", label="held-out")
            ax.legend()
        if not points and key == "kl":
            ax.text(0.5, 0.5, "no reference model (β = 0)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    if gold:
        config_file = Path(run_dir) / "config.yaml"
        name = "gold"
        if config_file.exists():
            import yaml

            name = (yaml.safe_load(config_file.read_text()).get("eval") or {}).get("gold") or name
        plot_gold(figure.add_subplot(grid[2, :]), evaluations, name)
    figure.suptitle(Path(run_dir).name)
    figure.tight_layout()
    out = Path(run_dir) / "curves.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _reward_terms(reward: dict[str, Any]) -> str:
    """ "reward_model (runs/rm) × 1, exact_number × 0": what the policy was rewarded by."""
    if reward.get("fn"):
        return reward["fn"]
    where = {"reward_model": reward.get("model_path"), "http": reward.get("url")}
    parts = []
    for term in reward["terms"]:
        source = where.get(term["name"])
        parts.append(f"{term['name']}{f' ({source})' if source else ''} × {term['weight']:g}")
    return ", ".join(parts)


def model_card(run_dir: Path, config: dict[str, Any], command: str, best: dict | None = None) -> str:
    """README.md text for the final checkpoint (or, given its ``best.json``, for checkpoints/best):
    base model, algorithm, data, results, how to reproduce."""
    rows = read_metrics(run_dir)
    eval_file = Path(run_dir) / "eval.json"
    evaluation = json.loads(eval_file.read_text()) if eval_file.exists() else {}
    last = rows[-1] if rows else {}
    best_line = []
    if evaluation.get("best"):
        b = evaluation["best"]
        gold = f", gold ({config['eval'].get('gold')}) {b['gold_mean']:.3f}" if b.get("gold_mean") is not None else ""
        where = "This folder holds" if best is not None else "`checkpoints/best` holds"
        best_line = [f"- {where} the policy of step {b['step']}, the best by held-out {b['by']}: trained reward "
                     f"{b['reward_mean']:.3f}{gold}"]  # fmt: skip
    lines = [
        "---", "library_name: transformers", "tags: [rlctl, reinforcement-learning]",
        f"base_model: {config['model']['path']}", "---", "",
        f"# {config['model']['name']} trained with {config['algo']['name']} by rlctl", "",
        f"- base model: `{config['model']['path']}`",
        f"- algorithm: `{config['algo']['name']}` (advantage `{config['algo']['advantage']}`, loss "
        f"`{config['algo']['policy_loss']}`, KL β {config['algo']['kl_coef']})",
        f"- data: `{config['data']['source']}`" + (f" from `{config['data']['path']}`" if config["data"].get("path") else ""),
        f"- reward: {_reward_terms(config['reward'])}",
        f"- steps: {last.get('step', 0)} × {config['prompts_per_step']} prompts × {config['algo']['group_size']} completions",
        *best_line, "", "## Results", "",
    ]  # fmt: skip
    if all("accuracy" in (evaluation.get(k) or {}) for k in ("before", "after")):
        lines += ["| held-out | before | after |", "|---|---|---|"]
        for key in ("accuracy", "reward_mean", "gold_mean"):
            if key in evaluation["before"] and key in evaluation["after"]:
                lines.append(f"| {key} | {evaluation['before'][key]:.3f} | {evaluation['after'][key]:.3f} |")
    if last:
        lines += ["", "Last training step: " + ", ".join(f"{k} {last[k]:.4g}" for k in SWEEP_COLUMNS if k in last)]
    lines += ["", "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)


def rm_model_card(run_dir: Path, config: dict[str, Any], command: str) -> str:
    """README.md of a reward model: base model, data, held-out pairwise accuracy, how to use it."""
    eval_file = Path(run_dir) / "eval.json"
    evaluation = json.loads(eval_file.read_text()) if eval_file.exists() else {}
    rows = read_metrics(run_dir)
    data = config["data"]
    judge = config.get("head") == "judge"
    what = (("A judge: this causal LM, asked `judge_template` about one reply, answers \"Yes\" for a good reply and "
             "\"No\" for a bad one; its score is P(Yes) / (P(Yes) + P(No)). Trained on preference pairs (Yes for "
             f"the chosen reply, No for the rejected one) under the template:\n\n    {config['judge_template']!r}")
            if judge else
            ("A one-label sequence classifier: the score of a whole conversation (prompt + reply, in the chat "
             "template of this folder's tokenizer), trained with the Bradley-Terry loss on preference pairs."))  # fmt: skip
    use = (
        "rlctl train reward=judge reward.judge.model_path=THIS_FOLDER"
        if judge
        else "rlctl train reward=model reward.model_path=THIS_FOLDER"
    )
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {'text-generation' if judge else 'text-classification'}",
        f"tags: [rlctl, {'judge' if judge else 'reward-model'}]", f"base_model: {config['model']['path']}", "---", "",
        f"# A {'judge' if judge else 'reward model'} from {config['model']['name']}, trained by rlctl", "", what, "",
        f"- base model: `{config['model']['path']}`",
        f"- data: `{data['source']}`" + (f" from `{data['path']}`" if data.get("path") else ""),
        f"- steps: {rows[-1]['step'] if rows else 0} × {config['pairs_per_step']} pairs",
        "", "## Results", "",
    ]  # fmt: skip
    if evaluation.get("before") and evaluation.get("after"):
        lines += ["| held-out pairs | before | after |", "|---|---|---|"]
        for key in [k for k in evaluation["after"] if k.startswith("pairwise_accuracy")] + ["margin_mean"]:
            lines.append(f"| {key} | {evaluation['before'][key]:.3f} | {evaluation['after'][key]:.3f} |")
    loads = "AutoModelForCausalLM" if judge else "AutoModelForSequenceClassification"
    lines += ["", "## Use", "", "```", use, "```", "", f"or `{loads}.from_pretrained(THIS_FOLDER)`.", "",
              "## Reproduce", "", "```", command, "```", ""]  # fmt: skip
    return "\n".join(lines)


STAGE_TITLES = {"sft": ("supervised fine-tuning", "examples_per_step", "demonstrations", ("loss", "accuracy")),
                "dpo": ("DPO", "pairs_per_step", "pairs", ("preference_accuracy", "reward_margin", "accuracy"))}  # fmt: skip


def stage_model_card(stage: str, run_dir: Path, config: dict[str, Any], command: str) -> str:
    """README.md of a model from ``rlctl sft`` or ``rlctl dpo``: base model, data, held-out results, use."""
    title, per_step_key, unit, keys = STAGE_TITLES[stage]
    eval_file = Path(run_dir) / "eval.json"
    evaluation = json.loads(eval_file.read_text()) if eval_file.exists() else {}
    rows = read_metrics(run_dir)
    data = config["data"]
    lines = [
        "---", "library_name: transformers", f"tags: [rlctl, {stage}]", f"base_model: {config['model']['path']}", "---", "",
        f"# {config['model']['name']} after {title} by rlctl", "",
        f"- base model: `{config['model']['path']}`",
        f"- data: `{data['source']}`" + (f" from `{data['path']}`" if data.get("path") else ""),
        f"- steps: {rows[-1]['step'] if rows else 0} × {config[per_step_key]} {unit}",
        "", "## Results", "",
    ]  # fmt: skip
    before, after = evaluation.get("before") or {}, evaluation.get("after") or {}
    shown = [k for k in keys if k in before and k in after]
    if shown:
        lines += ["| held-out | before | after |", "|---|---|---|"]
        lines += [f"| {key} | {before[key]:.3f} | {after[key]:.3f} |" for key in shown]
    lines += ["", "## Use", "", "```", "rlctl train model.path=THIS_FOLDER", "rlctl eval model.path=THIS_FOLDER", "```",
              "", "## Reproduce", "", "```", command, "```", ""]  # fmt: skip
    return "\n".join(lines)


def sweep_table(sweep_dir: Path, console: Console | None = None, command: str = "train") -> Table:
    """A table of every job under a multirun folder: its overrides, final metrics, held-out result
    (``command``'s: accuracy for train, loss for sft, preference or pairwise accuracy for dpo and rm).
    Printed, and written beside the jobs as ``summary.md`` and ``summary.jsonl``; a failed job is
    marked failed with its error."""
    from rich import box

    columns, result_key = SWEEP_OF[command]
    table = Table(title=f"sweep {sweep_dir}", box=box.SIMPLE_HEAD)  # light borders: room for the columns
    table.add_column("job")
    table.add_column("overrides", overflow="fold", min_width=20)  # wraps; never squeezed out
    for column in (*columns, "eval before", "eval after"):
        table.add_column(SHORT_NAMES.get(column, column), justify="right")
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    overrides_of = {}
    for job in jobs:
        file = job / ".hydra" / "overrides.yaml"
        overrides_of[job] = (
            [line.lstrip("- ").strip() for line in file.read_text().splitlines()] if file.exists() else []
        )
    shared = set.intersection(*(set(o) for o in overrides_of.values())) if len(jobs) > 1 else set()
    every_job = " ".join(o for o in next(iter(overrides_of.values())) if o in shared) if shared else ""
    if every_job:
        table.caption = "every job: " + every_job
    records = []
    for job in jobs:
        overrides = " ".join(o for o in overrides_of[job] if o not in shared)
        record: dict[str, Any] = {"job": int(job.name), "overrides": overrides}
        failed = job / "FAILED"
        try:
            last = {} if failed.exists() else read_metrics(job)[-1]
        except (RlctlError, IndexError):
            last = {}
        if not last:
            error = failed.read_text().strip() if failed.exists() else "no metrics"
            record.update(status="failed", error=error)
            table.add_row(
                job.name,
                f"{overrides}\n[red]failed: {error}[/red]",
                *["[red]failed[/red]"] + [""] * (len(columns) + 1),
            )
            records.append(record)
            continue
        evaluation = json.loads((job / "eval.json").read_text()) if (job / "eval.json").exists() else {}
        record.update(status="done", **{k: last[k] for k in columns if k in last})
        record.update({f"eval_{k}": evaluation[k][result_key] for k in ("before", "after")
                       if result_key in (evaluation.get(k) or {})})  # fmt: skip
        cells = [f"{last[k]:.4g}" if k in last else "-" for k in columns]
        cells += [f"{evaluation[k][result_key]:.3f}" if result_key in (evaluation.get(k) or {}) else "-"
                  for k in ("before", "after")]  # fmt: skip
        table.add_row(job.name, overrides, *cells)
        records.append(record)
    (console or Console()).print(table)
    _write_summary(Path(sweep_dir), records, every_job, columns, result_key)
    return table


def _write_summary(sweep_dir: Path, records: list[dict[str, Any]], every_job: str, metrics: tuple[str, ...],
                   result_key: str) -> None:  # fmt: skip
    with (sweep_dir / "summary.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    columns = ["job", "status", "overrides", *metrics, "eval_before", "eval_after", "error"]
    lines_head = [f"held-out result (eval_before, eval_after): {result_key}", ""]
    used = [c for c in columns if any(c in r for r in records)]
    lines = [f"# sweep {sweep_dir}", "", *lines_head] + ([f"Every job: `{every_job}`", ""] if every_job else [])
    lines += ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for record in records:
        cells = [record.get(c, "") for c in used]
        lines.append(
            "| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c).replace("|", "\\|") for c in cells) + " |"
        )
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
