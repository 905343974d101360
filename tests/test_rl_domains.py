"""One rule for a domain's RL settings: its ``rl.domains`` entry, else the defaults
(weight 1), read the same by the prompt pools, the trainer and the model card."""

from __future__ import annotations

import pytest
import yaml

from distill.errors import UserError
from distill.recipe.rl import RLConfig, RLDomainConfig
from distill.recipe.schema import Recipe
from distill.rl.stage import prompt_pools
from distill.train.save import rl_card


def recipe(rl_domains: dict) -> Recipe:
    return Recipe.model_validate(
        yaml.safe_load(
            "name: t\ndomains: {math: {}, logic: {}}\n"
            "teachers: {math: {kind: bootstrap}, logic: {kind: bootstrap}}\n"
        )
        | {"rl": {"domains": rl_domains}}
    )


def test_a_domain_left_out_gets_the_defaults():
    cfg = RLConfig.model_validate({"domains": {"math": {"weight": 0.5, "beta": 0.1}}})
    assert cfg.domain("math").weight == 0.5 and cfg.domain("math").beta == 0.1
    assert cfg.domain("logic") == RLDomainConfig() and cfg.domain("logic").weight == 1.0


def test_prompt_pools_leave_out_weight_zero_and_size_pools_by_tasks():
    r = recipe({"math": {"weight": 0, "tasks": 3}, "logic": {"tasks": 4}})
    pools = prompt_pools(r, r.rl, ["math", "logic"])
    assert list(pools) == ["logic"] and len(pools["logic"]) == 4
    r = recipe({"math": {"tasks": 3}})  # logic left out: weight 1, default pool size
    assert {d: len(p) for d, p in prompt_pools(r, r.rl, ["math", "logic"]).items()} == {
        "math": 3,
        "logic": RLDomainConfig().tasks,
    }
    r = recipe({"math": {"weight": 0}, "logic": {"weight": 0}})
    with pytest.raises(UserError, match="weight 0"):
        prompt_pools(r, r.rl, ["math", "logic"])


def test_the_card_shows_the_weights_the_trainer_uses(tmp_path):
    cfg = RLConfig.model_validate({"domains": {"math": {"weight": 2.5}}})
    report = {"steps": 1, "seconds": 1.0, "last": {}}
    rl_card(tmp_path, tmp_path, "rl", "init", cfg, {"math": [1], "logic": [1, 2]}, report)
    card = (tmp_path / "README.md").read_text()
    assert "| math | 1 | 2.5 |" in card and "| logic | 2 | 1.0 |" in card
