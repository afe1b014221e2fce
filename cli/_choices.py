"""The closed sets of values the options accept: ``--help`` lists them and parsing enforces them.

Spelled out here so that parsing and ``--help`` do not import the library (and torch);
tests/test_cli.py checks each against the library's own constant.
"""

from typing import Literal

Dataset = Literal["fashion-mnist", "cifar10", "cifar100"]
Protocol = Literal["split", "random"]
Norm = Literal["batch", "group"]
DistributedMode = Literal["tasks", "data"]
FloatDtype = Literal["float32", "float16"]
AlphaDtype = Literal["float32", "float16", "int8", "int4"]
Statistics = Literal["task", "pool"]
MaskEncoding = Literal["packed", "rice", "sparse"]
Exporter = Literal["dynamo", "legacy"]
Runtime = Literal["torch", "onnx"]
TaskInferenceMethod = Literal[
    "auto", "classes", "signatures", "statistics", "information", "oneshot"
]
Stem = Literal["imagenet", "cifar"]
