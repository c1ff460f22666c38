"""InfoVAE / MMD-VAE (Zhao, Song & Ermon 2019, "InfoVAE: Balancing Learning and Inference in
Variational Autoencoders", AAAI): the ELBO's per-example KL replaced, in part or wholly, by a
divergence between the aggregate posterior q(z) = E_x q(z|x) and the prior p(z), here the maximum
mean discrepancy.

The paper's family (its InfoVAE objective, maximised):

    E_pD E_q(z|x)[log p(x|z)] - (1 - alpha) E_pD KL(q(z|x) || p(z)) - (alpha + lambda - 1) D(q(z) || p(z))

with D = MMD for the MMD-VAE. vaelab minimises, per image, in nats:

    recon + beta * KL + mmd_weight * MMD^2_u(q(z), p(z))

so loss.beta = 1 - alpha and loss.mmd_weight = alpha + lambda - 1. The paper's MMD-VAE (alpha = 1,
no per-example KL) is loss.beta: 0 with loss.mmd_weight: lambda; the default loss.beta 1 (alpha = 0)
keeps the ELBO and adds the MMD term. MMD^2_u is Gretton et al.'s (2012, eq. 3) unbiased estimate
between the batch's codes z ~ q(z|x) and as many samples of p(z) = N(0, I), drawn from the step's
seeded generator (so a compiled, stacked or resumed run draws the same ones).

Kernels (loss.mmd_kernel), with C = 2 * z_dim (= 2 d sigma^2 for the unit-variance prior):
imq  k(a, b) = C / (C + |a - b|^2), the inverse multiquadratic of Tolstikhin et al. (2018, WAE, sec. 4),
     one scale; its heavy tails keep gradients where q(z) and p(z) barely overlap.
rbf  k(a, b) = exp(-|a - b|^2 / C), a Gaussian kernel of bandwidth h^2 = z_dim (2 h^2 = C).

The penalty is per stack member and independent of loss.beta, so InfoVAE runs stack: the stacked
step evaluates it under vmap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaelab.checks import Choice, Float
from vaelab.objectives.record import Objective, Penalty, SpecKey

if TYPE_CHECKING:  # annotations only: spec checks read this record without torch
    import torch
    from torch import Tensor


def imq_kernel(sq_dist: Tensor, scale: float) -> Tensor:
    """Inverse multiquadratic C / (C + |a - b|^2) (Tolstikhin et al. 2018)."""
    return scale / (scale + sq_dist)


def rbf_kernel(sq_dist: Tensor, scale: float) -> Tensor:
    """Gaussian exp(-|a - b|^2 / C)."""
    return (-sq_dist / scale).exp()


KERNELS = {"imq": imq_kernel, "rbf": rbf_kernel}

WEIGHT = SpecKey("mmd_weight", "infovae: weight of MMD^2(q(z), p(z)) in the training loss (the paper's "
                               "alpha + lambda - 1; with loss.beta 0 its MMD-VAE)", 1000.0, Float(0.0, 1e6))
KERNEL = SpecKey("mmd_kernel", "infovae: the MMD's kernel, inverse multiquadratic (imq) or Gaussian (rbf), "
                               "scale C = 2 * z_dim", "imq", Choice(tuple(KERNELS)), hint="str")


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j|^2, (N, M), as |a|^2 + |b|^2 - 2 a.b: N x M memory rather than the N x M x D of
    differences (a batch of 1024 codes of 128 dimensions would hold half a GB); rounding below 0 clamped."""
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T).clamp(min=0)


def _mean_off_diagonal(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def mmd2_unbiased(x: Tensor, y: Tensor, kernel: str = "imq") -> Tensor:
    """The unbiased estimate of MMD^2 between the distributions of samples x (N, D) and y (M, D)
    (Gretton et al. 2012, eq. 3): the mean kernel within x and within y, each over pairs i != j,
    minus twice the mean across. It can be slightly negative; it is 0 in expectation when the
    distributions are equal. Scale C = 2 * D. Needs N, M >= 2."""
    k = KERNELS[kernel]
    scale = 2.0 * x.shape[1]
    within = _mean_off_diagonal(k(_sq_distances(x, x), scale)) + _mean_off_diagonal(k(_sq_distances(y, y), scale))
    return within - 2 * k(_sq_distances(x, y), scale).mean()


def _prior_samples(generator: torch.Generator, n: int, z_dim: int, device: torch.device) -> Tensor:
    import torch  # only when an infovae run trains: spec checks read this module without torch

    return torch.randn((n, z_dim), generator=generator, device=device)


def _penalty(run: Any, dataset_size: int, aux: Any) -> Penalty:
    weight, kernel = WEIGHT.of(run.loss), KERNEL.of(run.loss)

    def term(mu: Tensor, logvar: Tensor, z: Tensor, prior: Tensor | None) -> Tensor:
        assert prior is not None  # drawn by _prior_samples for every batch
        if z.shape[0] < 2:  # a last batch of one image: no pair to estimate from, no penalty
            return z.new_zeros(())
        return weight * mmd2_unbiased(z, prior, kernel)

    return Penalty(term, draw=_prior_samples)


OBJECTIVE = Objective(
    name="infovae",
    label="InfoVAE (MMD)",
    summary="recon + beta * KL + mmd_weight * MMD^2(q(z), p(z)) (Zhao et al. 2019; loss.beta 0: MMD-VAE)",
    strength=WEIGHT.dotted,
    keys=(WEIGHT, KERNEL),
    penalty=_penalty,
)
