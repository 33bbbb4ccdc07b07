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
