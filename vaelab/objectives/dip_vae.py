"""DIP-VAE-I and DIP-VAE-II (Kumar et al. 2018, "Variational Inference of Disentangled Latent Concepts
from Unlabeled Observations"): recon + beta * KL + a penalty that pulls a covariance of the codes
towards the identity, its off-diagonal weighted by dip_lambda_od and its diagonal by a fixed multiple."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaelab.checks import Float
from vaelab.objectives.record import Objective, Penalty, SpecKey

if TYPE_CHECKING:  # annotations only: spec checks read these records without torch
    from torch import Tensor

LAMBDA_OD = SpecKey("dip_lambda_od", "dip_vae_*: weight of the off-diagonal covariance penalty (the diagonal's "
                                     "is 10x for dip_vae_i, 1x for dip_vae_ii)", 10.0, Float(0.0, 1e6),
                    hashed_when_unused=True)
# The weight of the diagonal term as a multiple of loss.dip_lambda_od (Kumar et al. 2018, sec. 4; the
# values of disentanglement_lib's unsupervised study): 10 for DIP-VAE-I, 1 for DIP-VAE-II.
DIAGONAL_FACTOR_I, DIAGONAL_FACTOR_II = 10.0, 1.0
STACK_BLOCKER = ("adds a batch penalty; its runs train alone, as they always have (a stack would change "
                 "their numbers by float rounding)")


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


def _penalty_of(second: bool, diagonal_factor: float):
    def penalty(run: Any, dataset_size: int, aux: Any) -> Penalty:
        lambda_od = LAMBDA_OD.of(run.loss)
        lambda_d = diagonal_factor * lambda_od

        def term(mu: Tensor, logvar: Tensor, z: Tensor, drawn: Tensor | None) -> Tensor:
            return dip_penalty(mu, logvar, second, lambda_od, lambda_d)

        return Penalty(term)

    return penalty


DIP_VAE_I = Objective(
    name="dip_vae_i",
    label="DIP-VAE-I",
    summary="recon + beta * KL + moment penalty on Cov[mu(x)] (Kumar et al. 2018)",
    strength=LAMBDA_OD.dotted,
    keys=(LAMBDA_OD,),
    penalty=_penalty_of(second=False, diagonal_factor=DIAGONAL_FACTOR_I),
    stack_blocker=STACK_BLOCKER,
)
DIP_VAE_II = Objective(
    name="dip_vae_ii",
    label="DIP-VAE-II",
    summary="recon + beta * KL + moment penalty on Cov_q(z) (Kumar et al. 2018)",
    strength=LAMBDA_OD.dotted,
    keys=(LAMBDA_OD,),
    penalty=_penalty_of(second=True, diagonal_factor=DIAGONAL_FACTOR_II),
    stack_blocker=STACK_BLOCKER,
)
