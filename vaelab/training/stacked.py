"""The stepper of a stack: runs that differ only in loss.beta, train.seed or
train.lr train together as one model whose weights carry a leading "member"
dimension (`torch.func.stack_module_state` + `vmap`), with one optimiser step for all.

A small VAE leaves most of a CPU or GPU idle per step; stacking K of them turns K
small matmuls into one batched matmul. Each member draws its batches, noise and
validation noise from the same seeded generators its single run would use, so it
follows its single run up to float rounding. Gradients never mix between members,
so a NaN in one leaves the others untouched. A member's weights and optimiser
moments can be read out in a single run's format, and a stack can start from such
states: that is how stacked runs snapshot, resume and roll back.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from vaelab.data import ImageData
from vaelab.evaluation.estimators import SPLIT_TERMS
from vaelab.models import VAE
from vaelab.objectives import Penalty, objective_of, stacked_training_loss
from vaelab.progress import Bar
from vaelab.spec import RunSpec, flatten
from vaelab.training.member import Member
from vaelab.training.setup import make_optimizer
from vaelab.training.step import MaybeCompiled, member_images

# The keys members may differ in; everything else is shared by the stack.
STACKABLE_KEYS = ("loss.beta", "train.seed", "train.lr")


def stack_key(run: RunSpec) -> str:
    """Runs with equal keys can train as one stack."""
    flat = flatten(run)
    for key in STACKABLE_KEYS:
        flat.pop(key)
    return json.dumps(flat, sort_keys=True, default=str)


def stack_blocker(run: RunSpec) -> str | None:
    """Why `run` cannot train in a stack, or None if it can (such runs train one at a time)."""
    if run.loss.likelihood == "gaussian_learned":
        return "loss.likelihood=gaussian_learned learns its sigma inside the likelihood"
    if run.train.figure_every:
        return "train.figure_every draws each run's weights mid-training, which live in the stack"
    if run.train.keep_every or run.train.keep_best:
        return "train.keep_every / keep_best save each run's weights mid-training, which live in the stack"
    blocker = objective_of(run).stack_blocker
    if blocker is not None:
        return f"loss.objective={run.loss.objective} {blocker}"
    return None


class StackedAdam:
    """Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay)
    over stacked parameters, with one learning rate and one step count per member
    (Kingma & Ba 2015, algorithm 1). Used when the members' rates or step counts
    differ; otherwise torch's fused Adam does the same update in one kernel."""

    def __init__(self, params: list[Tensor], lrs: Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, steps: Tensor | None = None):
        self.params, self.lrs, self.betas, self.eps = params, lrs, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros(len(lrs), dtype=torch.float64) if steps is None else steps.double().cpu()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        bias1 = (1 - beta1**self.steps).to(self.lrs.device)
        bias2_sqrt = (1 - beta2**self.steps).sqrt().to(self.lrs.device)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            shape = (-1, *([1] * (p.dim() - 1)))
            step_size = (self.lrs / bias1).to(p.dtype).view(shape)
            # p -= step * m / (sqrt(v) / bias2_sqrt + eps), with the division folded into the denominator.
            denom = v.sqrt().div_(bias2_sqrt.to(p.dtype).view(shape)).add_(self.eps).div_(step_size)
            p.addcdiv_(m, denom, value=-1.0)


def _vmapped_forward(template: VAE) -> Callable:
    def forward(params, buffers, x, noise, y):
        out = functional_call(template, (params, buffers), (x,), {"noise": noise, "y": y})
        return out.params, out.mu, out.logvar, out.z, out.kl, out.log_ratio

    return forward


def _stacked_terms(step_all: Callable, likelihood, bf16: bool, penalty: Penalty | None,
                   gain: Callable[[Tensor], Tensor] | None = None) -> Callable:
    """(params, buffers, x, noise, y, drawn) -> recon (K, N), KL per dimension (K, N, z_dim) and the
    objective's batch term (K,) (None without one) of every member; the penalty runs under vmap, each
    member on its own codes and its own draws, as does a k-sample bound's gain (noise (K, k, N, noise_dim)),
    whose term is -gain as in a single run's step (step.batch_terms). The log-densities run outside vmap,
    over every member's rows at once (a likelihood may be an autograd.Function, which vmap cannot run)."""
    member_penalty = vmap(penalty) if penalty is not None else None
    member_gain = vmap(gain) if gain is not None else None

    def terms(params, buffers, x, noise, y, drawn=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out, mu, logvar, z, kl, log_ratio = step_all(params, buffers, x, noise, y)
        mu, logvar = mu.float(), logvar.float()
        extra = member_penalty(mu, logvar, z.float(), drawn) if member_penalty is not None else None
        if noise.dim() == 3:
            recon = -likelihood.log_prob(x.flatten(0, 1), out.float().flatten(0, 1)).view(len(x), -1)
            return recon, kl.float(), extra
        k, samples, n = log_ratio.shape  # members, codes per image, images
        x_rep = x.unsqueeze(1).expand(k, samples, *x.shape[1:]).flatten(0, 2)
        log_lik = likelihood.log_prob(x_rep, out.float().flatten(0, 1)).view(k, samples, n)
        recon = (-log_lik).mean(1)
        if member_gain is not None:
            bound_term = -member_gain(log_lik - log_ratio.float()).mean(1)
            extra = bound_term if extra is None else extra + bound_term
        return recon, kl.float(), extra

    return terms


def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> Tensor:
    """Each member's noise of `shape` from its own generator, as its single run draws it, stacked."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


class StackedStepper:
    def __init__(self, members: list[Member], models: list[VAE], data: ImageData,
                 optimizer_states: list[dict | None]):
        train = members[0].run.train
        self.data, self.k, self.z_dim, self.noise_dim = data, len(models), models[0].z_dim, models[0].noise_dim
        self.label = f" ({self.k} stacked)"
        self.state_keys = list(models[0].state_dict())
        storage, self.buffers = stack_module_state(models)
        # Linear weights are stored as (K, in, out): vmap's batched linear multiplies by the transpose of
        # (K, out, in), and from this layout that transpose is contiguous, so no weight copy per step.
        self.linear = {f"{name}.weight" for name, module in models[0].named_modules()
                       if isinstance(module, torch.nn.Linear)}
        self.storage = {n: p.detach().transpose(1, 2).contiguous().requires_grad_() if n in self.linear else p
                        for n, p in storage.items()}
        self.forward = _vmapped_forward(copy.deepcopy(models[0]).to("meta"))
        self.likelihood = models[0].likelihood  # parameter-free (stack_blocker): one instance serves all members
        # The objective's penalty, if any: stackable ones depend on no key members differ in (stack_blocker).
        # A k-sample bound depends on loss.iw_k, which members share (stack_key), so the first member's serves all.
        self.objective = objective_of(members[0].run).for_run(members[0].run, len(data.train), self.z_dim,
                                                              data.train.x.device)
        self.penalty = self.objective.penalty
        self.step_terms = MaybeCompiled(_stacked_terms(vmap(self.forward), self.likelihood,
                                                       train.precision == "bf16", self.penalty, self.objective.gain),
                                        compile=train.compile, on_cuda=data.train.x.device.type == "cuda")
        self.penalty_means: list[float] = []
        self.param_groups = make_optimizer(models[0], train.lr).state_dict()["param_groups"]
        self.optimizer: torch.optim.Adam | StackedAdam
        self._make_optimizer(members, optimizer_states)

    # ---- the optimiser, in and out of a single run's format ----------------------------------------
    def _make_optimizer(self, members: list[Member], states: list[dict | None]) -> None:
        params = list(self.storage.values())
        self.lrs = [s["param_groups"][0]["lr"] if s else m.run.train.lr for m, s in zip(members, states, strict=True)]
        moments = [s["state"] if s else {} for s in states]
        steps = [float(m[0]["step"]) if m else 0.0 for m in moments]
        if len(set(self.lrs)) == 1 and len(set(steps)) == 1:
            # One rate and one step count: Adam's update is elementwise, so stacked Adam is plain Adam,
            # and torch's is one fused kernel.
            fusable = all(p.device.type in ("cpu", "cuda") for p in params)
            self.optimizer = torch.optim.Adam(params, lr=self.lrs[0], fused=fusable or None)
            if steps[0]:
                for j, (name, p) in enumerate(self.storage.items()):
                    step = torch.tensor(steps[0], dtype=torch.float32, device=p.device if fusable else "cpu")
                    self.optimizer.state[p] = {"step": step, "exp_avg": self._stack(name, moments, j, "exp_avg"),
                                               "exp_avg_sq": self._stack(name, moments, j, "exp_avg_sq")}
            return
        stacked = StackedAdam(params, torch.tensor(self.lrs, device=params[0].device), steps=torch.tensor(steps))
        for j, name in enumerate(self.storage):
            if any(moments):
                stacked.exp_avg[j] = self._stack(name, moments, j, "exp_avg")
                stacked.exp_avg_sq[j] = self._stack(name, moments, j, "exp_avg_sq")
        self.optimizer = stacked

    def _stack(self, name: str, moments: list[dict], j: int, key: str) -> Tensor:
        """One moment of parameter j for every member, in the stack's layout (zeros for a fresh member)."""
        like = self.storage[name]
        rows = [self._to_stack_layout(name, m[j][key]) if m else torch.zeros_like(like[0]) for m in moments]
        return torch.stack(rows).to(like.device, like.dtype)

    def _to_stack_layout(self, name: str, t: Tensor) -> Tensor:
        return t.transpose(0, 1) if name in self.linear else t

    def _member_slice(self, name: str, t: Tensor, i: int) -> Tensor:
        row = t[i].transpose(0, 1) if name in self.linear else t[i]
        return row.detach().clone(memory_format=torch.contiguous_format)

    def optimizer_state(self, i: int) -> dict:
        """Member i's Adam state as torch's Adam over its single model would hold it."""
        groups = copy.deepcopy(self.param_groups)
        groups[0]["lr"] = self.lrs[i]
        state: dict[int, dict] = {}
        for j, (name, p) in enumerate(self.storage.items()):
            if isinstance(self.optimizer, StackedAdam):
                step = float(self.optimizer.steps[i])
                m, v = self.optimizer.exp_avg[j], self.optimizer.exp_avg_sq[j]
            else:
                held = self.optimizer.state.get(p)
                if not held:
                    continue
                step, m, v = float(held["step"]), held["exp_avg"], held["exp_avg_sq"]
            if step:
                state[j] = {"step": torch.tensor(step, dtype=torch.float32),
                            "exp_avg": self._member_slice(name, m, i), "exp_avg_sq": self._member_slice(name, v, i)}
        return {"state": state, "param_groups": groups}

    def aux_state(self, i: int) -> dict:
        return {}  # an objective with auxiliary state does not stack (stack_blocker)

    def epoch_extras(self, i: int) -> dict[str, float]:
        """Member i's train/penalty of the epoch just trained, as a single run logs it (none without a
        penalty or bound)."""
        return {"train/penalty": self.penalty_means[i]} if self.penalty_means else {}

    def weights(self, i: int) -> dict[str, Tensor]:
        """Member i's weights as its single model's state dict."""
        out = {}
        for key in self.state_keys:
            stacked = self.storage.get(key)
            out[key] = (self._member_slice(key, stacked, i) if stacked is not None
                        else self.buffers[key][i].clone())
        return out

    def _params(self) -> dict[str, Tensor]:
        return {n: p.transpose(1, 2) if n in self.linear else p for n, p in self.storage.items()}

    # ---- training and validation --------------------------------------------------------------------
    def train_epoch(self, epoch: int, members: list[Member], bar: Bar) -> list[list[float]]:
        data, train = self.data, members[0].run.train
        device = data.train.x.device
        n = len(data.train)
        n_batches = math.ceil(n / train.batch_size)
        orders = torch.stack([torch.randperm(n, generator=m.batch_gen) for m in members])
        weightings = [m.weighting for m in members]
        sums = torch.zeros(self.k, 3, device=device)
        penalty_sums = torch.zeros(self.k, device=device)
        for step, (idx, x) in enumerate(data.train.x.shuffled(orders, train.batch_size)):
            if data.augment or data.dynamic_binarize:
                x = torch.stack([member_images(xi, data, m.noise_gen) for xi, m in zip(x, members, strict=True)])
            batch = idx.shape[1]
            noise = _noise([m.noise_gen for m in members], self.objective.noise_shape(batch, self.noise_dim), device)
            drawn = self._draws(members, batch, device)
            recon, kl_dims, penalty = self.step_terms(self._params(), self.buffers, x, noise, data.train.y[idx], drawn)
            progress = epoch - 1 + step / n_batches
            objective, loss = stacked_training_loss(weightings, recon, kl_dims, progress, penalty)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()
            sums += torch.stack([loss.sum(1), recon.detach().sum(1), kl_dims.detach().sum((1, 2))], 1)
            if penalty is not None:
                penalty_sums += penalty.detach() * batch
            bar.update(1)
        self.penalty_means = (penalty_sums / n).tolist() if self.objective.adds_to_loss else []
        return (sums / n).tolist()

    def _draws(self, members: list[Member], n: int, device) -> Tensor | None:
        """What the penalty draws per step, from each member's generator in a single run's order."""
        if self.penalty is None or self.penalty.draw is None:
            return None
        return torch.stack([self.penalty.draw(m.noise_gen, n, self.z_dim, device) for m in members])

    def validate(self, members: list[Member]) -> list[list[float]]:
        """Per member, the means of SPLIT_TERMS over the validation split, as split_terms computes them."""
        data, likelihood = self.data, self.likelihood
        device, k = data.val.x.device, self.k
        gens = [m.validation_generator() for m in members]
        shared_images = vmap(self.forward, in_dims=(0, 0, None, 0, None))
        weightings = [m.weighting for m in members]
        totals = torch.zeros(k, len(SPLIT_TERMS), dtype=torch.float64, device=device)
        samples = self.objective.bound_samples  # a k-sample bound's runs validate on that bound (split_terms)
        params = self._params()
        batch_size = max(1, members[0].run.eval.batch_size // (samples or 1))
        with torch.no_grad():
            starts = range(0, len(data.val), batch_size)
            for start, x in zip(starts, data.val.x.batches(starts, batch_size), strict=True):
                y, n = data.val.y[start : start + batch_size], len(x)
                shape = (n, self.noise_dim) if samples is None else (samples, n, self.noise_dim)
                out, _, _, _, kl_dims, log_ratio = shared_images(params, self.buffers, x, _noise(gens, shape, device),
                                                                 y)
                s = samples or 1
                x_rep = x.expand(k * s, *x.shape).flatten(0, 1)
                log_lik = likelihood.log_prob(x_rep, out.flatten(0, 1)).view(k, s, n)
                recon, kl = -log_lik.mean(1), kl_dims.sum(2)
                if samples is None:
                    # validation uses the schedule's final form (t = inf) and no penalty, as a single run's does
                    _, loss = stacked_training_loss(weightings, recon, kl_dims, math.inf)
                else:  # the negative k-sample bound (Burda et al. 2016, eq. 8), each member's
                    loss = -(torch.logsumexp(log_lik - log_ratio, dim=1) - math.log(s))
                mse = (likelihood.mean(out[:, :n]) - x).pow(2).flatten(2).mean(2)
                totals += torch.stack([loss, recon, kl, recon + kl, mse], 1).sum(2).double()
        return (totals / len(data.val)).tolist()
