"""`rlctl train | sft | rm | dpo | eval | generate | recipes | report | doctor`: compose the config with Hydra, call one function."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape

# In the source tree rlctl/conf links to the repo's conf/ (and conf/recipe to recipes/); a wheel
# carries both as package data, so an installed rlctl finds its configs from any folder.
CONF_DIR = Path(__file__).resolve().parent / "conf"
RECIPES_DIR = CONF_DIR / "recipe"

USAGE = """usage: rlctl COMMAND [overrides ...]

commands:
  train      train a policy with RL (default: GRPO on SmolLM2-135M, built-in arithmetic)
  sft        supervised fine-tuning on demonstrations (default: worked two-digit additions)
  rm         train a reward model from preference pairs (default: built-in arithmetic pairs)
  dpo        direct preference optimisation on preference pairs (default: built-in arithmetic pairs)
  eval       score a model or a run's checkpoint on held-out prompts
  generate   sample completions from a model and print them
  recipes    list ready experiments (run one with `rlctl train recipe=NAME`)
  report     redraw a run's curves.png and print its held-out results: rlctl report RUN_DIR
  doctor     library versions against the tested ones, the device, what a default run would use
  --version  print rlctl's version

Each command is a Hydra app: `rlctl train --help` lists the config groups,
`rlctl train --cfg job` prints the composed config, `rlctl train -m a=1,2` sweeps.
"""

err_console = Console(stderr=True)


def fail(message: str) -> None:
    """A user mistake: one line, no traceback, exit status 1."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(1)


def run_train(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.dry_run:
        return dry_run(cfg, run_dir)
    kept = [o for o in hydra_cfg.overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    return train_in(cfg, run_dir, " ".join(["rlctl train", *kept]))


def dry_run(cfg, run_dir: Path) -> None:
    """`rlctl train dry_run=true`: every config check and the batch layout, without loading weights."""
    import shutil
    import time

    from rlctl.build import check_reward_functions, read_train_settings, rollout_sequences
    from rlctl.plan import checked_model_shape, plan_for

    started = time.perf_counter()
    settings = read_train_settings(cfg)
    made_by_hydra = {".hydra", "train.log"}  # Hydra made the folder (and an empty log) for a run that will not happen
    if run_dir.is_dir() and all(
        p.name in made_by_hydra and (p.is_dir() or p.stat().st_size == 0) for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir)
    algo = settings.algo
    parts = [f"algo {algo.name} (advantage {algo.advantage}, loss {algo.policy_loss}, aggregation {algo.loss_agg})",
             f"critic {'yes' if algo.needs_values else 'no'}", f"reference {'yes' if algo.needs_reference else 'no'}",
             f"old log-probs {'stored before the first update' if algo.needs_old_logprobs(settings.layout.updates_per_step) else 'not needed (one update per step)'}"]  # fmt: skip
    if algo.trust_region:
        from rlctl.optim.trust_region import fisher_row_count

        fisher = fisher_row_count(settings.layout.minibatch_size, algo.fisher_fraction)
        parts.append(f"one trust-region step per minibatch (max_kl {algo.max_kl:g}), CG iterations {algo.cg_iters}, "
                     f"Fisher on {fisher} samples, line search of {algo.line_search_steps} tries")  # fmt: skip
    check_reward_functions(cfg.reward)
    shape = checked_model_shape(cfg, settings)  # from the model's config alone, before any weights load
    data_line = _data_line(cfg, settings)  # reads the data: its errors come before "config OK"
    print(f"config OK: model {cfg.model.path}, data {settings.source.source}, {cfg.steps} steps")
    print(data_line)
    print("; ".join(parts))
    if settings.env.enabled:
        # the environment starts on the first prompt, a tool call fits (hub data is not read by the dry run)
        if not data_line.startswith("data: hub dataset"):
            from rlctl.build import environment_prompt_tokens, first_task
            from rlctl.envs import environment_factory
            from rlctl.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
            environment_prompt_tokens(environment_factory(settings.env), tokenizer, cfg.data.chat_template,
                                      settings.sampling, first_task(cfg))  # fmt: skip
        print(settings.env.describe(settings.sampling.max_new_tokens))
    print(settings.layout.describe(algo.update_name))
    print(plan_for(cfg, settings, shape, rollout_sequences(cfg)))
    print(f"dry run: nothing loaded or trained ({time.perf_counter() - started:.1f}s)")


def _data_line(cfg, settings) -> str:
    """What the dry run says of the data: read and counted (every row checked), unless it is on the hub."""
    from rlctl.build import data_warnings, read_examples
    from rlctl.data.sources import is_hub_id

    source = settings.source
    if source.source == "hf" or (source.source == "gsm8k" and not source.path) or is_hub_id(source.path or "."):
        return f"data: hub dataset {source.path or 'openai/gsm8k'}: read when the run starts, not by the dry run"
    train, held_out = read_examples(cfg, cfg.reward)
    line = f"data: {len(train)} training prompts, {len(held_out)} held-out (every row read and checked)"
    return "\n".join([line, *(f"warning: {w}" for w in data_warnings(settings.layout, len(train)))])


def train_in(cfg, run_dir: Path, command: str = "rlctl train") -> dict:
    """Train with a composed config, writing the run folder ``run_dir``; ``command`` reproduces the run."""
    from omegaconf import OmegaConf

    from rlctl.build import build_train
    from rlctl.report import model_card, plot_run
    from rlctl.trainer import train

    run_dir.mkdir(parents=True, exist_ok=True)
    stages = build_train(cfg, run_dir, f"{command} hydra.run.dir={run_dir} resume=auto")
    if stages.ranks.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    try:
        summary = train(stages)
        final = run_dir / "checkpoints" / "final"
        if stages.ranks.is_main:
            config = OmegaConf.to_container(cfg, resolve=True)
            if final.is_dir():
                (final / "README.md").write_text(model_card(run_dir, config, command))
            best = run_dir / "checkpoints" / "best" / "best.json"
            if best.is_file():
                (best.parent / "README.md").write_text(
                    model_card(run_dir, config, command, json.loads(best.read_text()))
                )
            stages.logger.message(f"curves: {plot_run(run_dir)}")
        return summary
    finally:
        stages.logger.close()


def run_offline(cfg, command: str) -> dict:
    """`rlctl rm | sft | dpo`: an offline stage, in a run folder like `train`'s."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlctl.offline import train_offline
    from rlctl.report import plot_run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    kept = [o for o in hydra_cfg.overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    line = " ".join([f"rlctl {command}", *kept])
    build, card, use = _offline_stages()[command]
    run = build(cfg, run_dir, f"{line} hydra.run.dir={run_dir} resume=auto")
    if run.ranks.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    try:
        summary = train_offline(run)
        final = run_dir / "checkpoints" / "final"
        if run.ranks.is_main:
            if final.is_dir():
                (final / "README.md").write_text(card(run_dir, OmegaConf.to_container(cfg, resolve=True), line))
                for name, text in getattr(run.objective, "final_files", dict)().items():  # e.g. a judge's template
                    (final / name).write_text(text)
            run.logger.message(f"curves: {plot_run(run_dir)}")
            if final.is_dir():
                run.logger.message(f"next: {getattr(run.objective, 'next_command', use).format(final=final)}")
        return summary
    finally:
        run.logger.close()


def _offline_stages() -> dict:
    """command -> (build, model card, what to do with its final model)."""
    from functools import partial

    from rlctl.dpo import build_dpo
    from rlctl.report import rm_model_card, stage_model_card
    from rlctl.rm import build_rm
    from rlctl.sft import build_sft

    return {
        "rm": (build_rm, rm_model_card, "rlctl train reward=model reward.model_path={final}"),
        "sft": (build_sft, partial(stage_model_card, "sft"), "rlctl train model.path={final}"),
        "dpo": (build_dpo, partial(stage_model_card, "dpo"), "rlctl eval model.path={final}"),
    }


# What `rlctl eval` / `rlctl generate` take from a run folder (or a recipe): how the run asked its
# questions (data and prompt format), how it judged them (reward) and how it sampled (rollout).
# `rlctl train` from an `rlctl sft` model takes the task format that model was taught the same way.
SETTINGS_FROM_RUN = {"eval": ("data", "reward", "rollout", "env"), "generate": ("data", "rollout", "env"),
                     "train": ("data", "reward", "rollout", "env")}  # fmt: skip


def run_folder_of(model_path: str) -> Path | None:
    """The run folder a model path belongs to: RUN, RUN/checkpoints/final or RUN/checkpoints/step-N/policy."""
    path = Path(model_path).expanduser()
    for candidate in (path, path.parent.parent, path.parent.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


# Settings that act only while training: sampling for eval or generate does not take them from a run.
TRAINING_ONLY = ("rollout.is_correction", "rollout.is_cap")


def _leaves(node, prefix: str = "") -> dict:
    """{dotted key: value} of a nested mapping; a list is one value (reward.terms is set whole)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def keys_set_on_command_line(overrides: list[str], groups: tuple[str, ...]) -> dict[str, str]:
    """{dotted key: the override that set it} for the keys of ``groups`` the command line decides:
    `rollout.max_new_tokens=32` sets that key; `rollout=hf` sets every key conf/rollout/hf.yaml sets."""
    from omegaconf import OmegaConf

    decided = {}
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.split(".", 1)[0]
        if group not in groups:
            continue
        if "." in key:
            decided[key] = override
        elif (CONF_DIR / group / f"{value}.yaml").is_file():
            option = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{value}.yaml"), resolve=False)
            decided.update({f"{group}.{k}": override for k in _leaves(option)})
    return decided


def with_settings_from(cfg, command: str, base, source: str):
    """``cfg`` with the keys of the SETTINGS_FROM_RUN groups taken from ``base`` (a run's task settings
    or a recipe), key by key: a key the command line set (``rollout.max_new_tokens=32``), or one that an
    option picked there sets (``rollout=hf`` sets ``rollout.backend``), keeps the command line's value;
    every other key of the run is inherited. Keys this command does not have are left out. Prints the
    inherited keys that differ from this command's defaults, and what the command line decided."""
    from omegaconf import OmegaConf, open_dict

    groups = tuple(g for g in SETTINGS_FROM_RUN[command] if g in base)
    decided = keys_set_on_command_line(_overrides(), groups)
    inherited = {}
    for group in groups:
        for key, value in _leaves(OmegaConf.to_container(base[group], resolve=True), f"{group}.").items():
            if key in decided or any(key.startswith(d + ".") for d in decided):
                continue
            if command != "train" and key in TRAINING_ONLY:
                continue
            current = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
            if current == "__absent__":  # a key of another command (sft's data.completion_field)
                continue
            if (OmegaConf.to_container(current) if OmegaConf.is_config(current) else current) != value:
                inherited[key] = value
    nested = OmegaConf.create()
    for key, value in inherited.items():
        OmegaConf.update(nested, key, value)
    with open_dict(cfg):
        cfg.merge_with(nested)  # through the schema: reward.terms become RewardTerm nodes
    shown = ", ".join(f"{k}={_short(v)}" for k, v in inherited.items()) or "nothing that differs from the defaults"
    from_line = sorted(set(decided.values()))
    err_console.print(
        f"settings from {source}: {shown}" + (f"; from the command line: {' '.join(from_line)}" if from_line else ""),
        highlight=False, soft_wrap=True, markup=False,
    )  # fmt: skip
    return cfg


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def task_settings_of(run: Path, config) -> dict:
    """What a run's model was trained to do, as `train`/`eval`/`generate` settings: its prompts
    (`data`), the rules that judge its answers (`reward`) and how long they are (`rollout`). An SFT
    model answers as it was taught; a DPO model the built-in problems its pairs came from. A reward
    model is not a policy: one line says what to run instead."""
    import dataclasses

    from rlctl.config import DataConfig
    from rlctl.errors import RlctlError

    known = {f.name for f in dataclasses.fields(DataConfig)}
    data = {k: v for k, v in config.get("data", {}).items() if k in known}
    if "algo" in config:  # rlctl train
        return {"data": config["data"], "reward": config["reward"], "rollout": config["rollout"],
                **({"env": config["env"]} if "env" in config else {})}  # fmt: skip
    if "examples_per_step" in config:  # rlctl sft
        return {
            "data": data,
            "reward": config["reward"],
            "rollout": {"max_new_tokens": config["eval"]["max_new_tokens"]},
        }
    if "loss_type" in config:  # rlctl dpo
        if config["data"]["source"] != "arithmetic":
            raise RlctlError(
                f"model.path: {run} is a DPO run on preference pairs ({config['data'].get('path')}), which hold no "
                "reference answers to score; evaluate on prompts with answers: data=jsonl data.path=FILE.jsonl"
            )
        return {"data": data, "reward": {"terms": [{"name": "exact_number", "weight": 1.0, "pattern": None}]},
                "rollout": {"max_new_tokens": config["eval"]["max_new_tokens"]}}  # fmt: skip
    if "margin" in config:  # rlctl rm
        raise RlctlError(
            f"model.path: {run} is a reward model (rlctl rm), not a policy to sample from; its held-out pairwise "
            f"accuracy is in {run}/eval.json; train a policy against it with: rlctl train reward=model "
            f"reward.model_path={run}"
        )
    return {}


def _latest_if_unfinished(cfg, run: Path) -> None:
    """`model.path=RUN` of a run that has no checkpoints/final (it stopped early): its latest checkpoint."""
    from rlctl.checkpoint import latest_checkpoint

    given = Path(cfg.model.path).expanduser()
    if given.resolve() != run.resolve() or (run / "checkpoints" / "final" / "config.json").exists():
        return
    latest = latest_checkpoint(run)
    if latest is None or not (latest / "policy").is_dir():
        return  # nothing to fall back on: loading the folder says what is missing
    cfg.model.path = str(latest / "policy")
    err_console.print(f"model.path: {run} has no checkpoints/final (it stopped before its end); using its latest "
                      f"checkpoint, {latest.name}", highlight=False, soft_wrap=True, markup=False)  # fmt: skip


def _say_which_checkpoint(cfg, run: Path, command: str) -> None:
    """One line: which of a run's policies this command loads (the final one or checkpoints/best), and
    where the other is."""
    best_file = run / "checkpoints" / "best" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    given = Path(cfg.model.path).expanduser().resolve()
    if best is not None and given == best_file.parent.resolve():
        line = (f"{command}: {given}, the policy of step {best['step']}, the best by held-out {best['by']} "
                f"({best['value']:.3f}); the end of training is in {run}/checkpoints/final")  # fmt: skip
    elif given in (run.resolve(), (run / "checkpoints" / "final").resolve()):
        line = f"{command}: {run}/checkpoints/final, the policy at the end of training"
        if best is not None:
            line += (f"; the best by held-out {best['by']} ({best['value']:.3f}) was step {best['step']}: "
                     f"model.path={run}/checkpoints/best")  # fmt: skip
    else:
        return
    err_console.print(line, highlight=False, soft_wrap=True, markup=False)


def _merged_adapter(cfg, base) -> None:
    """`model.path=RUN/checkpoints/step-N/policy` of a LoRA run holds the adapter alone: the run's base
    model (``base``, the run's model group) with that adapter merged, in a temporary folder for this command."""
    import atexit
    import shutil
    import tempfile

    from rlctl import models
    from rlctl.lora import load_adapter

    folder = Path(cfg.model.path).expanduser()
    if not (folder / "adapter_config.json").exists() or (folder / "config.json").exists():
        return
    tokenizer = models.load_tokenizer(base["path"], base["trust_remote_code"])
    model = models.load_causal_lm(base["path"], tokenizer, cfg.model.dtype, base["trust_remote_code"], cfg.engine.seed)
    merged = load_adapter(model, folder).merge_and_unload()
    target = Path(tempfile.mkdtemp(prefix="rlctl-merged-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    cfg.model.path = str(target)
    err_console.print(f"model.path: {folder} holds a LoRA adapter; merged it into the run's base model {base['path']} "
                      "for this command", highlight=False, soft_wrap=True, markup=False)  # fmt: skip


def _with_run_settings(cfg, command: str, recipe_base):
    from omegaconf import OmegaConf

    from rlctl.errors import RlctlError

    run = run_folder_of(cfg.model.path)
    if run is not None:
        config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
        if command != "train":
            _latest_if_unfinished(cfg, run)
            _merged_adapter(cfg, config["model"])
            _say_which_checkpoint(cfg, run, command)
        if command == "train" and "examples_per_step" not in config:  # only an SFT model was taught a format
            return cfg
        data_on_line = any(o.startswith(("data=", "data.path=")) for o in _overrides())
        try:
            settings = task_settings_of(run, config)
        except RlctlError:
            if data_on_line and "margin" not in config:
                return cfg
            raise
        label = f"the SFT run {run}/config.yaml" if command == "train" else f"{run}/config.yaml"
        return with_settings_from(cfg, command, OmegaConf.create(settings), label)
    if recipe_base is not None:
        return with_settings_from(cfg, command, recipe_base[1], f"recipe {recipe_base[0]}")
    return cfg


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [o.lstrip("+~") for o in HydraConfig.get().overrides.task]


def run_eval(cfg) -> dict:
    from rlctl.build import build_evaluator, build_inference, build_prompts, build_rewards, config_warnings

    for warning in config_warnings(cfg, training=False):
        err_console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    from rlctl.optim.engine import make_accelerator

    rewards = build_rewards(cfg, autocast=make_accelerator(cfg.engine.precision).autocast)
    policy, tokenizer, rollout = build_inference(cfg)
    _, held_out = build_prompts(cfg, tokenizer, cfg.reward)
    evaluator = build_evaluator(cfg, held_out, rewards, rollout)
    if evaluator is None:
        fail("eval: no held-out prompts to evaluate on (check data.* and eval.enabled)")
    results = evaluator(policy)  # a reward that failed on every sample: one line, exit 1, no score
    if evaluator.last_failures:
        err_console.print(
            f"[yellow]warning:[/yellow] {escape(evaluator.last_failures)}", highlight=False, soft_wrap=True
        )
    results = {"model": cfg.model.path, "data": cfg.data.source, **results,
               "accuracy_counts": f"correct when {rewards.accuracy_meaning}"}  # fmt: skip
    print(json.dumps(results, indent=2))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def run_generate(cfg) -> list:
    from rich.table import Table

    from rlctl.batch import episode_text
    from rlctl.build import build_inference, build_prompts
    from rlctl.config import fill
    from rlctl.data import Example, encode_prompts
    from rlctl.data.prompts import PromptFormat
    from rlctl.data.sources import SourceSpec

    if cfg.n < 1 or cfg.num_prompts < 1:
        fail(f"{'n' if cfg.n < 1 else 'num_prompts'}: must be ≥ 1, got {cfg.n if cfg.n < 1 else cfg.num_prompts}")
    if len(cfg.prompts) > 1:
        err_console.print(
            f"warning: {len(cfg.prompts)} prompts: " + " | ".join(repr(p) for p in cfg.prompts)
            + ' (a comma inside [...] separates prompts; quote one that holds a comma: prompts="[\'Hi, what is 2 + 2?\']")',
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    policy, tokenizer, rollout = build_inference(cfg)
    if cfg.prompts:
        _, prompt_format = fill("data", cfg.data, SourceSpec, PromptFormat)
        prompts = encode_prompts([Example(p, "", "command line") for p in cfg.prompts], prompt_format, tokenizer)
    else:
        _, prompts = build_prompts(cfg, tokenizer)
        first = slice(0, cfg.num_prompts)
        prompts = type(prompts)(prompts.examples[first], prompts.token_ids[first], prompts.conversations[first], 0, 0)
    batch = rollout.generate(policy, prompts.token_ids, [e.answer for e in prompts.examples], cfg.n,
                             conversations=prompts.conversations)  # fmt: skip
    table = Table(title=f"{cfg.model.path}: {len(batch.completions)} completions", show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("completion" if batch.conversations is None else "conversation (env)", overflow="fold")
    for i, completion in enumerate(batch.completions):
        example = prompts.examples[i // cfg.n]
        shown = completion if batch.conversations is None else episode_text(batch.conversations[i])
        table.add_row(
            escape(example.prompt if isinstance(example.prompt, str) else json.dumps(example.prompt)), escape(shown)
        )
    Console().print(table)
    return batch.completions


COMMANDS = {"train": run_train, "eval": run_eval, "generate": run_generate,
            **{stage: partial(run_offline, command=stage) for stage in ("rm", "sft", "dpo")}}  # fmt: skip
RUN_FOLDER_COMMANDS = ("train", "rm", "sft", "dpo")  # commands that write a run folder


def report(run_dir: str) -> None:
    """`rlctl report RUN_DIR`: redraw curves.png and print the held-out results."""
    from rlctl.errors import RlctlError
    from rlctl.report import plot_run

    folder = Path(run_dir)
    if not folder.is_dir():
        fail(f"report: no such run folder: {folder}")
    try:
        print(f"curves: {plot_run(folder)}")
    except RlctlError as err:
        fail(str(err))
    if (folder / "eval.json").exists():
        print((folder / "eval.json").read_text().strip())
    else:
        print(
            f"no held-out results: {folder} has no eval.json (eval.enabled=false, or the run stopped before its "
            "final evaluation; rlctl eval model.path=RUN_DIR measures it now)"
        )


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) for each recipes/*.yaml; the description is its first comment line."""
    found = []
    for file in sorted(RECIPES_DIR.glob("*.yaml")):
        comments = [line[1:].strip() for line in file.read_text().splitlines() if line.startswith("#")]
        description = next((c for c in comments if not c.startswith("@package")), "")
        found.append((file.stem, description))
    return found


def print_recipes() -> None:
    from rich.table import Table

    table = Table(title="recipes (run with: rlctl train recipe=NAME [overrides])")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, description in list_recipes():
        table.add_row(name, description)
    Console().print(table)


def _hydra_app(command: str, recipe_base=None):
    """The Hydra app of ``command``; ``recipe_base`` = (name, composed train config) when eval or
    generate were given recipe=NAME."""
    import hydra

    from rlctl.config import SCHEMAS, check_known_keys, register_schemas
    from rlctl.errors import RlctlError

    register_schemas()

    def task(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from rlctl.logging import append_to_log

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir) if command in RUN_FOLDER_COMMANDS else None
        in_sweep = hydra_cfg.mode == RunMode.MULTIRUN

        def give_up(message: str):
            if run_dir is not None:  # the folder of a run that failed holds why
                append_to_log(run_dir, f"error: {message}")
            if in_sweep and run_dir is not None:  # one failing job must not cancel the others
                (run_dir / "FAILED").write_text(message + "\n")
                err_console.print(f"[bold red]job {hydra_cfg.job.num} failed:[/bold red] {message}", soft_wrap=True)
                return None
            fail(message)

        try:
            check_known_keys(cfg, SCHEMAS[command])
            if command in SETTINGS_FROM_RUN:
                cfg = _with_run_settings(cfg, command, recipe_base)
            return COMMANDS[command](cfg)
        except RlctlError as err:
            return give_up(str(err))
        except KeyboardInterrupt:
            return give_up("interrupted")
        except Exception as err:
            if not in_sweep:
                raise  # a bug outside a sweep: the traceback is what we need
            if run_dir is not None:
                import traceback

                append_to_log(run_dir, traceback.format_exc())
            return give_up(f"{type(err).__name__}: {err}")

    task.__name__ = command
    return hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=command)(task)


def _quiet_deepspeed_on_cpu() -> None:
    """Without a GPU, tell DeepSpeed so up front; otherwise every run starts with its CPU-fallback warning."""
    import os

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load; our console shows progress


def _refuse_a_launch_that_started_too_few_processes() -> None:
    """`accelerate launch --num_processes N` on a machine without GPUs (and without --use_deepspeed)
    starts ONE process with no rank in its environment, only the rendezvous address of N. Training
    alone would silently do a fraction of what was asked."""
    import os

    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        fail(
            "this process was launched for several processes, but accelerate started only one (on a machine "
            "without GPUs its plain launcher does so); launch with: DS_ACCELERATOR=cpu accelerate launch "
            "--use_deepspeed --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no "
            "-m rlctl train deepspeed=zero2 ..."
        )


def _one_run_folder_for_all_ranks(args: list[str], name: str) -> list[str]:
    """Under a multi-process launch every rank would resolve ${now:...} itself, possibly a second
    apart; rank 0 picks the time and every rank uses it, so the run has one folder."""
    from rlctl.distributed import broadcast_from_main, init_process_group, launched_ranks

    ranks = launched_ranks()
    if (
        ranks.world_size == 1
        or "-m" in args
        or "--multirun" in args
        or any(a.startswith("hydra.run.dir=") for a in args)
        or "dry_run=true" in args  # a dry run writes no folder and may name a world size nothing launched
    ):
        return args
    import time

    init_process_group(ranks)
    stamp = broadcast_from_main(time.strftime("%Y-%m-%d_%H-%M-%S"))
    return [*args, f"hydra.run.dir=runs/{stamp}_{name}_${{model.name}}_x{ranks.world_size}"]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] in ("--version", "-V", "version"):
        from importlib.metadata import version

        print(f"rlctl {version('rlctl')}")
        return
    command, rest = args[0], args[1:]
    _quiet_deepspeed_on_cpu()
    if command == "recipes":
        print_recipes()
        return
    if command == "doctor":
        from rlctl.doctor import report as doctor_report

        print(doctor_report())
        return
    if command == "report":
        if len(rest) != 1:
            fail("usage: rlctl report RUN_DIR")
        report(rest[0])
        return
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; known: {sorted(COMMANDS) + ['doctor', 'recipes', 'report']}")
    if command in RUN_FOLDER_COMMANDS:
        _refuse_a_launch_that_started_too_few_processes()
        rest = _one_run_folder_for_all_ranks(rest, "${algo.name}" if command == "train" else command)
    recipe_base = None
    if command in ("eval", "generate"):  # recipe=NAME is a training experiment: they take its settings
        recipe_base, rest = _recipe_for(command, rest)
    sys.argv = [f"rlctl {command}", *rest]  # Hydra parses sys.argv
    _hydra_app(command, recipe_base)()


def _recipe_for(command: str, args: list[str]):
    """`rlctl eval recipe=NAME ...`: a recipe is a training experiment; eval and generate take its
    model and SETTINGS_FROM_RUN groups (composed as `rlctl train recipe=NAME` would)."""
    named = [a for a in args if a.startswith("recipe=")]
    if not named:
        return None, args
    name = named[-1].split("=", 1)[1]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from rlctl.config import register_schemas

    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            base = compose("train", overrides=[f"recipe={name}"])
    except HydraException:
        fail(f"recipe: no recipe {name!r}; known: {[n for n, _ in list_recipes()]}")
    rest = [a for a in args if not a.startswith("recipe=")]
    if not any(a.startswith(("model=", "model.path=")) for a in rest):
        rest.append(f"model.path={base.model.path}")
    return (name, base), rest
