"""Registered architectures. Importing this package registers every family.

To add an architecture: subclass :class:`MaskedModel` (``interface.py``) in a module of its
family (as ``resnet.py`` does), register its builders with :func:`register_model` under the
family's :class:`ModelFamily` (the input stems they build), and import the module here.
"""

from supsup_deploy.masked_layers import masked_layers
from supsup_deploy.models import resnet
from supsup_deploy.models._api import (
    ModelEntry,
    ModelSummary,
    assign_layer_indices,
    build_model,
    get_model,
    get_model_entry,
    list_models,
    register_model,
    summarize_model,
)
from supsup_deploy.models.config import ModelConfig
from supsup_deploy.models.interface import MaskedModel, ModelFamily
from supsup_deploy.normalization import norm_layers, task_norms

__all__ = [
    "MaskedModel",
    "ModelConfig",
    "ModelEntry",
    "ModelFamily",
    "ModelSummary",
    "assign_layer_indices",
    "build_model",
    "get_model",
    "get_model_entry",
    "list_models",
    "masked_layers",
    "norm_layers",
    "register_model",
    "resnet",
    "summarize_model",
    "task_norms",
]
