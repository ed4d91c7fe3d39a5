"""The masked multi-task loss.

For sample i and task t with label mask m_it (1 = labelled) and weight w_t::

    loss_i = sum_t  w_t * m_it * l_t(output_it, y_it)

and the batch loss is ``mean_i loss_i`` (or the sum). A missing label contributes
exactly zero to the loss and to every gradient (it is selected out with ``torch.where``,
so a NaN placeholder in ``Y`` cannot leak in).

Normalisation is by batch size, not by the number of labelled samples per task: each
sample's loss then depends on that sample only, which per-sample clipping in DP-SGD
requires (and Opacus's ``loss_reduction="mean"`` assumes).

Per-task losses ``l_t``: binary cross-entropy with logits, cross-entropy over C logits
(``Y`` holds the class index), squared error for regression on the task's scale
``(y - shift) / scale``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from fedmtl.models.tasks import TaskSpec

REDUCTIONS = ("mean", "sum", "none")


def per_task_losses(
    outputs: Mapping[str, torch.Tensor], Y: torch.Tensor, mask: torch.Tensor, tasks: Sequence[TaskSpec]
) -> torch.Tensor:
    """Unweighted per-sample, per-task losses ``(n, T)``, zero where the label is missing."""
    if Y.shape != mask.shape or Y.dim() != 2 or Y.shape[1] != len(tasks):
        raise ValueError(
            f"Y and mask must both be (n, {len(tasks)}) for {len(tasks)} tasks; "
            f"got Y {tuple(Y.shape)} and mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    cols = []
    for j, t in enumerate(tasks):
        if t.name not in outputs:
            raise KeyError(f"the model produced no output for task {t.name!r}; outputs: {sorted(outputs)}")
        out = outputs[t.name]
        m = mask[:, j]
        y = torch.where(m, Y[:, j], torch.zeros_like(Y[:, j]))  # safe placeholder where unlabelled
        if t.kind == "binary":
            li = F.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype), reduction="none")
        elif t.kind == "multiclass":
            li = F.cross_entropy(out, y.long(), reduction="none")
        else:
            li = (out[:, 0] - (y.to(out.dtype) - t.shift) / t.scale) ** 2
        cols.append(torch.where(m, li, torch.zeros_like(li)))
    return torch.stack(cols, dim=1)


def masked_multitask_loss(
    outputs: Mapping[str, torch.Tensor],
    Y: torch.Tensor,
    mask: torch.Tensor,
    tasks: Sequence[TaskSpec],
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted, masked multi-task loss (see module docs). ``reduction`` "none" gives
    the per-sample losses ``(n,)``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    L = per_task_losses(outputs, Y, mask, tasks)
    w = torch.tensor([t.weight for t in tasks], dtype=L.dtype, device=L.device)
    per_sample = (L * w).sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean() if per_sample.numel() else per_sample.sum()


@torch.no_grad()
def task_mean_losses(
    outputs: Mapping[str, torch.Tensor], Y: torch.Tensor, mask: torch.Tensor, tasks: Sequence[TaskSpec]
) -> dict[str, float]:
    """Mean loss over the labelled samples of each task (NaN where none is labelled); for logs."""
    L = per_task_losses(outputs, Y, mask, tasks)
    m = mask.bool()
    res = {}
    for j, t in enumerate(tasks):
        n = int(m[:, j].sum())
        res[t.name] = float(L[:, j].sum() / n) if n else float("nan")
    return res
