"""The ELBO's terms: the KL to the prior (computed by the prior's record, vaelab.models.priors), its
weighting over training (KLWeighting), and `training_loss`, the one place a run's training loss is
put together (single, stacked and validation steps, and evaluation through `vae_terms`).
Likelihoods: vaelab.likelihoods.

Every term is in nats per example (summed over pixels, averaged over the batch), so numbers
compare with the VAE literature. No torch import at module level: spec checks read SCHEDULES.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from torch import Tensor

    from vaelab.likelihoods import Likelihood

# The names loss.kl_schedule may take (KLWeighting below implements each).
SCHEDULES = ("constant", "linear", "cyclical", "capacity")


@dataclass(frozen=True)
class KLWeighting:
    """How the KL term enters the training loss at training progress t (in epochs,
    fractional). At t = inf every schedule has reached its final form, which is
    what validation and test losses use, so early stopping sees a fixed objective.

    constant: beta * KL.  linear: beta * min(1, t / warmup_epochs) * KL (warm-up,
    Bowman et al. 2016).  cyclical: the linear ramp over the first half of each of
    `cycles` equal cycles (Fu et al. 2019).  capacity: gamma * |KL - C(t)| with C
    growing linearly to capacity_max over capacity_epochs (Burgess et al. 2018).
    free_bits > 0: each dimension's batch-mean KL counts at least free_bits nats
    in the training objective (Kingma et al. 2016)."""

    beta: float = 1.0
    schedule: str = "constant"
    warmup_epochs: float = 10.0
    cycles: int = 4
    total_epochs: int = 10
    capacity_max: float = 25.0
    capacity_epochs: float = 10.0
    gamma: float = 100.0
    free_bits: float = 0.0

    @property
    def linear(self) -> bool:
        """Whether the per-example loss is recon + weight(t) * KL (a stack can weight it as one tensor)."""
        return self.schedule != "capacity" and self.free_bits <= 0

    def weight(self, t: float) -> float:
        if self.schedule == "linear":
            return self.beta * min(1.0, t / self.warmup_epochs)
        if self.schedule == "cyclical" and math.isfinite(t):
            period = self.total_epochs / self.cycles
            phase = (t % period) / period
            return self.beta * min(1.0, phase / 0.5)
        return self.beta

    def capacity(self, t: float) -> float:
        return self.capacity_max * min(1.0, t / self.capacity_epochs)

    def per_example(self, recon: Tensor, kl: Tensor, t: float = math.inf) -> Tensor:
        if self.schedule == "capacity":
            return recon + self.gamma * (kl - self.capacity(t)).abs()
        return recon + self.weight(t) * kl

    def objective(self, recon: Tensor, kl_dims: Tensor, t: float) -> Tensor:
        """The scalar a training step minimises (without an objective's batch penalty)."""
        if self.free_bits <= 0:
            return self.per_example(recon, kl_dims.sum(1), t).mean()
        kl = kl_dims.mean(0).clamp(min=self.free_bits).sum()  # batch-level, per dimension
        if self.schedule == "capacity":
            return recon.mean() + self.gamma * (kl - self.capacity(t)).abs()
        return recon.mean() + self.weight(t) * kl


def training_loss(weighting: KLWeighting, recon: Tensor, kl_dims: Tensor, t: float = math.inf,
                  penalty: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One run's batch: (the scalar a step minimises, the per-example loss train/loss reports).

    recon (N,) = -log p(x|z), kl_dims (N, z_dim), t the training progress in epochs (inf: the final
    form, which validation and test use), penalty the objective's batch term (a scalar, already
    weighted: vaelab.objectives.Penalty) or None. The penalty enters the training loss only;
    validation and test pass none, so their loss is the weighted ELBO and early stopping compares
    like with like."""
    loss = weighting.per_example(recon, kl_dims.sum(1), t)
    # Without free bits the objective is the loss's mean; computed once on the training step's path.
    objective = loss.mean() if weighting.free_bits <= 0 else weighting.objective(recon, kl_dims, t)
    if penalty is None:
        return objective, loss
    return objective + penalty, loss + penalty.detach()


def stacked_training_loss(weightings: list[KLWeighting], recon: Tensor, kl_dims: Tensor, t: float = math.inf,
                          penalty: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """training_loss of K stacked members at once: recon (K, N), kl_dims (K, N, z_dim), penalty (K,) or
    None -> (the sum of the members' objectives, (K, N) detached per-example losses). Gradients stay
    apart: each member's objective depends on its own slice only. Where every member's loss is
    recon + w * KL, one tensor expression with a (K, 1) column of weights; else training_loss per member."""
    import torch  # here, not at module level: spec checks import this module without torch

    if not all(w.linear for w in weightings):
        parts = [training_loss(w, recon[i], kl_dims[i], t, None if penalty is None else penalty[i])
                 for i, w in enumerate(weightings)]
        return torch.stack([p[0] for p in parts]).sum(), torch.stack([p[1] for p in parts]).detach()
    weights = torch.tensor([w.weight(t) for w in weightings], device=recon.device).unsqueeze(1)
    loss = recon + weights * kl_dims.sum(2)
    if penalty is not None:
        loss = loss + penalty.unsqueeze(1)
    return loss.mean(1).sum(), loss.detach()


@dataclass
class Terms:
    """Per-example tensors (N,): reconstruction = -log p(x|z), kl, and the
    training loss recon + beta * kl. The negative ELBO is recon + kl (beta = 1)."""

    recon: Tensor
    kl: Tensor
    loss: Tensor
    objective: Tensor  # the scalar to minimise (differs from loss.mean() only with free bits)

    @property
    def neg_elbo(self) -> Tensor:
        return self.recon + self.kl


def vae_terms(x: Tensor, params: Tensor, kl_dims: Tensor, likelihood: Likelihood,
              weighting: float | KLWeighting, t: float = math.inf) -> Terms:
    """The terms of one batch; `kl_dims` the model's KL per example (VAEOutput.kl: per dimension, or one
    Monte Carlo column), `weighting` a KLWeighting or a constant beta, `t` the training progress in
    epochs (inf: the final objective)."""
    if not isinstance(weighting, KLWeighting):
        weighting = KLWeighting(beta=weighting)
    recon = -likelihood.log_prob(x, params)
    objective, loss = training_loss(weighting, recon, kl_dims, t)
    return Terms(recon=recon, kl=kl_dims.sum(1), loss=loss, objective=objective)
