"""Data in the formats people have: JSONL, JSON, CSV, Parquet and save_to_disk folders, read by
every command that reads rows (train's prompts, sft's demonstrations, rm's and dpo's pairs), with the
row counts each reads; preference rows without a prompt; prompt-only data; and a Parquet file
through a real training run (it used to end in a UnicodeDecodeError)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_cli import rlctl

from rlctl.build import read_examples
from rlctl.cli import CONF_DIR
from rlctl.config import fill, register_schemas
from rlctl.data.demonstrations import DemonstrationSpec, load_demonstrations
from rlctl.data.preferences import PreferenceSpec, load_pairs, pair_from_row
from rlctl.data.prompts import PromptFormat
from rlctl.data.sources import SourceSpec
from rlctl.errors import RlctlError

N_ROWS = 10  # 2 of them held out by the default eval_fraction of 0.2
PROMPTS = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(N_ROWS)]
DEMOS = [
    {"prompt": f"What is {i} + 1?", "completion": f"{i} + 1 = {i + 1}", "answer": str(i + 1)} for i in range(N_ROWS)
]
PAIRS = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(N_ROWS)]


def write(rows: list[dict], folder, kind: str) -> str:
    """The rows as a file (or folder) of one format; returns its path."""
    import datasets

    table = datasets.Dataset.from_list(rows)
    path = folder / {"jsonl": "rows.jsonl", "json": "rows.json", "csv": "rows.csv", "parquet": "rows.parquet",
                     "save_to_disk": "saved"}[kind]  # fmt: skip
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    elif kind == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    return str(path)


def composed(command: str, *overrides: str):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(command, overrides=list(overrides))


FORMATS = ("jsonl", "json", "csv", "parquet", "save_to_disk")


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_is_read_by_every_command(kind, tmp_path):
    # train: prompts and answers (the answer column of a CSV reads as a number, and is compared as text)
    cfg = composed("train", "data=jsonl", f"data.path={write(PROMPTS, tmp_path, kind)}", "data.prompt_field=question")
    train, held_out = read_examples(cfg, cfg.reward)
    assert (len(train), len(held_out)) == (8, 2)
    assert sorted(e.answer for e in [*train, *held_out]) == sorted(str(i + 1) for i in range(N_ROWS))
    # sft: prompt/completion rows, with data.source=jsonl alone (its prompt_field is prompt)
    (tmp_path / "sft").mkdir()
    cfg = composed("sft", "data.source=jsonl", f"data.path={write(DEMOS, tmp_path / 'sft', kind)}")
    demos = load_demonstrations(*fill("data", cfg.data, SourceSpec, PromptFormat, DemonstrationSpec))
    assert (len(demos[0]), len(demos[1])) == (8, 2)
    assert (
        demos[0][0].messages[-1]["role"] == "assistant" and demos[0][0].first_trained == len(demos[0][0].messages) - 1
    )
    # rm and dpo: preference pairs
    (tmp_path / "pairs").mkdir()
    for command in ("rm", "dpo"):
        cfg = composed(command, "data.source=jsonl", f"data.path={write(PAIRS, tmp_path / 'pairs', kind)}")
        pairs = load_pairs(fill("data", cfg.data, PreferenceSpec))
        assert (len(pairs[0]), len(pairs[1])) == (8, 2), command


def test_preference_rows_without_a_prompt_take_the_shared_beginning():
    # TRL's implicit prompt (texts) and OpenRLHF's whole conversations (messages).
    text = pair_from_row({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, "f:1")
    assert text.prompt == [{"role": "user", "content": "Q: 2+2? A: "}]
    assert (text.chosen[0]["content"], text.rejected[0]["content"]) == ("4", "5")
    user = {"role": "user", "content": "2+2?"}
    chat = pair_from_row({"chosen": [user, {"role": "assistant", "content": "4"}],
                          "rejected": [user, {"role": "assistant", "content": "5"}]}, "f:2")  # fmt: skip
    assert chat.prompt == [user] and chat.chosen == [{"role": "assistant", "content": "4"}]
    with pytest.raises(RlctlError, match="f:3 has no prompt, and its two conversations share no first message"):
        pair_from_row({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                       "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "f:3")  # fmt: skip
    renamed = pair_from_row({"q": "2+2?", "good": "4", "bad": "5"}, "f:4", fields=("q", "good", "bad"))
    assert renamed.prompt == [user] and renamed.rejected == [{"role": "assistant", "content": "5"}]


def test_prompt_only_data_is_read_when_no_reward_term_needs_an_answer(tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(N_ROWS)))
    cfg = composed("train", "data=jsonl", f"data.path={rows}", "reward=model", "reward.model_path=some/hub-rm",
                   "reward.terms=[{name: reward_model, weight: 1}]")  # fmt: skip
    train, held_out = read_examples(cfg, cfg.reward)
    assert len(train) + len(held_out) == N_ROWS and {e.answer for e in train} == {""}
    with pytest.raises(RlctlError, match=r"has no field 'answer', and the reward terms \['exact_number'\] compare"):
        cfg = composed("train", "data=jsonl", f"data.path={rows}")
        read_examples(cfg, cfg.reward)


def test_a_missing_file_and_a_binary_file_are_one_line():
    with pytest.raises(RlctlError, match="data: file not found: nope.parquet"):
        cfg = composed("train", "data=jsonl", "data.path=nope.parquet")
        read_examples(cfg, cfg.reward)


def test_a_parquet_file_trains_end_to_end(tmp_path):
    path = write(PROMPTS, tmp_path, "parquet")
    run = tmp_path / "run"
    rlctl("train", "recipe=smoke", "steps=1", "data=jsonl", f"data.path={path}", "data.prompt_field=question",
          f"hydra.run.dir={run}")  # fmt: skip
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1 and (run / "train.log").exists()
