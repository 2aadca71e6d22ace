"""Recipes: one module per method family, each with a pydantic ``Config`` and ``main(cfg, session)``.

The table below is the only place a recipe is registered: no decorators, no import side
effects. A test keeps it in sync with the CLI help, the shipped configs and the README.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class RecipeEntry:
    module: str
    description: str
    default_config: str  # file name under distil/configs/


RECIPES: dict[str, RecipeEntry] = {
    "classifier_kd": RecipeEntry(
        "distil.recipes.classifier_kd",
        "Classifier → smaller classifier: Hinton KD (soft CE at kd_temperature, T²) + hard CE, with a no-teacher baseline",
        "classifier_kd.yaml",
    ),
    "encoder_kd": RecipeEntry(
        "distil.recipes.encoder_kd",
        "Sentence encoder → encoder cut from its layers (or another folder): MSE + cosine on mean-pooled embeddings, optional hidden-state and attention KD",
        "encoder_kd.yaml",
    ),
    "lm_kd": RecipeEntry(
        "distil.recipes.lm_kd",
        "Causal LM → smaller causal LM: token-level KD (any divergence, chunked for large vocabularies) + hard LM loss, with a no-teacher baseline",
        "lm_kd.yaml",
    ),
    "diffusion_train": RecipeEntry(
        "distil.recipes.diffusion_train",
        "Train a class-conditional pixel-space diffusion model (diffusers UNet2DModel, null class for CFG) and the metric's feature classifier; score samplers offline",
        "diffusion_train.yaml",
    ),
    "diffusion_distill": RecipeEntry(
        "distil.recipes.diffusion_distill",
        "Diffusion teacher → faster sampler: progressive (halving steps), guidance (one pass instead of CFG's two), consistency (LCM-style, 1-4 steps) or adapter guidance distillation",
        "diffusion_distill.yaml",
    ),
    "compress": RecipeEntry(
        "distil.recipes.compress",
        "Prune → distil → quantise → distil (quantisation-aware) → export in one resumable pipeline: a causal LM (lm_kd's loss) or a CNN classifier (classifier_kd's) recovers from its own unpruned, full-precision self; LoRA-KD optional",
        "compress.yaml",
    ),
    "lm_pretrain": RecipeEntry(
        "distil.recipes.lm_pretrain",
        "Pre-train a causal LM from scratch with next-token CE (makes the built-in teacher from the CPython stdlib corpus)",
        "lm_pretrain.yaml",
    ),
}


def load_recipe(name: str) -> ModuleType:
    """Import a recipe module by its table name."""
    return importlib.import_module(RECIPES[name].module)
