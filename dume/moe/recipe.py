"""The router recipe (`dume_router.json`) beside every routed checkpoint: what re-solves or describes its router
(method, domains, experts' checkpoints, λ, temperature, k, trained steps, ...); read by `dume.upcycle.dynamic`.

Path lists are stored relative to the recipe's directory (plus an absolute fallback under `<key>_absolute`), so a
run directory moved or copied as a whole keeps working; in memory they are resolved paths. Writing into a staging
directory that will be renamed to its final place gives the same relative paths as long as both are siblings.
"""

from __future__ import annotations

from pathlib import Path

from dume.checkpoint.io import atomic_write_json

RECIPE_FILE = "dume_router.json"
# Recipe entries that are lists of checkpoint paths.
RECIPE_PATH_LISTS = ("experts", "shared_average_of")


def resolve_recipe_paths(recipe: dict, recipe_dir: Path) -> dict:
    from dume.checkpoint.io import resolve_stored_path

    out = {k: v for k, v in recipe.items() if not k.endswith("_absolute")}
    for key in RECIPE_PATH_LISTS:
        if key in recipe:
            absolute = recipe.get(f"{key}_absolute") or [None] * len(recipe[key])
            out[key] = [str(resolve_stored_path(e, recipe_dir, a)) for e, a in zip(recipe[key], absolute)]
    return out


def portable_recipe(recipe: dict, recipe_dir: Path) -> dict:
    """The recipe as written to disk: path lists relative to `recipe_dir` + absolute."""
    from dume.checkpoint.io import portable_path

    out = dict(recipe)
    for key in RECIPE_PATH_LISTS:
        if key in recipe:
            out[key] = [portable_path(e, recipe_dir) for e in recipe[key]]
            out[f"{key}_absolute"] = [str(Path(e).resolve()) for e in recipe[key]]
    return out


def write_recipe(model_dir: str | Path, recipe: dict) -> Path:
    """Write `recipe` (paths as given) into `model_dir`, paths made portable."""
    path = Path(model_dir) / RECIPE_FILE
    atomic_write_json(path, portable_recipe(recipe, Path(model_dir)))
    return path

