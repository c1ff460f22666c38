"""Evaluation of a trained VAE on a split: the negative ELBO and its parts, in
nats per example, plus a likelihood-free pixel error and active units."""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.data import Split
from vaelab.models import VAE
from vaelab.objectives import Likelihood, vae_terms

# Burda et al. 2016 (IWAE), section 5.2: a unit is active when Cov_x(E_q[z_u]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01


@torch.inference_mode()
def split_terms(
    model: VAE, split: Split, likelihood: Likelihood, beta: float, batch_size: int, generator: torch.Generator
) -> dict[str, float]:
    """Means over the split of loss, recon, kl, elbo (= recon + kl, the negative
    ELBO) and mse (per pixel, between the image and the decoder mean)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=split.x.device)
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size]
        out = model(x, generator=generator)
        terms = vae_terms(x, out.params, out.mu, out.logvar, likelihood, beta)
        mse = (likelihood.mean(out.params) - x).pow(2).flatten(1).mean(1)
        batch = torch.stack([terms.loss, terms.recon, terms.kl, terms.neg_elbo, mse])
        totals += batch.sum(1).double()
    model.train(was_training)
    means = (totals / len(split)).tolist()  # one host sync for the whole split
    return dict(zip(("loss", "recon", "kl", "elbo", "mse"), means, strict=False))


@torch.inference_mode()
def latent_means(model: VAE, x: Tensor, batch_size: int) -> Tensor:
    model.eval()
    return torch.cat([model.encode(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])


def active_units(means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent dimensions whose posterior mean varies across inputs."""
    return int((means.double().var(dim=0) > threshold).sum().item())


def evaluate_test(
    model: VAE, split: Split, likelihood: Likelihood, beta: float, batch_size: int, seed: int
) -> dict[str, float]:
    """All `test/...` metrics; seeded so the same model gives the same numbers."""
    generator = torch.Generator(device=split.x.device).manual_seed(seed + 1)
    metrics = {f"test/{k}": v for k, v in split_terms(model, split, likelihood, beta, batch_size, generator).items()}
    metrics["test/active_units"] = float(active_units(latent_means(model, split.x, batch_size)))
    return metrics
