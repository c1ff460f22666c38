"""The stepper of a single run: one model, torch's fused Adam, the step eager or
compiled (vaelab.training.step), and whatever the run's objective trains beside it."""

from __future__ import annotations

import copy
import math

import torch

from vaelab.data import ImageData
from vaelab.evaluation.estimators import SPLIT_TERMS, split_terms
from vaelab.models import VAE
from vaelab.objectives import objective_of, training_loss
from vaelab.progress import Bar
from vaelab.training.member import Member
from vaelab.training.setup import make_optimizer
from vaelab.training.step import StepTerms, member_images


class SingleStepper:
    label = ""

    def __init__(self, member: Member, model: VAE, data: ImageData, optimizer_state: dict | None):
        train = member.run.train
        self.model, self.data = model, data
        self.optimizer = make_optimizer(model, train.lr)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)  # its lr too, lowered if a retry happened
        # The objective's penalty and auxiliary state (from the resume state when there is one).
        saved = member.resume.aux if member.resume is not None else None
        self.objective = objective_of(member.run).for_run(member.run, len(data.train), model.z_dim,
                                                          data.train.x.device, saved)
        self.step_terms = StepTerms(model, model.likelihood, bf16=train.precision == "bf16", compile=train.compile,
                                    penalty=self.objective.penalty, gain=self.objective.gain)
        self.extras: dict[str, float] = {}

    def train_epoch(self, epoch: int, members: list[Member], bar: Bar) -> list[list[float]]:
        (member,) = members
        data, model, optimizer, weighting = self.data, self.model, self.optimizer, member.weighting
        penalty_of = self.objective.penalty
        batch_size = member.run.train.batch_size
        model.train()
        sums = torch.zeros(4, device=data.train.x.device)
        n_batches = math.ceil(len(data.train) / batch_size)
        order = torch.randperm(len(data.train), generator=member.batch_gen)
        for step, (idx, images) in enumerate(data.train.x.shuffled(order, batch_size)):
            x = member_images(images, data, member.noise_gen)
            # (N, noise_dim), or (k, N, noise_dim) for a k-sample bound: one draw, in a single run's order
            noise = torch.randn(self.objective.noise_shape(len(x), model.noise_dim), generator=member.noise_gen,
                                device=x.device)
            drawn = penalty_of.sample(member.noise_gen, len(x), model.z_dim, x.device) if penalty_of else None
            recon, kl_dims, penalty, z = self.step_terms(x, data.train.y[idx], noise, drawn)
            progress = epoch - 1 + step / n_batches  # in epochs at the start of the step, for the KL schedule
            objective, loss = training_loss(weighting, recon, kl_dims, progress, penalty)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            self.objective.after_step(z, member.noise_gen)
            # Accumulate on the device: no host sync per step. train/loss includes the batch term (penalty, -gain).
            penalty_sum = penalty.detach() * len(x) if penalty is not None else loss.new_zeros(())
            sums += torch.stack([loss.sum(), recon.sum(), kl_dims.sum(1).sum(), penalty_sum]).detach()
            bar.update(1)
        means = (sums / len(data.train)).tolist()
        self.extras = self.objective.epoch_metrics(means[3])
        return [means[:3]]

    def epoch_extras(self, i: int) -> dict[str, float]:
        """The objective's own train/* metrics of the epoch just trained (none without a penalty or bound)."""
        return dict(self.extras)

    def aux_state(self, i: int) -> dict:
        """Training state beside the VAE's weights and Adam: what the objective trains (TrainState.aux)."""
        return self.objective.state()

    def validate(self, members: list[Member]) -> list[list[float]]:
        (member,) = members
        val = split_terms(self.model, self.data.val, self.model.likelihood, member.weighting,
                          member.run.eval.batch_size, member.validation_generator(), self.objective.bound_samples)
        return [[val[k] for k in SPLIT_TERMS]]

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def optimizer_state(self, i: int) -> dict:
        return copy.deepcopy(self.optimizer.state_dict())
