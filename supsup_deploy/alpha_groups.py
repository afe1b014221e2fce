"""Alpha rows per group of output channels: which channels a row mixes, and widening a table.

A grouped alpha table is ``[num_layers, G, |B|]``: layer ``d``'s output channel ``o`` (row ``o``
of its weight) mixes the basis masks with row ``floor(o * G / c_out)``, so group ``g`` holds the
contiguous channels ``ceil(g * c_out / G)`` to ``ceil((g + 1) * c_out / G) - 1``. ``G = 1`` is the
plain table, one row per layer. ``G`` is the same for every layer and at most the smallest
layer's output count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from supsup_deploy.errors import ConfigError


def group_bounds(outputs: int, groups: int) -> list[tuple[int, int]]:
    """The output channels each alpha row serves, as ``(start, stop)`` ranges.

    Args:
        outputs: the layer's output channels (its weight's first dimension).
        groups: rows per layer, ``1 <= groups <= outputs``.

    Returns:
        ``groups`` contiguous, non-empty ranges covering ``0 .. outputs - 1`` in order.

    Example:
        >>> group_bounds(5, 2)
        [(0, 3), (3, 5)]
    """
    return [(-(-g * outputs // groups), -(-(g + 1) * outputs // groups)) for g in range(groups)]


def output_groups(
    outputs: int, groups: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The alpha row each output channel uses: ``floor(o * groups / outputs)``, int64
    ``[outputs]``."""
    return torch.arange(outputs, device=device) * groups // outputs


def max_groups(weight_shapes: Sequence[Sequence[int]]) -> int:
    """The most rows per layer a model's tables can have: its smallest layer's output count."""
    return min(int(shape[0]) for shape in weight_shapes)


def check_groups(groups: int, weight_shapes: Sequence[Sequence[int]]) -> None:
    """Raise ConfigError unless ``1 <= groups <=`` :func:`max_groups`."""
    limit = max_groups(weight_shapes)
    if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= limit:
        raise ConfigError(
            f"alpha groups must be an integer from 1 to {limit} (the smallest layer's outputs), "
            f"got {groups}"
        )


def as_grouped(table: torch.Tensor) -> torch.Tensor:
    """A ``[num_layers, |B|]`` table as ``[num_layers, 1, |B|]``; a grouped one unchanged."""
    return table.unsqueeze(1) if table.dim() == 2 else table


def common_groups(counts: Iterable[int]) -> int:
    """The fewest rows per layer that every table of these group counts widens to (their lcm)."""
    return math.lcm(1, *counts)


def expand_groups(table: torch.Tensor, groups: int) -> torch.Tensor:
    """A ``[num_layers, G, |B|]`` table as ``groups`` rows per layer that serve the same weights.

    Every channel keeps its row: with ``groups = k * G``, row ``g`` becomes rows ``k * g`` to
    ``k * g + k - 1`` (``floor(o * k * G / c) // k == floor(o * G / c)``), values unchanged.

    Args:
        table: ``[num_layers, G, |B|]``.
        groups: a multiple of ``G``.

    Returns:
        ``[num_layers, groups, |B|]``.
    """
    current = table.shape[1]
    if groups % current:
        raise ConfigError(f"a table of {current} rows per layer cannot widen to {groups}")
    return table.repeat_interleave(groups // current, dim=1)


def gather_weight(
    tables: torch.Tensor,
    codes: torch.Tensor,
    shape: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A layer's effective weight from its per-group value tables and its per-weight codes.

    Args:
        tables: ``[G, 2 ** (|B| + 1)]``, one :func:`~supsup_deploy.binary_masks.code_value_table`
            per alpha row.
        codes: the layer's flat int32 codes (:func:`~supsup_deploy.binary_masks.mask_codes`).
        shape: the layer's weight shape.
        out: optional contiguous float tensor of ``shape`` to write into.

    Returns:
        The weight (``out`` itself when given): channel ``o`` gathers from its group's table.
    """
    shape = tuple(shape)
    if out is None:
        out = tables.new_empty(shape)
    rows, code_rows = out.view(shape[0], -1), codes.view(shape[0], -1)
    for group, (start, stop) in enumerate(group_bounds(shape[0], tables.shape[0])):
        torch.index_select(
            tables[group], 0, code_rows[start:stop].reshape(-1), out=rows[start:stop].view(-1)
        )
    return out


def rows_per_output(rows: torch.Tensor, outputs: int) -> torch.Tensor:
    """One layer's ``[G, |B|]`` alpha rows as the row each output channel uses:
    ``[outputs, |B|]``."""
    return rows[output_groups(outputs, len(rows), rows.device)]
