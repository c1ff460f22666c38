"""What an objective is: an `Objective` record that spec checks, training, stacking and the report
loop over, so that no code outside an objective's own module spells its name.

An objective is the ELBO's two terms, the KL weighted as its record says (`kl_beta`), plus at most
one batch-level `Penalty` (a total correlation, a moment penalty, an MMD), optionally estimated
with state trained beside the VAE (`Auxiliary`: FactorVAE's discriminator); or a bound on log p(x)
from k samples per image (`SampleBound`: the IWAE's), which the step computes from the same
forward pass with k codes per image. Its own spec keys are flat `loss.*` keys (`SpecKey`) that
spec.py adds to LossSpec. No torch at module level: spec.py reads these records to build its checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vaelab.checks import Check

if TYPE_CHECKING:  # annotations only
    import torch
    from torch import Tensor


def key_field(default: Any, check: Check, doc: str) -> Any:
    """A spec field with its check and help, as spec.py's sections declare theirs (for an objective's
    own nested section, e.g. loss.discriminator)."""
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class SpecKey:
    """One loss.* key of an objective: a value (`check`, `default`) or a nested section (`section`, a
    frozen dataclass of key_field()s). Keys keep flat names (loss.factor_gamma), so specs written
    before objectives were records read the same; two objectives may share a key (dip_lambda_od)."""

    name: str  # loss.<name>
    doc: str
    default: Any = None
    check: Check | None = None
    section: type | None = None
    hint: str = "float"  # the field's annotation in LossSpec
    # Whether the key counts in RunSpec.hash of runs whose objective does not use it. The keys that
    # existed in hash version 3 (every key counted then) keep doing so, so the runs, resume states and
    # sweep points already keyed by those hashes are still found; a key added since counts only in
    # its own objective's runs, so adding it changes no existing run's identity.
    hashed_when_unused: bool = False

    @property
    def dotted(self) -> str:
        """loss.<name>, or loss.<name>. for a section (a prefix of its keys)."""
        return f"loss.{self.name}" + ("." if self.section is not None else "")

    def of(self, loss: Any) -> Any:
        """This key's value in a run's LossSpec."""
        return getattr(loss, self.name)

    def dataclass_field(self) -> Any:
        if self.section is not None:
            return field(default_factory=self.section, metadata={"section": self.section})
        return field(default=self.default, metadata={"check": self.check, "doc": self.doc})


@dataclass(frozen=True)
class Penalty:
    """An objective's batch-level term, added to the training objective and to train/loss (not to
    validation or test losses), in nats per image and already weighted by its strength.

    `term(mu, logvar, z, drawn)` is a function of the batch's posterior parameters, its codes z and
    what `draw` took from the step's generator (None without `draw`). Drawing happens outside the
    differentiable step, from the member's own seeded generator in a fixed order, so a compiled step
    and a stacked one (where `term` runs under vmap) see the same numbers, and a resumed run replays."""

    term: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    # (generator, batch size, z_dim, device) -> what term needs at random (e.g. samples of p(z))
    draw: Callable[[torch.Generator, int, int, torch.device], Tensor] | None = None

    def sample(self, generator: torch.Generator, n: int, z_dim: int, device: torch.device) -> Tensor | None:
        return None if self.draw is None else self.draw(generator, n, z_dim, device)

    def __call__(self, mu: Tensor, logvar: Tensor, z: Tensor, drawn: Tensor | None = None) -> Tensor:
        return self.term(mu, logvar, z, drawn)


@dataclass(frozen=True)
class SampleBound:
    """A bound on log p(x) from k codes per image that an objective trains on (iwae.py). The step draws
    noise (k, N, noise_dim) from the member's generator, one forward pass gives each code's
    reconstruction term and log weight log w_i = log p(x, z_i) - log q(z_i|x), and the training loss of
    an image is the k samples' mean negative ELBO less `gain(log_w)`: what the bound adds to that ELBO
    on the same draws. It enters training_loss as the objective's batch term (train/penalty = -gain),
    so train/recon and train/kl stay the samples' means and train/loss is the negative bound."""

    key: SpecKey  # the loss.* key holding k, the samples per image (named when a step is too large)
    # log weights (k, N) -> (N,) the bound less the samples' mean log weight (>= 0); differentiable
    gain: Callable[[Tensor], Tensor]

    def samples(self, loss: Any) -> int:
        return int(self.key.of(loss))


class Auxiliary(Protocol):
    """State an objective trains beside the VAE (FactorVAE's discriminator), stepped after the VAE's
    step on the batch's codes. Its state travels in TrainState.aux under the record's name."""

    def step(self, z: Tensor, generator: torch.Generator) -> None: ...

    def epoch_metrics(self) -> dict[str, float]: ...  # its train/* metrics over the epoch; resets them

    def state(self) -> dict: ...


@dataclass(frozen=True)
class AuxiliaryRecord:
    name: str  # its key in TrainState.aux
    # (run spec, z_dim, device, saved state or None) -> the Auxiliary
    build: Callable[[Any, int, torch.device, dict | None], Auxiliary]


def _beta(loss: Any) -> float:
    return loss.beta


@dataclass(frozen=True)
class Objective:
    """One training objective: recon + kl_beta(loss) * KL (KLWeighting adds schedules and free bits
    to that weight) + its penalty; or, with a `bound`, the negative k-sample bound."""

    name: str  # the value of loss.objective
    label: str  # how figures and tables name it (beta-VAE)
    summary: str  # the objective in one line, with its paper: loss.objective's help
    strength: str  # the dotted key that sets how hard it pushes (the report's x axis per objective)
    keys: tuple[SpecKey, ...] = ()  # its own loss.* keys (shared ones listed by each user)
    kl_beta: Callable[[Any], float] = _beta  # LossSpec -> the weight of the ELBO's KL term
    # (run spec, training set size, auxiliary or None) -> its batch penalty; None: no penalty
    penalty: Callable[[Any, int, Any], Penalty] | None = None
    auxiliary: AuxiliaryRecord | None = None
    # Why its runs cannot train in a stack (vaelab.training.stacked), or None if they can. A stacked
    # penalty runs under vmap with the first member's settings: a stackable objective's penalty must
    # not depend on the keys stack members may differ in (loss.beta, train.seed, train.lr).
    stack_blocker: str | None = None
    # (run spec) -> a one-line SpecError text naming the dotted key it cannot train with, or None
    conflicts: Callable[[Any], str | None] | None = None
    # A k-sample bound it trains on in place of recon + kl_beta * KL (iwae), or None: the ELBO, one code per image.
    bound: SampleBound | None = None
    # Shared loss.* keys (dotted) its runs do not read (iwae: loss.beta): left out of their MLflow params.
    ignores: tuple[str, ...] = ()

    def samples_per_image(self, loss: Any) -> int:
        """Codes a training step draws per image: its bound's k, else 1 (what a step's memory and time scale by)."""
        return 1 if self.bound is None else self.bound.samples(loss)

    def for_run(self, run: Any, dataset_size: int, z_dim: int, device: torch.device,
                saved: dict | None = None) -> RunObjective:
        """This objective as one run trains it; `saved` is TrainState.aux of a resumed run."""
        aux = None
        if self.auxiliary is not None:
            state = (saved or {}).get(self.auxiliary.name)
            aux = self.auxiliary.build(run, z_dim, device, state)
        penalty = self.penalty(run, dataset_size, aux) if self.penalty is not None else None
        return RunObjective(penalty, aux, self.auxiliary.name if self.auxiliary is not None else "",
                            self.bound.gain if self.bound is not None else None, self.samples_per_image(run.loss))


@dataclass
class RunObjective:
    """A run's objective while it trains: its penalty and auxiliary state, if any, and the gain of
    its k-sample bound (None: one code per image, the ELBO)."""

    penalty: Penalty | None
    aux: Auxiliary | None = None
    aux_name: str = ""
    gain: Callable[[Tensor], Tensor] | None = None
    samples: int = 1  # codes per image of a bound

    def noise_shape(self, n: int, noise_dim: int) -> tuple[int, ...]:
        """The standard-normal noise a step of n images draws: (k, n, noise_dim) for a k-sample bound
        (k = 1 included: the same numbers in the same order as (n, noise_dim)), else (n, noise_dim)."""
        return (self.samples, n, noise_dim) if self.gain is not None else (n, noise_dim)

    @property
    def bound_samples(self) -> int | None:
        """k of the k-sample bound the run trains on (its validation loss is that bound too), else None."""
        return self.samples if self.gain is not None else None

    @property
    def adds_to_loss(self) -> bool:
        """Whether the step returns a batch term added to the weighted ELBO (a penalty, a bound's -gain)."""
        return self.penalty is not None or self.gain is not None

    def after_step(self, z: Tensor, generator: torch.Generator) -> None:
        """What trains after the VAE's step (FactorVAE: the discriminator, on the batch's codes)."""
        if self.aux is not None:
            self.aux.step(z, generator)

    def epoch_metrics(self, penalty_mean: float | None) -> dict[str, float]:
        """The objective's own train/* metrics of an epoch: train/penalty (as it entered train/loss; a
        bound's: minus its gain over the ELBO) and the auxiliary's (none for beta_vae)."""
        metrics = {"train/penalty": penalty_mean} if self.adds_to_loss and penalty_mean is not None else {}
        if self.aux is not None:
            metrics.update(self.aux.epoch_metrics())
        return metrics

    def state(self) -> dict:
        """What TrainState.aux carries for this objective."""
        return {self.aux_name: self.aux.state()} if self.aux is not None else {}
