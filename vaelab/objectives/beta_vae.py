"""beta-VAE (Higgins et al. 2017): recon + beta * KL, the plain ELBO at beta = 1 and the default
objective. It has no penalty; KLWeighting's schedules and free bits shape its KL weight."""

from __future__ import annotations

from vaelab.objectives.record import Objective

OBJECTIVE = Objective(
    name="beta_vae",
    label="β-VAE",
    summary="recon + beta * KL (Higgins et al. 2017; the ELBO at beta 1)",
    strength="loss.beta",
)
