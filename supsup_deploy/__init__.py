"""supsup-deploy: ship supermask continual learning (SupSup masks and alpha tasks over basis masks).

The backbone is regenerated from (architecture, seed); tasks are bit masks or tiny alpha tables.
"""

from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.bundles.reader import Bundle, load_bundle
from supsup_deploy.bundles.writer import TaskData, save_bundle
from supsup_deploy.errors import ConfigError, DatasetNotFoundError, FormatError, SupsupError
from supsup_deploy.learn import teach
from supsup_deploy.models import (
    ModelConfig,
    ModelSummary,
    build_model,
    get_model,
    list_models,
    register_model,
    summarize_model,
)
from supsup_deploy.predictor import Predictor, predict

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "ConfigError",
    "DatasetNotFoundError",
    "FormatError",
    "InputSpec",
    "ModelConfig",
    "ModelSummary",
    "Predictor",
    "SupsupError",
    "TaskData",
    "__version__",
    "build_model",
    "get_model",
    "list_models",
    "load_bundle",
    "predict",
    "register_model",
    "save_bundle",
    "summarize_model",
    "teach",
]
