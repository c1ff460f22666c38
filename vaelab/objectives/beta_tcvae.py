"""beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs"): the ELBO's KL
split into index-code mutual information, total correlation and dimension-wise KL, with only the
total correlation weighted by beta (eq. 4 with alpha = gamma = 1). As a loss:
recon + KL + (beta - 1) * TC, so the KL enters at weight 1 and TC at weight beta in all."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vaelab.objectives.record import Objective, Penalty

if TYPE_CHECKING:  # annotations only: spec checks read this record without torch
    from torch import Tensor


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


def _penalty(run: Any, dataset_size: int, aux: Any) -> Penalty:
    weight = run.loss.beta - 1.0  # with the KL at weight 1 (kl_beta), TC is weighted by beta in all

    def term(mu: Tensor, logvar: Tensor, z: Tensor, drawn: Tensor | None) -> Tensor:
        return weight * total_correlation(z, mu, logvar, dataset_size)

    return Penalty(term)


OBJECTIVE = Objective(
    name="beta_tcvae",
    label="β-TCVAE",
    summary="recon + KL + (beta - 1) * total correlation (Chen et al. 2018)",
    strength="loss.beta",
    kl_beta=lambda loss: 1.0,  # beta weights the total correlation (the penalty), not the KL
    penalty=_penalty,
    # Not stacked: its runs have always trained alone, and a stack would change their numbers by float
    # rounding (its penalty also depends on loss.beta, a key stack members may differ in).
    stack_blocker="adds a batch penalty weighted by loss.beta, which differs between stack members",
)
