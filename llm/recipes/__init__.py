"""One Recipe per stage, chosen by the option of the `posttrain` config group.

The group's option names a LightningModule (`posttrain._target_`); the recipe is the one
registered for the most specific of its base classes. A new stage adds its module class and
recipe to RECIPES.
"""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig

from llm.recipes.base import Recipe, StageData
from llm.recipes.distill import Distill
from llm.recipes.posttrain import OnPolicy, PostTrain
from llm.recipes.pretrain import Pretrain

# (module base class, recipe), most specific first.
RECIPES: tuple[tuple[str, type[Recipe]], ...] = (
    ("llm.stages.distill.DistillModule", Distill),
    ("llm.stages.grpo.OnPolicyModule", OnPolicy),
    ("llm.stages.posttrain.PostTrainModule", PostTrain),
    ("llm.stages.pretrain.PretrainModule", Pretrain),
)


def recipe_for(cfg: DictConfig) -> Recipe:
    """The recipe of the stage the config's `posttrain` option selects."""
    module_class = get_class(cfg.posttrain._target_)
    for base, recipe in RECIPES:
        if issubclass(module_class, get_class(base)):
            return recipe(module_class)
    raise TypeError(f"posttrain._target_={cfg.posttrain._target_!r}: not a stage (no recipe for "
                    f"{module_class.__name__}; register one in llm.recipes.RECIPES)")


__all__ = ["RECIPES", "Recipe", "StageData", "recipe_for"]
