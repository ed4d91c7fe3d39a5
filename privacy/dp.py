"""Local training of a multi-task model with Opacus DP-SGD (or without DP, same loop).

:func:`train_local` trains ``model`` in place on ``(X, Y, mask)`` and returns a
:class:`TrainResult` holding the privacy record(s) the run cost, which
:mod:`fedmtl.privacy.accounting` composes with everything else spent on the dataset.
It is three steps, the way Opacus's ``make_private`` is split into its ``_prepare_*``
parts: a :class:`DPTrainingConfig` (the settings, validated once, independent of the
data), :func:`prepare` (checks the data and model against it, resolves the effective
sample rate, the steps and a calibrated noise multiplier, builds the generator,
optimiser, criterion and loader) and :func:`train` (Opacus's wrapping and the loop).

What it does, per step:

1. Poisson sampling: every record joins the batch independently with probability
   ``q`` (Opacus ``DPDataLoader``). Opacus derives ``q`` from the loader length, so the
   requested ``sample_rate`` is rounded to ``q = 1 / ceil(n / round(sample_rate * n))``;
   the *effective* rate is the one recorded and accounted (``TrainResult.sample_rate``).
2. Per-sample gradients of the masked multi-task loss (:mod:`fedmtl.models.losses`),
   clipped ``"flat"`` (whole-gradient L2 norm <= ``max_grad_norm``) or ``"per_layer"``
   (each parameter tensor <= ``max_grad_norm / sqrt(#tensors)``, so the total is still
   <= ``max_grad_norm``), summed, plus Gaussian noise of std
   ``noise_multiplier * max_grad_norm``, divided by the expected batch size.
3. FedProx (``fedprox_mu > 0``): the gradient of ``mu/2 * ||w - w_global||^2`` is added
   *after* clipping and noise. It depends only on the current and the (public) global
   weights, not on any record, so it is post-processing and costs no privacy; adding it
   to the per-sample loss would instead have it clipped and distorted.
4. One optimizer step (SGD, optional momentum).

Non-finite values: a record can make its own per-sample gradient (or its norm) NaN or
infinite (a model whose weights overflow float32 for that record's features). Such a
sample is treated the same way every time, as if clipped to norm 0: its gradient is zeroed
before clipping (``hooks``/``functorch``: :func:`nonfinite_samples` on Opacus's per-sample
gradients; ``ghost``: its clipping coefficient is 0 and the second backward pass is
recomputed with the sample's rows held at zero, :func:`ghost_backward`). The noise is
added as for any batch, so the step is the mechanism's output on the other samples, and
whether a record overflows changes nothing but that record's (bounded) contribution.
:func:`noise_only_update` is the change DP-SGD makes when every sample is clipped to 0
(the datasite's "null" update after a failure).

``dp=False`` runs the same loop (same Poisson batches, same loss, same FedProx term)
without clipping or noise; its record has ``noise_multiplier=0``, which accounts as
infinite epsilon -- honest about what non-private training costs.

``secure_mode``: Opacus's secure mode needs ``torchcsprng``, whose last release (0.2.1,
March 2021) is a compiled extension pinned to ``torch==1.8.1``; there is no build for
torch 2.x (pytorch/csprng#130 is still open), so it cannot be installed next to our
torch 2.13. When ``secure_mode=True`` and ``torchcsprng`` is not importable, this module
warns (:class:`SecureRNGUnavailableWarning`) and uses the strongest randomness it has:
a fresh ``torch.Generator`` for sampling and noise, re-seeded with 64 bits from
``os.urandom`` before every step (never a fixed seed; passing ``seed`` is refused), and
Opacus's floating-point-attack-resistant noise sampling (sum of 4 Gaussians). torch's
CPU generator is Mersenne Twister, *not* a cryptographically secure generator: an
adversary who could observe its raw outputs within one step could predict the rest of
that step. See docs/models.md.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmtl.errors import SecureRNGUnavailableWarning
from fedmtl.models.flat import vector_size
from fedmtl.models.losses import masked_multitask_loss, task_mean_losses
from fedmtl.models.nets import RNG_LOCK, global_rng
from fedmtl.models.tasks import TaskSpec, check_tasks
from fedmtl.privacy.accounting import ACCOUNTANTS, PrivacyRecord, calibrate_noise, epsilon_of

CLIPPINGS = ("flat", "per_layer")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


@dataclass
class TrainResult:
    """What one local training run did and cost.

    ``privacy_records`` go straight into :func:`fedmtl.privacy.accounting.epsilon_of`;
    ``epsilon`` is this run alone at ``delta`` (``None`` when no delta was given).
    ``losses`` is the mean masked loss of each step's batch (NaN for an empty batch);
    ``samples_seen`` the sum of the batch sizes; ``seconds`` the wall time of the steps
    alone (no setup, no final evaluation).
    """

    privacy_records: list[PrivacyRecord]
    noise_multiplier: float
    sample_rate: float
    steps: int
    n_samples: int
    epsilon: float | None
    delta: float | None
    losses: list[float]
    task_losses: dict[str, float] = field(default_factory=dict)
    dp: bool = True
    secure_rng: str = "none"
    samples_seen: int = 0
    seconds: float = 0.0

    @property
    def privacy_record(self) -> PrivacyRecord:
        """The single record of this run."""
        return self.privacy_records[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "privacy_records": [r.to_dict() for r in self.privacy_records],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "n_samples": self.n_samples,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "losses": list(self.losses),
            "task_losses": dict(self.task_losses),
            "dp": self.dp,
            "secure_rng": self.secure_rng,
            "samples_seen": self.samples_seen,
            "seconds": self.seconds,
        }


def effective_sample_rate(sample_rate: float, n_samples: int) -> tuple[float, int]:
    """``(q, batch_size)``: the Poisson rate Opacus will actually use for ``sample_rate``
    on ``n_samples`` records (``1 / #batches per epoch``), and the loader batch size."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if n_samples < 1:
        raise ValueError("no training samples: X is empty")
    batch = max(1, min(n_samples, round(sample_rate * n_samples)))
    n_batches = math.ceil(n_samples / batch)
    return 1.0 / n_batches, batch


def _csprng_available() -> bool:
    try:
        import torchcsprng  # noqa: F401
    except Exception:
        return False
    return True


def _urandom_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class _MaskedCriterion(nn.Module):
    """The masked multi-task loss as a criterion ``(outputs, (Y, mask))`` with a
    ``reduction`` attribute, as Opacus's ghost clipping wants."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.reduction = "mean"

    def forward(self, outputs: dict[str, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        Y, mask = target
        return masked_multitask_loss(outputs, Y, mask, self.tasks, reduction=self.reduction)


#: ghost clipping's first backward pass goes toward the batch's inputs only (see
#: :func:`ghost_backward`); False: Opacus's own ``loss.backward()`` (the reference)
GHOST_FIRST_PASS_TO_INPUTS = True


def ghost_backward(loss, inputs: torch.Tensor, *, replay: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Opacus' two-pass ghost clipping (``DPTensorFastGradientClipping.backward``, Opacus
    1.6) with a cheaper first pass.

    The first pass exists only to let the hooks record every layer's activations' output
    gradients, from which Opacus computes the per-sample gradient norms; Opacus runs it as
    ``loss.backward()``, which also computes every parameter gradient (each layer's dW) and
    then zeroes them. Here it is ``torch.autograd.grad`` toward the batch's inputs, so autograd
    skips every dW. The second pass is Opacus's, unchanged: the per-sample losses reweighted
    by the clipping coefficients, hooks off, parameter gradients accumulated; the optimizer
    then adds the noise. Same gradients as Opacus's (tests/privacy/test_dp.py).

    A sample whose per-sample loss or gradient norm is not finite gets clipping
    coefficient 0. Its rows would still poison the second pass (``0 * inf`` is NaN inside
    every weight gradient's sum over the batch), so then the second pass runs on
    ``replay(bad)``: the batch's per-sample losses recomputed with the same dropout masks
    and the ``bad`` rows held at zero at every layer (see :func:`train_local`).

    Args:
        loss: Opacus's ``DPTensorFastGradientClipping`` of the batch.
        inputs: the batch's inputs (requiring grad), the target of the first pass.
        replay: ``bad (bool, (B,)) -> per-sample losses (B,)`` as described; needed only
            when a sample is not finite.

    Raises:
        ValueError: an unsupported loss reduction.
        RuntimeError: a sample is not finite and no ``replay`` was given.
    """
    per_sample = loss.loss_per_sample
    if loss.loss_reduction == "mean":
        reduced = torch.mean(per_sample, dim=0)
    elif loss.loss_reduction == "sum":
        reduced = torch.sum(per_sample, dim=0)
    else:
        raise ValueError(f"loss_reduction = {loss.loss_reduction}; only 'sum' and 'mean' are supported")
    torch.autograd.grad(reduced, inputs=[inputs], retain_graph=True)
    loss.optimizer.zero_grad()
    coeff = loss.module.get_clipping_coef().to(per_sample.device)
    bad = ~torch.isfinite(coeff) | ~torch.isfinite(loss.module.per_sample_gradient_norms.to(per_sample.device)) \
        | ~torch.isfinite(per_sample.detach())
    loss.module.disable_hooks()
    try:
        if bool(bad.any()):
            if replay is None:
                raise RuntimeError("a sample's loss or gradient norm is not finite and no replay was given")
            coeff = torch.where(bad, torch.zeros_like(coeff), coeff)
            per_sample = torch.where(bad, torch.zeros_like(per_sample), replay(bad))
        second = torch.sum(coeff * per_sample)
        second.backward()
    finally:
        loss.module.enable_hooks()


def _lean_accumulate(dp_opt) -> None:
    """Opacus 1.6's fast-gradient-clipping optimizer stores each step's (already clipped)
    gradient with ``copy.deepcopy(p.grad.data)``, per parameter tensor per step (9% of a
    demo-sized step); a plain ``clone`` is the same copy without deepcopy's machinery."""
    if not hasattr(dp_opt, "accumulate") or not hasattr(dp_opt, "params"):
        return

    def accumulate() -> None:
        for p in dp_opt.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.data.clone()

    dp_opt.accumulate = accumulate


def nonfinite_samples(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """Which samples of a batch have a per-sample gradient that is not finite.

    The norm is computed as Opacus's ``DPOptimizer.clip_and_accumulate`` computes it
    (each parameter's per-sample L2 norm, then the L2 norm of those), so a sample is
    flagged exactly when Opacus's clipping factor would be NaN or 0 with an infinite
    gradient behind it: any NaN or infinite entry, or a norm that overflows.

    Args:
        grad_samples: one ``(B, ...)`` tensor of per-sample gradients per parameter.

    Returns:
        A bool tensor ``(B,)``; all False for an empty batch or no parameters.
    """
    if not grad_samples or len(grad_samples[0]) == 0:
        return torch.zeros(len(grad_samples[0]) if grad_samples else 0, dtype=torch.bool)
    device = grad_samples[0].device
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1).to(device) for g in grad_samples], dim=1).norm(2, dim=1)
    return ~torch.isfinite(norms)


def zero_samples(grad_sample: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``grad_sample`` (``(B, ...)``) with the rows of the ``bad`` samples set to 0 (not
    multiplied: ``0 * inf`` would be NaN)."""
    m = bad.to(grad_sample.device).view(-1, *([1] * (grad_sample.dim() - 1)))
    return torch.where(m, torch.zeros((), dtype=grad_sample.dtype, device=grad_sample.device), grad_sample)


def _zero_nonfinite_before_clipping(dp_opt) -> None:
    """Have Opacus's (per-sample-gradient) optimizer zero every sample whose gradient is
    not finite (:func:`nonfinite_samples`) before it clips, sums and noises: the sample
    then contributes what a gradient clipped to norm 0 contributes."""
    original = dp_opt.clip_and_accumulate

    def clip_and_accumulate() -> None:
        params = [p for p in dp_opt.params if getattr(p, "grad_sample", None) is not None]
        grads = [dp_opt._get_flat_grad_sample(p) for p in params]
        bad = nonfinite_samples(grads)
        if bool(bad.any()):
            for p, g in zip(params, grads):
                p.grad_sample = zero_samples(g, bad)
        original()

    dp_opt.clip_and_accumulate = clip_and_accumulate


@contextmanager
def _rows_held_at_zero(model: nn.Module, bad: torch.Tensor) -> Iterator[None]:
    """While active, every leaf module of ``model`` sees the ``bad`` rows of its input as
    zeros, so those rows stay finite through the network and send back gradients that
    are exactly 0 (never ``0 * inf``)."""

    def gate(_module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0 or len(args[0]) != len(bad):
            return None
        x = args[0]
        m = bad.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return (torch.where(m, torch.zeros((), dtype=x.dtype, device=x.device), x), *args[1:])

    handles = [m.register_forward_pre_hook(gate) for m in model.modules() if not any(True for _ in m.children())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def noise_only_update(
    *,
    n_params: int,
    steps: int,
    n_samples: int,
    sample_rate: float,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    momentum: float = 0.0,
    fedprox_mu: float = 0.0,
    offset: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The change of the flat weights that :func:`train_local` makes when every sample's
    gradient is clipped to norm 0: ``steps`` SGD steps (with ``momentum``) on the Gaussian
    noise alone, ``N(0, (noise_multiplier * max_grad_norm)^2)`` per coordinate divided by
    the expected batch size (as Opacus divides), plus the FedProx gradient
    ``fedprox_mu * (offset + change)`` where ``offset`` is the start minus the global
    weights (zeros when not given).

    Args:
        n_params: length of the flat weight vector.
        steps: optimiser steps of the round.
        n_samples: training records (the expected batch is ``int(n_samples * q)`` with the
            effective rate ``q`` of :func:`effective_sample_rate`).
        sample_rate: the requested Poisson rate.
        lr: learning rate.
        noise_multiplier: DP-SGD's noise multiplier (0: no noise, the change is 0 without
            FedProx).
        max_grad_norm: the clipping norm.
        momentum: SGD momentum.
        fedprox_mu: FedProx's ``mu``.
        offset: start minus global weights, ``(n_params,)``.
        rng: the generator (default: seeded with 128 bits from the OS); tests only.

    Returns:
        The change, float64 ``(n_params,)``.

    Raises:
        ValueError: a negative count, rate outside (0, 1] or negative noise.
    """
    if n_params < 0 or steps < 0 or noise_multiplier < 0:
        raise ValueError("n_params, steps and noise_multiplier must be >= 0")
    q, _ = effective_sample_rate(sample_rate, n_samples)
    expected = max(1, int(n_samples * q))
    if rng is None:
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    off = np.zeros(n_params) if offset is None else np.asarray(offset, dtype=np.float64)
    change = np.zeros(n_params)
    buf: np.ndarray | None = None
    std = float(noise_multiplier) * float(max_grad_norm)
    for _ in range(int(steps)):
        g = rng.normal(0.0, std, size=n_params) / expected if std > 0 else np.zeros(n_params)
        if fedprox_mu > 0:
            g = g + fedprox_mu * (off + change)
        buf = g if buf is None or momentum == 0 else momentum * buf + g
        change = change - lr * buf
    return change


@dataclass(frozen=True)
class DPTrainingConfig:
    """How to train, validated once: the steps, the optimiser, the privacy mechanism.

    Everything here is independent of the model and the records; :func:`prepare` checks
    the rest (shapes, the number of records) and resolves what depends on it (the
    effective sample rate, the steps of ``epochs``, a noise multiplier calibrated to a
    ``target``). Frozen: a config can be built once and used for many runs.

    Args:
        sample_rate: the requested Poisson rate, in (0, 1] (rounded as
            :func:`effective_sample_rate` says).
        lr: learning rate, > 0.
        epochs: passes over the data (``steps = max(1, round(epochs / q))``); give exactly
            one of ``epochs`` and ``steps``.
        steps: optimiser steps, a positive int.
        momentum: SGD momentum.
        dp: train with DP-SGD (clipping and noise); False runs the same loop without them.
        noise_multiplier: DP-SGD's noise multiplier, > 0; with ``dp=True`` give exactly
            one of it and ``target``. Set to 0.0 when ``dp=False``.
        target: ``(epsilon, delta)`` to calibrate the noise for, composed with ``prior``.
        delta: the delta at which :class:`TrainResult` reports epsilon (``target``'s
            delta when a target is given).
        accountant: ``"rdp"`` or ``"prv"`` (:func:`fedmtl.privacy.accounting.create_accountant`).
        prior: records already spent on the same data (used to calibrate a ``target``).
        max_grad_norm: the clipping norm, > 0 with ``dp=True``.
        clipping: ``"flat"`` or ``"per_layer"``.
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (flat clipping only).
        fedprox_mu: FedProx's ``mu``, >= 0; ``> 0`` needs ``global_vector``.
        global_vector: the global weights as :func:`fedmtl.models.flat.model_to_vector`
            lays them out (stored as float32).
        secure_mode: Opacus's secure mode (see the module docs); refuses a ``seed``.
        seed: a fixed seed for sampling, noise and dropout (tests and baselines only).

    Raises:
        ValueError: an argument out of range, or arguments that disagree (the message
            says which and what to pass instead).
    """

    sample_rate: float
    lr: float
    epochs: float | None = None
    steps: int | None = None
    momentum: float = 0.0
    dp: bool = True
    noise_multiplier: float | None = None
    target: tuple[float, float] | None = None
    delta: float | None = None
    accountant: str = "rdp"
    prior: tuple[PrivacyRecord, ...] = ()
    max_grad_norm: float = 1.0
    clipping: Literal["flat", "per_layer"] = "flat"
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    fedprox_mu: float = 0.0
    global_vector: np.ndarray | None = field(default=None, compare=False, repr=False)
    secure_mode: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        if self.steps is None and (not self.epochs or self.epochs <= 0):
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
                raise ValueError(f"steps must be a positive int, got {self.steps!r}")
            object.__setattr__(self, "steps", int(self.steps))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"unknown clipping {self.clipping!r}; choose one of {list(CLIPPINGS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"unknown grad_sample_mode {self.grad_sample_mode!r}; choose one of {list(GRAD_SAMPLE_MODES)}"
            )
        if self.grad_sample_mode == "ghost" and self.clipping != "flat":
            raise ValueError("ghost clipping only supports clipping='flat'")
        if self.fedprox_mu < 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {self.fedprox_mu!r}")
        if self.fedprox_mu > 0:
            if self.global_vector is None:
                raise ValueError("fedprox_mu > 0 needs global_vector, the global model's flat weights")
            object.__setattr__(self, "global_vector", np.asarray(self.global_vector, dtype=np.float32))
        if self.secure_mode and self.seed is not None:
            raise ValueError("a fixed seed is not allowed in secure_mode; drop seed or secure_mode")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose one of {list(ACCOUNTANTS)}")
        object.__setattr__(self, "prior", tuple(self.prior))
        if self.dp:
            self._check_dp()
        else:
            if self.noise_multiplier not in (None, 0, 0.0) or self.target is not None:
                raise ValueError("dp=False trains without noise; do not pass noise_multiplier or target")
            object.__setattr__(self, "noise_multiplier", 0.0)
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")

    def _check_dp(self) -> None:
        if (self.noise_multiplier is None) == (self.target is None):
            raise ValueError("with dp=True give exactly one of noise_multiplier and target=(epsilon, delta)")
        if self.target is not None:
            if not isinstance(self.target, (tuple, list)) or len(self.target) != 2:
                raise ValueError(f"target must be a pair (epsilon, delta), got {self.target!r}")
            t_eps, t_delta = self.target
            if self.delta is not None and self.delta != t_delta:
                raise ValueError(f"delta={self.delta} disagrees with target delta {t_delta}")
            object.__setattr__(self, "target", (t_eps, t_delta))
            object.__setattr__(self, "delta", t_delta)
        elif not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 with dp=True, got {self.noise_multiplier!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")


@dataclass
class PreparedTraining:
    """One run, set up by :func:`prepare` and consumed by :func:`train` (once).

    Holds the config, the model, the data and tasks, what the config resolved to on this
    data (``sample_rate`` is the effective ``q``, ``steps``, ``noise_multiplier``,
    ``delta``), the clipping bound(s) handed to Opacus, the randomness (``generator`` for
    Poisson sampling and noise; ``secure_rng`` as :class:`TrainResult` reports it), and the
    plain optimiser, criterion and data loader that :func:`train` makes private.
    """

    config: DPTrainingConfig
    model: nn.Module
    tasks: list[TaskSpec]
    X: torch.Tensor
    Y: torch.Tensor
    mask: torch.Tensor
    n_samples: int
    sample_rate: float
    batch_size: int
    steps: int
    noise_multiplier: float
    delta: float | None
    max_grad_norm: float | list[float]
    secure_rng: str
    native_secure: bool
    generator: torch.Generator
    data_loader: DataLoader
    optimizer: torch.optim.Optimizer
    criterion: _MaskedCriterion
    global_vector: torch.Tensor | None


def prepare(
    *,
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    mask: torch.Tensor,
    tasks: Sequence[TaskSpec],
    config: DPTrainingConfig,
) -> PreparedTraining:
    """Check ``(X, Y, mask)`` and the model against ``config`` and set the run up: the
    effective sample rate and steps, the noise multiplier (calibrated when the config
    gives a target), the clipping bound(s), the generator, the optimiser, the criterion
    and the data loader. Nothing touches the model's weights; Opacus's wrapping happens
    in :func:`train`, inside the forked global RNG it trains in.

    Args:
        model: the multi-task network to train in place.
        X: ``(n, features)`` inputs.
        Y: ``(n, tasks)`` labels.
        mask: ``(n, tasks)``, True where a label is present.
        tasks: the tasks, in ``Y``'s column order.
        config: the validated settings.

    Returns:
        The :class:`PreparedTraining` to pass to :func:`train`.

    Raises:
        ValueError: shapes that do not fit, no records, a ``global_vector`` of the wrong size.
        PrivacyBudgetError: a ``target`` that no noise multiplier meets (with the ``prior``).
    """
    tasks = check_tasks(tasks)
    if not isinstance(X, torch.Tensor) or X.dim() < 2:
        raise ValueError("X must be a tensor (n, features)")
    n = int(X.shape[0])
    if Y.shape != (n, len(tasks)) or mask.shape != (n, len(tasks)):
        raise ValueError(
            f"Y and mask must be ({n}, {len(tasks)}) for {n} samples and {len(tasks)} tasks; "
            f"got {tuple(Y.shape)} and {tuple(mask.shape)}"
        )
    q, batch_size = effective_sample_rate(config.sample_rate, n)
    steps = config.steps if config.steps is not None else max(1, round(float(config.epochs) / q))
    if config.fedprox_mu > 0 and config.global_vector.shape != (vector_size(model),):
        raise ValueError(
            f"global_vector has shape {config.global_vector.shape}; the model has {vector_size(model)} parameters"
        )
    noise_multiplier = config.noise_multiplier
    if config.dp and config.target is not None:
        t_eps, t_delta = config.target
        noise_multiplier = calibrate_noise(target_epsilon=t_eps, delta=t_delta, sample_rate=q, steps=steps,
                                           accountant=config.accountant, prior=config.prior)
    assert noise_multiplier is not None

    secure_rng, native_secure = _secure_rng(config.secure_mode)
    gen = torch.Generator()
    gen.manual_seed(config.seed if config.seed is not None else _urandom_seed())
    params = [p for p in model.parameters() if p.requires_grad]
    n_tensors = len(params)
    mgn: float | list[float] = (
        config.max_grad_norm if config.clipping == "flat" else [config.max_grad_norm / math.sqrt(n_tensors)] * n_tensors
    )
    return PreparedTraining(
        config=config,
        model=model,
        tasks=tasks,
        X=X,
        Y=Y,
        mask=mask,
        n_samples=n,
        sample_rate=q,
        batch_size=batch_size,
        steps=steps,
        noise_multiplier=float(noise_multiplier),
        delta=config.delta,
        max_grad_norm=mgn,
        secure_rng=secure_rng,
        native_secure=native_secure,
        generator=gen,
        data_loader=DataLoader(_Rows(X.float(), Y.float(), mask.bool()), batch_size=batch_size, generator=gen,
                               collate_fn=_stacked),
        optimizer=torch.optim.SGD(params, lr=config.lr, momentum=config.momentum),
        criterion=_MaskedCriterion(tasks),
        global_vector=torch.from_numpy(config.global_vector) if config.fedprox_mu > 0 else None,
    )


class _Rows(TensorDataset):
    """The training tensors, fetched a batch at a time: torch's loader asks ``__getitems__``
    for a whole batch of indices (one indexing per tensor) instead of ``__getitem__`` per
    record and stacking them (an eighth of a site's training time went there)."""

    def __getitems__(self, indices: list[int]) -> "_Batch":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _Batch(tuple(t[idx] for t in self.tensors))


class _Batch:
    """A batch's tensors; its length is the number of records, as a list of records' would
    be (Opacus's loader gives an empty batch its own zero-row tensors when it is 0)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])


def _stacked(batch: _Batch) -> tuple[torch.Tensor, ...]:
    return batch.tensors


def _secure_rng(secure_mode: bool) -> tuple[str, bool]:
    """``(secure_rng, native)``: what randomness a run uses (warning when secure mode
    falls back to the reseeded generator) and whether Opacus's own secure mode runs."""
    if not secure_mode:
        return "none", False
    if _csprng_available():
        return "torchcsprng", True
    warnings.warn(
        "secure_mode=True but torchcsprng is not installed (its last release, 0.2.1, is "
        "built for torch 1.8.1 and does not work with this torch). Falling back to torch's "
        "Mersenne Twister generator re-seeded from os.urandom before every step, with "
        "Opacus's floating-point-attack-resistant noise sampling. This is NOT a "
        "cryptographically secure generator; see docs/models.md.",
        SecureRNGUnavailableWarning,
        stacklevel=3,
    )
    return "urandom-reseeded-mt19937", False


def _make_private(run: PreparedTraining) -> tuple[Any, Any, Any, Any]:
    """Opacus's ``make_private`` on the prepared model, optimiser and loader, with our
    non-finite protections installed: ``(wrapped model, DP optimiser, criterion, Poisson
    loader)``. The caller closes the wrapped model."""
    from opacus import PrivacyEngine

    cfg = run.config
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=run.native_secure)
    kwargs: dict[str, Any] = {}
    if cfg.secure_mode and not run.native_secure:
        # use Opacus's secure-noise path with our own generator
        engine.secure_mode = True
        engine.secure_rng = run.generator
    elif not cfg.secure_mode:
        kwargs["noise_generator"] = run.generator
    out = engine.make_private(
        module=run.model,
        optimizer=run.optimizer,
        criterion=run.criterion,
        data_loader=run.data_loader,
        noise_multiplier=run.noise_multiplier,
        max_grad_norm=run.max_grad_norm,
        poisson_sampling=True,
        clipping=cfg.clipping,
        grad_sample_mode=cfg.grad_sample_mode,
        **kwargs,
    )
    if cfg.grad_sample_mode == "ghost":
        wrapped, dp_opt, dp_crit, loader = out
        _lean_accumulate(dp_opt)
    else:
        wrapped, dp_opt, loader = out
        dp_crit = run.criterion
        _zero_nonfinite_before_clipping(dp_opt)
    return wrapped, dp_opt, dp_crit, loader


def train(run: PreparedTraining) -> TrainResult:
    """Run the prepared training (module docs, steps 1-4) and report what it cost.

    Trains ``run.model`` in place in a fork of torch's global RNG (dropout draws from it:
    reproducible with a seed, unpredictable without one; the caller's state is left as
    it was); the model is unwrapped and its gradients cleared afterwards, whatever happened.

    Args:
        run: from :func:`prepare`; consumed (train each prepared run once).

    Returns:
        The :class:`TrainResult`.

    Raises:
        RuntimeError: Opacus sampled at another rate than the one accounted.
    """
    cfg = run.config
    model = run.model
    wrapped = None
    try:
        with global_rng(cfg.seed if cfg.seed is not None else _urandom_seed()), warnings.catch_warnings():
            model.train()
            # Opacus's hooks fire on module outputs when X does not require grad: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if cfg.dp:
                wrapped, opt, crit, loader = _make_private(run)
                q_used = loader.sample_rate if hasattr(loader, "sample_rate") else 1.0 / len(loader)
                if not math.isclose(q_used, run.sample_rate, rel_tol=1e-12):
                    raise RuntimeError(
                        f"Opacus sampled at rate {q_used}, expected {run.sample_rate}; refusing to mis-account"
                    )
                net = wrapped
            else:
                from opacus.data_loader import DPDataLoader

                loader = DPDataLoader.from_data_loader(run.data_loader, generator=run.generator)
                net, opt, crit = model, run.optimizer, run.criterion
            losses, seen, loop_seconds = _run_steps(run, net, opt, crit, loader)
    finally:
        if wrapped is not None:
            wrapped._close()
        for p in model.parameters():
            p.grad = None

    with torch.no_grad():
        was = model.training
        model.eval()
        task_losses = task_mean_losses(model(run.X.float()), run.Y.float(), run.mask.bool(), run.tasks)
        model.train(was)
    records = [PrivacyRecord(noise_multiplier=run.noise_multiplier, sample_rate=run.sample_rate, steps=run.steps)]
    delta = run.delta
    eps = epsilon_of(records, delta=delta, accountant=cfg.accountant) if delta is not None else None
    return TrainResult(
        privacy_records=records,
        noise_multiplier=run.noise_multiplier,
        sample_rate=run.sample_rate,
        steps=run.steps,
        n_samples=run.n_samples,
        epsilon=eps,
        delta=delta,
        losses=losses,
        task_losses=task_losses,
        dp=cfg.dp,
        secure_rng=run.secure_rng,
        samples_seen=seen,
        seconds=loop_seconds,
    )


def _run_steps(run: PreparedTraining, net, opt, crit, loader) -> tuple[list[float], int, float]:
    """The loop: ``run.steps`` steps over the Poisson batches of ``loader``.
    Returns ``(losses, samples seen, seconds)``."""
    cfg = run.config
    reseed = cfg.secure_mode and not run.native_secure
    lean_ghost = cfg.dp and cfg.grad_sample_mode == "ghost" and GHOST_FIRST_PASS_TO_INPUTS
    model, criterion = run.model, run.criterion
    losses: list[float] = []
    done = seen = 0
    t_start = time.perf_counter()
    while done < run.steps:
        for xb, yb, mb in loader:
            if reseed:
                run.generator.manual_seed(_urandom_seed())
            opt.zero_grad(set_to_none=True)
            lean = lean_ghost and len(xb) > 0
            if lean:
                xb = xb.detach().requires_grad_(True)
            rng_state = _rng_state() if lean else None  # dropout's masks, for a replay
            outputs = net(xb)
            loss = crit(outputs, (yb, mb))
            if lean:
                ghost_backward(loss, xb, replay=lambda bad, xb=xb, yb=yb, mb=mb, rng_state=rng_state: _replay_losses(
                    model, criterion, xb, yb, mb, bad, rng_state))
            else:
                loss.backward()
            losses.append(float(loss.item()) if len(xb) else float("nan"))
            seen += len(xb)
            stepped = opt.pre_step() if cfg.dp else True
            if stepped:
                if run.global_vector is not None:
                    _add_proximal_grad(list(model.parameters()), run.global_vector, cfg.fedprox_mu)
                (opt.original_optimizer if cfg.dp else opt).step()
            done += 1
            if done >= run.steps:
                break
    return losses, seen, time.perf_counter() - t_start


def train_local(
    *,
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    mask: torch.Tensor,
    tasks: Sequence[TaskSpec],
    epochs: float | None = None,
    steps: int | None = None,
    sample_rate: float,
    lr: float,
    momentum: float = 0.0,
    dp: bool = True,
    noise_multiplier: float | None = None,
    target: tuple[float, float] | None = None,
    delta: float | None = None,
    accountant: Literal["rdp", "prv"] = "rdp",
    prior: Sequence[PrivacyRecord] = (),
    max_grad_norm: float = 1.0,
    clipping: Literal["flat", "per_layer"] = "flat",
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks",
    fedprox_mu: float = 0.0,
    global_vector: np.ndarray | None = None,
    secure_mode: bool = False,
    seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place: ``train(prepare(..., config=DPTrainingConfig(...)))``.

    Args:
        model, X, Y, mask, tasks: as :func:`prepare` takes them.
        epochs, steps, sample_rate, lr, momentum, dp, noise_multiplier, target, delta,
            accountant, prior, max_grad_norm, clipping, grad_sample_mode, fedprox_mu,
            global_vector, secure_mode, seed: the fields of :class:`DPTrainingConfig`.

    Returns:
        The :class:`TrainResult` of :func:`train`.

    Raises:
        ValueError: from :class:`DPTrainingConfig` or :func:`prepare`, before the model
            is touched.
        PrivacyBudgetError: a ``target`` that cannot be met.
    """
    config = DPTrainingConfig(
        sample_rate=sample_rate, lr=lr, epochs=epochs, steps=steps, momentum=momentum, dp=dp,
        noise_multiplier=noise_multiplier, target=target, delta=delta, accountant=accountant, prior=tuple(prior),
        max_grad_norm=max_grad_norm, clipping=clipping, grad_sample_mode=grad_sample_mode, fedprox_mu=fedprox_mu,
        global_vector=global_vector, secure_mode=secure_mode, seed=seed,
    )
    return train(prepare(model=model, X=X, Y=Y, mask=mask, tasks=tasks, config=config))


def _rng_state() -> torch.Tensor:
    with RNG_LOCK:
        return torch.get_rng_state()


def _replay_losses(model: nn.Module, criterion: "_MaskedCriterion", xb: torch.Tensor, yb: torch.Tensor,
                   mb: torch.Tensor, bad: torch.Tensor, rng_state: torch.Tensor) -> torch.Tensor:
    """The batch's per-sample losses recomputed for :func:`ghost_backward`: the same
    dropout masks (the global generator restored to its state before the first forward)
    and the ``bad`` rows held at zero at every layer (:func:`_rows_held_at_zero`). Opacus's
    hooks are disabled by the caller, so nothing is recorded twice."""
    with RNG_LOCK:
        torch.set_rng_state(rng_state)
    with _rows_held_at_zero(model, bad):
        outputs = model(xb.detach())
    return masked_multitask_loss(outputs, yb, mb, criterion.tasks, reduction="none")


def _add_proximal_grad(params: list[torch.Tensor], global_vec: torch.Tensor, mu: float) -> None:
    """p.grad += mu * (p - w_global) for each parameter, in flat-vector order."""
    pos = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            if not p.requires_grad:
                pos += k
                continue
            g = global_vec[pos : pos + k].view_as(p).to(p.dtype)
            prox = mu * (p - g)
            if p.grad is None:
                p.grad = prox.clone()
            else:
                p.grad.add_(prox)
            pos += k


__all__ = [
    "CLIPPINGS",
    "DPTrainingConfig",
    "GRAD_SAMPLE_MODES",
    "PreparedTraining",
    "SecureRNGUnavailableWarning",
    "TrainResult",
    "effective_sample_rate",
    "ghost_backward",
    "noise_only_update",
    "nonfinite_samples",
    "prepare",
    "train",
    "train_local",
    "zero_samples",
]
