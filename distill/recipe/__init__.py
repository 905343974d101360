"""Recipes: YAML validated into typed config objects at load time.

The public face: :func:`load_recipe` and the config classes (:mod:`distill.recipe.schema`).
Errors are one line naming the key path (:mod:`~distill.recipe.errors`); ``recipe show``
and the generated reference live in :mod:`~distill.recipe.doc`, ``recipe set`` in
:mod:`~distill.recipe.edit`, and the one YAML scalar formatter both use in
:mod:`~distill.recipe.yaml`.
"""

from distill.recipe.schema import (
    DomainConfig,
    EvalConfig,
    FilterConfig,
    GenerateConfig,
    KDConfig,
    LoraConfig,
    ModelArch,
    Recipe,
    RecipeError,
    StudentConfig,
    TaskSource,
    TeacherConfig,
    TokenizerConfig,
    TrainConfig,
    load_recipe,
    validate,
)

__all__ = [
    "DomainConfig",
    "EvalConfig",
    "FilterConfig",
    "GenerateConfig",
    "KDConfig",
    "LoraConfig",
    "ModelArch",
    "Recipe",
    "RecipeError",
    "StudentConfig",
    "TaskSource",
    "TeacherConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_recipe",
    "validate",
]
