"""One recipe per training method; :func:`run_recipe` picks it from ``config.method``."""

from __future__ import annotations


def recipe_for(method: str) -> type:
    """The recipe class of a ``method`` (imported lazily: each pulls in torch and transformers)."""
    if method == "sft":
        from tuneforge.recipes.sft import SFTRecipe

        return SFTRecipe
    if method == "reward":
        from tuneforge.recipes.reward import RewardRecipe

        return RewardRecipe
    if method in ("grpo", "rloo"):
        from tuneforge.recipes.grpo import GRPORecipe

        return GRPORecipe
    if method == "ppo":
        from tuneforge.recipes.ppo import PPORecipe

        return PPORecipe
    from tuneforge.recipes.preference import PreferenceRecipe

    return PreferenceRecipe


def run_recipe(config, overwrite: bool = False, log=print, resume: bool | str = False, force: bool = False,
               show_progress: bool | None = None) -> dict:
    """Train ``config`` with the recipe of its method; returns the run's summary. ``show_progress``: a progress
    bar (None: when standard error is a terminal)."""
    from tuneforge.recipes.sft import run_recipe_class

    return run_recipe_class(recipe_for(config.method), config, overwrite=overwrite, log=log, resume=resume,
                            force=force, show_progress=show_progress)
