"""Model weights as one flat float32 vector, in a stable, documented order.

Order: ``model.named_parameters()`` order, each tensor flattened in row-major (C)
order. For a :class:`~fedmtl.models.nets.MultiTaskNet` that is the trunk's parameters
(layer by layer, ``weight`` before ``bias``), then each task head's ``weight`` and
``bias`` in task order. Buffers are not included (the models have none).

``task_slices`` groups the layout: ``{"trunk": [...], task_name: [...]}`` so that
secure aggregation can sum the whole vector and per-head strategies can pick parts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn


class ParamSlot(NamedTuple):
    name: str
    shape: tuple[int, ...]
    start: int
    stop: int


def _params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # Opacus's GradSampleModule wraps the model as `_module`; look through it so the
    # names and the layout are the same wrapped or not.
    inner = getattr(model, "_module", model)
    return list(inner.named_parameters())


def parameter_layout(model: nn.Module) -> list[ParamSlot]:
    """``[(name, shape, start, stop)]`` for each parameter, in vector order."""
    out, pos = [], 0
    for name, p in _params(model):
        n = p.numel()
        out.append(ParamSlot(name, tuple(p.shape), pos, pos + n))
        pos += n
    return out


def vector_size(model: nn.Module) -> int:
    return sum(p.numel() for _, p in _params(model))


def model_to_vector(model: nn.Module) -> np.ndarray:
    """All parameters as one float32 vector (a copy)."""
    ps = [p.detach().reshape(-1).to(torch.float32).cpu() for _, p in _params(model)]
    if not ps:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(ps).numpy().astype(np.float32, copy=True)


def vector_to_model(model: nn.Module, vec: np.ndarray | torch.Tensor) -> nn.Module:
    """Load ``vec`` into ``model``'s parameters in place; returns the model."""
    v = torch.as_tensor(np.asarray(vec, dtype=np.float32) if not isinstance(vec, torch.Tensor) else vec)
    n = vector_size(model)
    if v.dim() != 1 or v.numel() != n:
        raise ValueError(f"vector has shape {tuple(v.shape)}; the model needs a 1-d vector of {n} values")
    if not torch.isfinite(v).all():
        raise ValueError("vector holds NaN or infinite values; refusing to load it")
    with torch.no_grad():
        pos = 0
        for _, p in _params(model):
            k = p.numel()
            p.copy_(v[pos : pos + k].view_as(p).to(p.dtype))
            pos += k
    return model


def task_slices(model: nn.Module) -> dict[str, list[slice]]:
    """``{"trunk": [slices], task: [slices], ...}`` into the flat vector.

    Parameters named ``heads.<task>.*`` belong to that task, everything else to
    ``"trunk"``. Slices are in vector order and together cover the vector exactly once.
    """
    inner = getattr(model, "_module", model)
    res: dict[str, list[slice]] = {"trunk": []}
    for t in getattr(inner, "tasks", []):
        res[t.name] = []
    for slot in parameter_layout(model):
        parts = slot.name.split(".")
        key = parts[1] if parts[0] == "heads" and len(parts) > 2 else "trunk"
        res.setdefault(key, []).append(slice(slot.start, slot.stop))
    return res


def slice_mask(model: nn.Module, keys: list[str]) -> np.ndarray:
    """Boolean mask over the vector selecting the parts named in ``keys``."""
    sl = task_slices(model)
    unknown = [k for k in keys if k not in sl]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; the model has {list(sl)}")
    m = np.zeros(vector_size(model), dtype=bool)
    for k in keys:
        for s in sl[k]:
            m[s] = True
    return m
