"""Training objectives, one module per objective, each an `Objective` record (record.py); the ELBO's
terms, KL weighting and the one `training_loss` in kl.py.

OBJECTIVES is the registry the rest of vaelab loops over: spec.py builds loss.objective's choices,
the objectives' own loss.* keys, their unused-key rows and the hash rule from it; training asks a
run's record for its KL weight, penalty, auxiliary state and whether it stacks; the report takes
each objective's strength key from it. No objective name is spelled anywhere else.

Adding one: a module here with its record (its keys, strength, KL weight, penalty, and why it cannot
stack if it cannot), listed in _RECORDS below, and its tests. docs/architecture.md walks through
infovae.py as the example.
"""

from __future__ import annotations

from typing import Any

from vaelab.objectives import beta_tcvae, beta_vae, dip_vae, factorvae, infovae, iwae
from vaelab.objectives.kl import (
    SCHEDULES,
    KLWeighting,
    Terms,
    stacked_training_loss,
    training_loss,
    vae_terms,
)
from vaelab.objectives.record import Auxiliary, Objective, Penalty, RunObjective, SpecKey

__all__ = ["SCHEDULES", "KLWeighting", "Terms", "training_loss",
           "stacked_training_loss", "vae_terms", "Auxiliary", "Objective", "Penalty", "RunObjective", "SpecKey",
           "OBJECTIVES", "objective_keys", "foreign_keys", "unhashed_keys", "kl_weighting", "objective_of"]

# The registry, in the order loss.objective's help and the report's rows list them (the default first).
_RECORDS = (beta_vae.OBJECTIVE, beta_tcvae.OBJECTIVE, factorvae.OBJECTIVE, dip_vae.DIP_VAE_I, dip_vae.DIP_VAE_II,
            infovae.OBJECTIVE, iwae.OBJECTIVE)
OBJECTIVES: dict[str, Objective] = {o.name: o for o in _RECORDS}


def objective_keys() -> list[SpecKey]:
    """Every objective's own loss.* keys, each once, in the order the records declare them."""
    seen: dict[str, SpecKey] = {}
    for objective in _RECORDS:
        for key in objective.keys:
            seen.setdefault(key.name, key)
    return list(seen.values())


def foreign_keys(name: str) -> tuple[str, ...]:
    """The dotted loss.* keys (a section as its prefix, 'loss.discriminator.') that objective `name`
    does not read: other objectives' keys, and the shared ones its record ignores (iwae: loss.beta).
    A run's unused keys (spec.unused_keys)."""
    own = {key.name for key in OBJECTIVES[name].keys}
    return tuple(key.dotted for key in objective_keys() if key.name not in own) + OBJECTIVES[name].ignores


def unhashed_keys(name: str) -> tuple[str, ...]:
    """The foreign keys of objective `name` that do not count in its runs' RunSpec.hash (SpecKey.
    hashed_when_unused): a key added with a new objective changes no existing run's identity."""
    own = {key.name for key in OBJECTIVES[name].keys}
    return tuple(key.dotted for key in objective_keys() if key.name not in own and not key.hashed_when_unused)


def objective_of(run_spec: Any) -> Objective:
    """The record of a run's loss.objective."""
    return OBJECTIVES[run_spec.loss.objective]


def kl_weighting(run_spec: Any) -> KLWeighting:
    """How a run weights the ELBO's KL: its objective's weight (loss.beta, or 1 for beta_tcvae, whose
    beta weights the total correlation), with loss.kl_schedule's schedule and free bits."""
    loss = run_spec.loss
    return KLWeighting(beta=objective_of(run_spec).kl_beta(loss), schedule=loss.kl_schedule,
                       warmup_epochs=loss.warmup_epochs, cycles=loss.cycles, total_epochs=run_spec.train.epochs,
                       capacity_max=loss.capacity_max, capacity_epochs=loss.capacity_epochs, gamma=loss.gamma,
                       free_bits=loss.free_bits)
