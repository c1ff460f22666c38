"""FactorVAE (Kim & Mnih 2018, "Disentangling by Factorising"): recon + beta * KL + factor_gamma * TC,
the total correlation estimated by a discriminator trained beside the VAE (vaelab.objectives.
discriminator), whose weights and optimiser travel in the run's resume state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vaelab.checks import Float, Int
from vaelab.objectives.record import AuxiliaryRecord, Objective, Penalty, SpecKey, key_field

if TYPE_CHECKING:  # annotations only: spec checks read this record without torch
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class DiscriminatorSpec:
    """FactorVAE's discriminator (Kim & Mnih 2018, appendix A; disentanglement_lib's defaults)."""

    layers: int = key_field(6, Int(1, 32), "hidden layers of the MLP that tells q(z) from the product of its "
                                           "marginals")
    hidden: int = key_field(1000, Int(1, 100_000), "units per hidden layer (leaky ReLU, slope 0.2)")
    lr: float = key_field(1e-4, Float(0.0, 10.0, min_open=True), "the discriminator's own Adam learning rate")
    beta1: float = key_field(0.5, Float(0.0, 1.0, max_open=True), "its Adam beta1")
    beta2: float = key_field(0.9, Float(0.0, 1.0, max_open=True), "its Adam beta2")


GAMMA = SpecKey("factor_gamma", "factorvae: weight of the discriminator's total-correlation estimate",
                10.0, Float(0.0, 1e6), hashed_when_unused=True)
DISCRIMINATOR = SpecKey("discriminator", "", section=DiscriminatorSpec, hint="DiscriminatorSpec",
                        hashed_when_unused=True)


def discriminator_tc(logits: Tensor) -> Tensor:
    """FactorVAE's total-correlation estimate (Kim & Mnih 2018, eq. 3): TC(q(z)) ~ E_q(z)[log D(z) / (1 - D(z))]
    with D(z) = softmax(logits)[:, 0], the discriminator's probability that z is a code of q(z) rather than of
    prod_j q(z_j); log D / (1 - D) is the difference of the two logits. In nats."""
    return (logits[:, 0] - logits[:, 1]).mean()


def _discriminator(run: Any, z_dim: int, device: torch.device, state: dict | None) -> Any:
    from vaelab.objectives.discriminator import Adversary  # torch: only when a factorvae run trains

    return Adversary(z_dim, DISCRIMINATOR.of(run.loss), run.train.seed, device, state)


def _penalty(run: Any, dataset_size: int, critic: Any) -> Penalty:
    weight = GAMMA.of(run.loss)

    def term(mu: Tensor, logvar: Tensor, z: Tensor, drawn: Tensor | None) -> Tensor:
        return weight * discriminator_tc(critic(z))

    return Penalty(term)


OBJECTIVE = Objective(
    name="factorvae",
    label="FactorVAE",
    summary="recon + beta * KL + factor_gamma * TC by a discriminator (Kim & Mnih 2018)",
    strength=GAMMA.dotted,
    keys=(GAMMA, DISCRIMINATOR),
    penalty=_penalty,
    auxiliary=AuxiliaryRecord("discriminator", _discriminator),
    stack_blocker="adds a batch penalty from a discriminator trained beside each run, which a stack does not hold",
)
