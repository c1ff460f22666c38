"""The stepper of a single run: one model, torch's fused Adam, the step eager or
compiled (vaelab.training.step)."""

from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from vaelab.data import ImageData
from vaelab.evaluate import SPLIT_TERMS, split_terms
from vaelab.models import VAE
from vaelab.objectives import penalty_for
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
        self.step_terms = StepTerms(model, model.likelihood, bf16=train.precision == "bf16", compile=train.compile,
                                    penalty=penalty_for(member.run, len(data.train)))

    def train_epoch(self, epoch: int, members: list[Member], bar: tqdm) -> list[list[float]]:
        (member,) = members
        data, model, optimizer, weighting = self.data, self.model, self.optimizer, member.weighting
        batch_size = member.run.train.batch_size
        model.train()
        sums = torch.zeros(3, device=data.train.x.device)
        n_batches = math.ceil(len(data.train) / batch_size)
        order = torch.randperm(len(data.train), generator=member.batch_gen)
        for step, (idx, images) in enumerate(data.train.x.shuffled(order, batch_size)):
            x = member_images(images, data, member.noise_gen)
            noise = torch.randn((len(x), model.z_dim), generator=member.noise_gen, device=x.device)
            recon, kl_dims, penalty = self.step_terms(x, data.train.y[idx], noise)
            progress = epoch - 1 + step / n_batches  # in epochs at the start of the step, for the KL schedule
            kl = kl_dims.sum(1)
            optimizer.zero_grad(set_to_none=True)
            (weighting.objective(recon, kl_dims, progress) + penalty).backward()
            optimizer.step()
            # Accumulate on the device: no host sync per step. train/loss includes the batch penalty.
            loss = weighting.per_example(recon, kl, progress) + penalty.detach()
            sums += torch.stack([loss.sum(), recon.sum(), kl.sum()]).detach()
            bar.update(1)
        return [(sums / len(data.train)).tolist()]

    def validate(self, members: list[Member]) -> list[list[float]]:
        (member,) = members
        val = split_terms(self.model, self.data.val, self.model.likelihood, member.weighting,
                          member.run.eval.batch_size, member.validation_generator())
        return [[val[k] for k in SPLIT_TERMS]]

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def optimizer_state(self, i: int) -> dict:
        return copy.deepcopy(self.optimizer.state_dict())
