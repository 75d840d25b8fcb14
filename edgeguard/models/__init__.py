"""Architectures with an encoder/head split, from random init (never weights from a hub)."""
from .registry import Classifier, create_model, list_models, register_model

__all__ = ["Classifier", "create_model", "list_models", "register_model"]
