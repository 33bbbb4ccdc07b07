"""Config composition, tested by composing (no training)."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from rlctl.cli import CONF_DIR, RECIPES_DIR, list_recipes
from rlctl.config import register_schemas


def compose_train(*overrides):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=list(overrides))


def test_defaults_are_grpo_on_the_embedded_model_and_arithmetic():
    cfg = compose_train()
    assert (cfg.algo.name, cfg.model.path, cfg.data.source) == ("grpo", "embedded:smollm2-135m", "arithmetic")
    assert cfg.model.trust_remote_code is False


def test_one_override_switches_the_algorithm():
    grpo, rloo = compose_train(), compose_train("algo=rloo")
    assert (grpo.algo.advantage, rloo.algo.advantage) == ("grpo", "rloo")
    assert grpo.model == rloo.model and grpo.data == rloo.data and grpo.optim == rloo.optim


@pytest.mark.parametrize("group", ["algo", "model", "data", "reward", "rollout", "logger"])
def test_every_option_of_every_group_composes(group):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        extra = ["data.path=x.jsonl"] if (group, option) == ("data", "jsonl") else []
        cfg = compose_train(f"{group}={option}", *extra)
        assert cfg[group] is not None


def test_hub_models_keep_their_real_names():
    assert compose_train("model=qwen-1.5b").model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert compose_train("model=qwen-0.5b").model.path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_typo_in_a_key_is_an_error_that_names_it():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train("optim.lrr=1")
    assert "lrr" in str(info.value.__cause__ or info.value)


def test_a_wrong_type_is_an_error_that_names_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_train("optim.lr=fast")
    assert "lr" in str(info.value.__cause__ or info.value)


def test_recipes_apply_and_accept_further_overrides():
    cfg = compose_train("recipe=smoke", "algo=rloo")
    assert cfg.model.path == "random:tiny" and cfg.steps == 2 and cfg.algo.advantage == "rloo"
    assert cfg.algo.group_size == 4  # the recipe's value survives the algo override


def test_every_recipe_composes_and_has_a_description():
    names = [name for name, _ in list_recipes()]
    assert "smoke" in names and len(names) == len(list(RECIPES_DIR.glob("*.yaml")))
    for name, description in list_recipes():
        assert description, f"recipes/{name}.yaml needs a one-line description comment"
        compose_train(f"recipe={name}")


# --- one source for each setting ----------------------------------------------------------------------


def test_fill_refuses_a_group_key_no_object_reads_and_a_field_no_key_gives():
    from dataclasses import dataclass

    from rlctl.config import fill

    @dataclass(frozen=True)
    class Target:
        a: int
        b: int

    assert fill("g", {"a": 1, "b": 2}, Target) == Target(1, 2)
    assert fill("g", {"a": 1}, Target, b=5) == Target(1, 5)  # b derived from another group
    with pytest.raises(TypeError, match=r"'g' keys \['c'\]"):
        fill("g", {"a": 1, "b": 2, "c": 3}, Target)  # a new schema key nobody reads
    with pytest.raises(TypeError, match=r"fields \['b'\]"):
        fill("g", {"a": 1}, Target)  # a field the config does not provide
    with pytest.raises(TypeError, match=r"derived values \['z'\]"):
        fill("g", {"a": 1, "b": 2}, Target, z=0)


class Recorder:
    """A read-only view of a config node that records the dotted path of every key read."""

    def __init__(self, node, path: str, seen: set):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_seen", seen)

    def _wrap(self, key, value):
        from omegaconf import DictConfig, ListConfig

        path = f"{self._path}.{key}" if self._path else str(key)
        self._seen.add(path)
        if isinstance(value, DictConfig):
            return Recorder(value, path, self._seen)
        if isinstance(value, ListConfig):  # list items: record their keys without the index
            return [Recorder(v, path, self._seen) if isinstance(v, DictConfig) else v for v in value]
        return value

    def __getattr__(self, key):
        return self._wrap(key, getattr(self._node, key))

    def __getitem__(self, key):
        return self._wrap(key, self._node[key])

    def keys(self):
        return self._node.keys()


def schema_keys(cls, prefix: str = "") -> set[str]:
    import dataclasses
    import typing

    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        element = args[0] if typing.get_origin(kind) is list and args else None
        if dataclasses.is_dataclass(kind):
            keys |= schema_keys(kind, f"{prefix}{f.name}.")
        elif element is not None and dataclasses.is_dataclass(element):
            keys |= schema_keys(element, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def test_every_schema_key_is_read_when_a_run_is_built(tmp_path):
    # build_train reads the config once, before the loop: every key of the schema must be read by
    # it, directly or through config.fill (which passes each group key to the object that uses it).
    from rlctl.build import build_train
    from rlctl.config import TrainConfig

    cfg = compose_train("recipe=smoke", "logger.console=false")
    seen: set[str] = set()
    build_train(Recorder(cfg, "", seen), tmp_path)
    read_elsewhere = {
        "dry_run",  # cli.run_train, before building (tested in test_cli)
        "model.name",  # the run folder's name (hydra.run.dir in conf/train.yaml) and the model card
    }
    assert "model.name" in (CONF_DIR / "train.yaml").read_text().replace("${model.name}", "model.name")
    unread = schema_keys(TrainConfig) - seen - read_elsewhere
    assert not unread, f"schema keys that nothing reads: {sorted(unread)}"
