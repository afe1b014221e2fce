"""Every task's statistics at the first norm layer, from ``|B|`` basis convolutions.

The first masked layer's weight is linear in its alpha row: ``W_t = sum_b alpha_t[b] * W_b``,
with ``W_b`` the signed backbone under basis mask ``b``. When the first norm layer reads that
layer's output directly (the stem ``conv -> norm`` of every registered ResNet), task ``t``'s
features there are ``f_t = sum_b alpha_t[b] * f_b``, so one convolution per basis mask gives
every task's per-channel batch mean ``alpha_t . m`` and variance ``alpha_t^T C alpha_t``
(``m``, ``C``: the basis features' per-channel means and covariance). Comparing them with the
statistics each task stored at that layer scores all ``T`` tasks for the cost of ``|B|`` stem
convolutions plus ``O(T * channels * |B|^2)`` arithmetic, whatever the number of tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supsup_deploy.alpha_groups import rows_per_output
from supsup_deploy.binary_masks import code_value_table
from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.masked_layers import MaskedConv2d
from supsup_deploy.models import masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d, task_norms

FEATURE_BUDGET = 1 << 24
"""Basis feature values (float64) held at once; larger batches are processed in chunks."""


def gaussian_divergence(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> torch.Tensor:
    """Per-channel ``KL(N(batch_mean, batch_var) || N(mean, var))`` (variances include eps)."""
    ratio = batch_var / var
    return 0.5 * (ratio + (batch_mean - mean) ** 2 / var - 1.0 - ratio.log())


class StemStatistics:
    """Scores every task of a bundle by its first norm layer's statistics on a batch.

    Build it with :meth:`for_bundle`, which returns None when the model's first norm layer does
    not read the first masked layer's output directly.
    """

    def __init__(self, bundle: Bundle, layer: MaskedConv2d, norm: TaskBatchNorm2d, device):
        num_basis = bundle.num_basis
        codes = bundle.codes(device)[0]
        weights = [
            code_value_table(torch.eye(num_basis, device=device)[basis], layer.weight_constant)[
                codes.long()
            ].view(layer.weight_shape)
            for basis in range(num_basis)
        ]
        self.basis_weight = torch.cat(weights)  # [|B| * out_channels, in_channels, k, k]
        self.stride, self.padding = layer.stride, layer.padding
        self.kernel = layer.weight_shape[2]
        self.num_basis = num_basis
        self.channels = norm.num_features
        tensors = [bundle.task_tensors(info.index) for info in bundle.tasks]
        rows = [rows_per_output(t["alpha"][0], self.channels) for t in tensors]
        self.alphas = torch.stack(rows).double().to(device)  # [T, C, |B|]
        means = torch.stack([t["norm.running_mean"][: self.channels] for t in tensors])
        variances = torch.stack([t["norm.running_var"][: self.channels] for t in tensors])
        self.means = means.double().to(device)
        self.vars = variances.double().to(device) + norm.eps
        self.eps = norm.eps

    @classmethod
    def for_bundle(cls, bundle: Bundle, model: nn.Module, device) -> StemStatistics | None:
        """The scorer for a bundle's model, or None when its stem is not ``conv -> norm``."""
        layers = masked_layers(model)
        norms = task_norms(model)
        if not norms or not isinstance(layers[0], MaskedConv2d):
            return None
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            layers[0].register_forward_hook(lambda _m, _i, output: seen.setdefault("conv", output)),
            norms[0].register_forward_pre_hook(
                lambda _m, inputs: seen.setdefault("norm", inputs[0])
            ),
        ]
        size = bundle.input.size
        try:
            with torch.no_grad():
                model(torch.zeros(2, bundle.input.channels, size, size, device=device))
        finally:
            for hook in hooks:
                hook.remove()
        if seen.get("norm") is not seen.get("conv"):
            return None
        return cls(bundle, layers[0], norms[0], device)

    @torch.no_grad()
    def divergences(self, images: torch.Tensor) -> torch.Tensor:
        """Every task's mean per-channel KL divergence at the first norm layer: ``[T]``."""
        count, _, height, width = images.shape
        out_height = (height + 2 * self.padding - self.kernel) // self.stride + 1
        out_width = (width + 2 * self.padding - self.kernel) // self.stride + 1
        per_image = self.num_basis * self.channels * out_height * out_width
        chunk = max(1, FEATURE_BUDGET // per_image)
        sums = torch.zeros(self.num_basis, self.channels, dtype=torch.float64, device=images.device)
        products = torch.zeros(
            self.channels, self.num_basis, self.num_basis, dtype=torch.float64, device=images.device
        )
        for start in range(0, count, chunk):
            features = F.conv2d(
                images[start : start + chunk], self.basis_weight, None, self.stride, self.padding
            )
            features = features.double().unflatten(1, (self.num_basis, self.channels))
            sums += features.sum(dim=(0, 3, 4))
            products += torch.einsum("nbchw,ndchw->cbd", features, features)
        values = count * out_height * out_width
        basis_mean = sums / values  # [|B|, C]
        covariance = products / values - torch.einsum("bc,dc->cbd", basis_mean, basis_mean)
        task_mean = torch.einsum("tcb,bc->tc", self.alphas, basis_mean)
        task_var = torch.einsum("tcb,cbd,tcd->tc", self.alphas, covariance, self.alphas)
        task_var = task_var.clamp_min(0.0) + self.eps
        return gaussian_divergence(task_mean, task_var, self.means, self.vars).mean(dim=1)
