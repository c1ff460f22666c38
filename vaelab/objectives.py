"""The analytic KL to the prior and the beta-weighted loss (likelihoods: vaelab.likelihoods).

Every term is in nats per example (summed over pixels, averaged over the batch),
so numbers compare with the VAE literature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: spec checks read SCHEDULES without importing torch
    from torch import Tensor

    from vaelab.likelihoods import Likelihood

# The names loss.kl_schedule may take (KLWeighting below implements each).
SCHEDULES = ("constant", "linear", "cyclical", "capacity")
# The names loss.objective may take: the ELBO's KL weighted (beta_vae), or a penalty beside it (Penalty).
# STRENGTH names the key that sets how hard each one pushes (the x axis of a study's figures).
OBJECTIVES = ("beta_vae", "beta_tcvae", "factorvae", "dip_vae_i", "dip_vae_ii")
STRENGTH = {"beta_vae": "loss.beta", "beta_tcvae": "loss.beta", "factorvae": "loss.factor_gamma",
            "dip_vae_i": "loss.dip_lambda_od", "dip_vae_ii": "loss.dip_lambda_od"}
# DIP-VAE's weight of the diagonal term as a multiple of loss.dip_lambda_od (Kumar et al. 2018, sec. 4; the
# values of disentanglement_lib's unsupervised study): 10 for DIP-VAE-I, 1 for DIP-VAE-II.
DIP_DIAGONAL_FACTOR = {"dip_vae_i": 10.0, "dip_vae_ii": 1.0}


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent dimension, (N, z_dim), in
    closed form (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per example."""
    return kl_per_dimension(mu, logvar).sum(1)


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
        """The scalar a training step minimises."""
        if self.free_bits <= 0:
            return self.per_example(recon, kl_dims.sum(1), t).mean()
        kl = kl_dims.mean(0).clamp(min=self.free_bits).sum()  # batch-level, per dimension
        if self.schedule == "capacity":
            return recon.mean() + self.gamma * (kl - self.capacity(t)).abs()
        return recon.mean() + self.weight(t) * kl


def kl_weighting(run_spec) -> KLWeighting:
    loss = run_spec.loss
    # beta-TCVAE weights the total correlation by beta (Penalty), the ELBO's KL by 1.
    beta = 1.0 if getattr(loss, "objective", "beta_vae") == "beta_tcvae" else loss.beta
    return KLWeighting(beta=beta, schedule=loss.kl_schedule, warmup_epochs=loss.warmup_epochs,
                       cycles=loss.cycles, total_epochs=run_spec.train.epochs, capacity_max=loss.capacity_max,
                       capacity_epochs=loss.capacity_epochs, gamma=loss.gamma, free_bits=loss.free_bits)


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


def vae_terms(x: Tensor, params: Tensor, mu: Tensor, logvar: Tensor, likelihood: Likelihood,
              weighting: float | KLWeighting, t: float = math.inf) -> Terms:
    """The terms of one batch; `weighting` is a KLWeighting or a constant beta,
    `t` the training progress in epochs (inf: the final objective)."""
    if not isinstance(weighting, KLWeighting):
        weighting = KLWeighting(beta=weighting)
    recon = -likelihood.log_prob(x, params)
    kl_dims = kl_per_dimension(mu, logvar)
    kl = kl_dims.sum(1)
    return Terms(recon=recon, kl=kl, loss=weighting.per_example(recon, kl, t),
                 objective=weighting.objective(recon, kl_dims, t))


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)), elementwise, in nats."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * (-logvar).exp())


def total_correlation(z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int) -> Tensor:
    """TC(q(z)) = KL(q(z) || prod_d q(z_d)) of a batch, by minibatch-weighted sampling (Chen et al.
    2018, eq. 7 and appendix C.1): log q(z_i) ~ logsumexp_j log q(z_i | x_j) - log(N M), and likewise
    per dimension for log q(z_id); N = the training set's size, M = the batch's. In nats."""
    batch = z.shape[0]
    pairwise = gaussian_log_density(z.unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0))  # (M, M, D)
    log_nm = math.log(dataset_size * batch)
    log_qz = pairwise.sum(2).logsumexp(dim=1) - log_nm
    log_prod_qzd = (pairwise.logsumexp(dim=1) - log_nm).sum(1)
    return (log_qz - log_prod_qzd).mean()


def dip_penalty(mu: Tensor, logvar: Tensor, second: bool, lambda_od: float, lambda_d: float) -> Tensor:
    """DIP-VAE's moment matching (Kumar et al. 2018, eqs. 6 and 7): lambda_od * sum_{i != j} C_ij^2 +
    lambda_d * sum_i (C_ii - 1)^2, with C = Cov_x[mu(x)] (DIP-VAE-I) or Cov_q(z) = E_x[diag sigma^2(x)]
    + Cov_x[mu(x)] (DIP-VAE-II), estimated over the batch."""
    centred = mu - mu.mean(0, keepdim=True)
    cov = centred.T @ centred / mu.shape[0]
    if second:
        cov = cov + logvar.exp().mean(0).diag()
    diagonal = cov.diagonal()
    off = cov - diagonal.diag()
    return lambda_od * off.pow(2).sum() + lambda_d * (diagonal - 1).pow(2).sum()


def discriminator_tc(logits: Tensor) -> Tensor:
    """FactorVAE's total-correlation estimate (Kim & Mnih 2018, eq. 3): TC(q(z)) ~ E_q(z)[log D(z) / (1 - D(z))]
    with D(z) = softmax(logits)[:, 0], the discriminator's probability that z is a code of q(z) rather than of
    prod_j q(z_j); log D / (1 - D) is the difference of the two logits. In nats."""
    return (logits[:, 0] - logits[:, 1]).mean()


@dataclass(frozen=True)
class Penalty:
    """A batch-level term added to the training objective: beta-TCVAE's (beta - 1) * TC (so that with
    the KL at weight 1 the total correlation is weighted by beta, Chen et al. 2018, eq. 4), or DIP-VAE's
    moment penalty, or FactorVAE's factor_gamma * TC by its discriminator (`critic`: codes -> logits). It
    enters train/loss; validation and test losses are the ELBO's (recon + KL)."""

    objective: str
    weight: float  # beta_tcvae: beta - 1; factorvae: factor_gamma; dip_vae_*: lambda_od
    dataset_size: int
    critic: Callable[[Tensor], Tensor] | None = None  # factorvae: the discriminator (vaelab.training.adversary)

    def __call__(self, mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
        if self.objective == "beta_tcvae":
            return self.weight * total_correlation(z, mu, logvar, self.dataset_size)
        if self.objective == "factorvae":
            if self.critic is None:
                raise ValueError("the factorvae penalty needs its discriminator")
            return self.weight * discriminator_tc(self.critic(z))
        factor = DIP_DIAGONAL_FACTOR[self.objective]
        return dip_penalty(mu, logvar, self.objective == "dip_vae_ii", self.weight, factor * self.weight)


def penalty_for(run_spec, dataset_size: int, critic: Callable[[Tensor], Tensor] | None = None) -> Penalty | None:
    """The run's Penalty, or None for beta_vae (today's objective); `critic` is factorvae's discriminator."""
    loss = run_spec.loss
    if loss.objective == "beta_vae":
        return None
    weight = {"beta_tcvae": loss.beta - 1.0, "factorvae": loss.factor_gamma}.get(loss.objective, loss.dip_lambda_od)
    return Penalty(loss.objective, weight, dataset_size, critic)
