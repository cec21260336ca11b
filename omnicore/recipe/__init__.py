"""Recipe files: schema, loading (extends, overrides) and validation against the registry."""

from .loader import LoadedRecipe, apply_override, load_recipe, resolve_recipe_path
from .schema import ComponentSpec, DataSpec, ModelSpec, Recipe, StageSpec

__all__ = ["LoadedRecipe", "apply_override", "load_recipe", "resolve_recipe_path", "ComponentSpec", "DataSpec",
           "ModelSpec", "Recipe", "StageSpec"]
