"""Registered architectures. Importing this package registers every family."""

from supsup_deploy.models import resnet
from supsup_deploy.models._api import (
    ModelConfig,
    ModelEntry,
    ModelSummary,
    assign_layer_indices,
    build_model,
    get_model,
    get_model_entry,
    list_models,
    masked_layers,
    register_model,
    summarize_model,
)

__all__ = [
    "ModelConfig",
    "ModelEntry",
    "ModelSummary",
    "assign_layer_indices",
    "build_model",
    "get_model",
    "get_model_entry",
    "list_models",
    "masked_layers",
    "register_model",
    "resnet",
    "summarize_model",
]
