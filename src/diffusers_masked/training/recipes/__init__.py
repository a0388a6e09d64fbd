"""Recipes: named, versioned sets of a training script's flags, such as a paper's run or the built-in digits default.

``--recipe NAME`` loads one; any flag given on the command line overrides it; ``--recipe list`` prints the names with
one line each. Without ``--recipe`` a script takes its ``digits`` recipe when no data is given (the built-in default
the README's first command runs) and its ``default`` recipe otherwise (the defaults for a user's own data). The run's
recorded config and model card name the recipe and its version.

A recipe's values come from its paper (cited in ``source``); the flags whose values the paper does not give are
listed in ``ours``, with why in ``notes``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ..arguments import check_common_flags
from . import dit, maskdit, maskdm, text_to_image

# Flags that say where the data comes from: given on the command line, they replace the recipe's source as a whole.
DATA_SOURCE_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir")


@dataclass(frozen=True)
class Recipe:
    """A named set of a training script's flags.

    Args:
        name (`str`): what ``--recipe`` takes, e.g. ``"imagenet256-xl2"``.
        script (`str`): the script it is for, e.g. ``"train_maskdit"``.
        summary (`str`): one line for ``--recipe list``.
        flags (`dict`): flag destinations (``"learning_rate"``) and their values.
        source (`str`, *optional*): what it reproduces: the paper's table or figure and its reported result.
        ours (`tuple[str]`, *optional*): the flags whose values the paper does not give.
        notes (`str`, *optional*): conflicts between the paper and the official code, what is not given, and why
            each of ``ours`` is what it is.
        version (`int`, defaults to 1): bumped whenever a value changes, and recorded with the run.
        requires (`tuple[str]`, *optional*): flags the user must give (``"data"``: ``--dataset_name`` or
            ``--train_data_dir``), e.g. the start weights of a fine-tuning recipe.
    """

    name: str
    script: str
    summary: str
    flags: dict
    source: str = ""
    ours: tuple = field(default_factory=tuple)
    notes: str = ""
    version: int = 1
    requires: tuple = field(default_factory=tuple)

    @property
    def tag(self) -> str:
        """``name@vN``, as runs record it."""
        return f"{self.name}@v{self.version}"


RECIPES: dict[str, dict[str, Recipe]] = {}


def _register(script: str, definitions: list[dict]) -> None:
    RECIPES[script] = {}
    for definition in definitions:
        recipe = Recipe(script=script, **definition)
        if recipe.name in RECIPES[script]:
            raise ValueError(f"two recipes named {recipe.name!r} for {script}")
        RECIPES[script][recipe.name] = recipe


_register("train_maskdit", maskdit.RECIPES)
_register("train_maskdm", maskdm.RECIPES)
_register("train_dit", dit.RECIPES)
_register("train_text_to_image", text_to_image.RECIPES)


def get_recipe(script: str, name: str) -> Recipe:
    """The recipe `name` of `script`.

    Raises:
        ValueError: naming the script's recipes, if there is none of that name.
    """
    recipes = RECIPES.get(script, {})
    if name not in recipes:
        raise ValueError(f"{script} has no recipe {name!r}; its recipes: {', '.join(recipes) or 'none'}")
    return recipes[name]


def recipe_table(script: str) -> str:
    """One line per recipe of `script`: name, version and summary."""
    recipes = RECIPES.get(script, {}).values()
    width = max((len(recipe.tag) for recipe in recipes), default=0)
    return "\n".join(f"  {recipe.tag:<{width}}  {recipe.summary}" for recipe in recipes)


def add_recipe_argument(parser: argparse.ArgumentParser, script: str) -> None:
    """``--recipe NAME`` (or ``list``); the script's recipes are listed at the end of ``--help``."""
    group = parser.add_argument_group("recipe")
    group.add_argument(
        "--recipe",
        type=str,
        default=None,
        metavar="NAME",
        help="A named flag set (any flag given here overrides it); 'list' prints them, as does the end of --help. "
        "Without it: 'digits' when no data is given, else 'default'.",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"recipes of {script}:\n" + recipe_table(script)


def parse_args_with_recipe(parser: argparse.ArgumentParser, argv, script: str) -> argparse.Namespace:
    """Parse `argv` with the chosen recipe's flags as the defaults, so that every flag given overrides it.

    Sets ``args.recipe`` (the recipe's ``name@vN``) and ``args.builtin_digits`` (no data source given). Exits
    through `parser.error` for an unknown recipe, a recipe flag the parser does not have, or both a dataset and an
    image folder; ``--recipe list`` prints the recipes and exits.
    """
    known, _ = parser.parse_known_args(argv)
    if known.recipe == "list":
        print(f"Recipes of {script} (--recipe NAME; flags given on the command line override it):")
        print(recipe_table(script))
        sys.exit(0)
    given_source = any(getattr(known, name, None) is not None for name in ("dataset_name", "train_data_dir"))
    # A script with no built-in default (train_dit: latents need the user's VAE) takes its `default` recipe, whose
    # `requires` then names what to give.
    builtin = "digits" in RECIPES.get(script, {})
    name = known.recipe or ("default" if given_source or not builtin else "digits")
    try:
        recipe = get_recipe(script, name)
    except ValueError as err:
        parser.error(f"--recipe: {err}")
    flags = dict(recipe.flags)
    if given_source:
        for flag in DATA_SOURCE_FLAGS:
            flags.pop(flag, None)
    destinations = {action.dest for action in parser._actions}
    unknown = sorted(set(flags) - destinations)
    if unknown:
        parser.error(f"recipe {recipe.tag} sets flags this script does not have: {unknown}")
    parser.set_defaults(**flags)
    args = parser.parse_args(argv)
    for flag in recipe.requires:
        given = (args.dataset_name or args.train_data_dir) if flag == "data" else getattr(args, flag)
        if not given:
            what = "--dataset_name or --train_data_dir" if flag == "data" else f"--{flag}"
            parser.error(f"recipe {recipe.tag} needs {what}: {recipe.notes or recipe.summary}")
    args.recipe = recipe.tag
    args.builtin_digits = args.dataset_name is None and args.train_data_dir is None
    check_common_flags(parser, args)
    return args
