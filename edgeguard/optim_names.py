"""The optimizer families and learning-rate schedules a recipe may name (torch-free, so the CLI can offer them)."""
from __future__ import annotations

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
SCHEDULES = ("none", "cosine", "warmup-cosine")
