"""Stacked training: runs that differ only in loss.beta, train.seed or train.lr
train together as one model whose weights carry a leading "member" dimension
(`torch.func.stack_module_state` + `vmap`), with one optimiser step for all.

A small VAE leaves most of a CPU or GPU idle per step; stacking K of them turns K
small matmuls into one batched matmul. Each member draws its batches, noise and
validation noise from the same seeded generators its single run would use, so it
follows its single run up to float rounding, and keeps its own early stopping,
best weights and failure (a NaN in one member leaves the others untouched: their
gradients never mix). Like train.py, this module knows nothing of MLflow or Optuna.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from vaelab.data import ImageData
from vaelab.data.augment import augment_batch
from vaelab.evaluate import SPLIT_TERMS
from vaelab.models import VAE
from vaelab.objectives import KLWeighting, kl_per_dimension, kl_weighting
from vaelab.spec import RunSpec, flatten
from vaelab.step import MaybeCompiled
from vaelab.train import NonFiniteLossError, RunResult, denormals_flushed, non_finite_reason, train_metrics

# The keys members may differ in; everything else is shared by the stack.
STACKABLE_KEYS = ("loss.beta", "train.seed", "train.lr")


def stack_key(run: RunSpec) -> str:
    """Runs with equal keys can train as one stack."""
    flat = flatten(run)
    for key in STACKABLE_KEYS:
        flat.pop(key)
    return json.dumps(flat, sort_keys=True, default=str)


def stack_blocker(run: RunSpec) -> str | None:
    """Why `run` cannot train in a stack, or None if it can."""
    if run.loss.likelihood == "gaussian_learned":
        return "loss.likelihood=gaussian_learned learns its sigma inside the likelihood"
    if run.train.figure_every:
        return "train.figure_every draws each run's weights mid-training, which live in the stack"
    return None


class StackedAdam:
    """Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay)
    over stacked parameters, with one learning rate per member. Used only when the
    members' learning rates differ; equal rates take torch's fused Adam."""

    def __init__(self, params: list[Tensor], lrs: Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lrs, self.betas, self.eps = params, lrs, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.steps
        bias2_sqrt = math.sqrt(1 - beta2**self.steps)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = (self.lrs / bias1).view(-1, *([1] * (p.dim() - 1)))
            # p -= step * m / (sqrt(v) / bias2_sqrt + eps), with the division folded into the denominator.
            denom = v.sqrt().div_(bias2_sqrt).add_(self.eps).div_(step_size)
            p.addcdiv_(m, denom, value=-1.0)


def stacked_optimizer(params: list[Tensor], lrs: list[float]):
    if len(set(lrs)) == 1:
        # One rate: Adam's update is elementwise, so stacked Adam is plain Adam, and torch's is one fused kernel.
        fusable = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.Adam(params, lr=lrs[0], fused=fusable or None)
    return StackedAdam(params, torch.tensor(lrs, device=params[0].device))


@dataclass
class MemberResult:
    """One member's training: its history as a single run would record it, or the error that ended it."""

    result: RunResult = field(default_factory=RunResult)
    error: BaseException | None = None


@dataclass
class _Member:
    run: RunSpec
    weighting: KLWeighting
    batch_gen: torch.Generator
    noise_gen: torch.Generator
    best_state: dict[str, Tensor]
    outcome: MemberResult = field(default_factory=MemberResult)
    done: bool = False


def _vmapped_forward(template: VAE) -> Callable:
    def forward(params, buffers, x, noise, y):
        out = functional_call(template, (params, buffers), (x,), {"noise": noise, "y": y})
        return out.params, out.mu, out.logvar

    return forward


def _stacked_terms(step_all: Callable, likelihood, bf16: bool) -> Callable:
    """(params, buffers, x, noise, y) -> recon (K, N) and KL per dimension (K, N, z_dim) of every member."""

    def terms(params, buffers, x, noise, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out, mu, logvar = step_all(params, buffers, x, noise, y)
        recon = -likelihood.log_prob(x.flatten(0, 1), out.float().flatten(0, 1)).view(len(x), -1)
        return recon, kl_per_dimension(mu.float(), logvar.float())

    return terms


def _kl_weights(members: list[_Member], t: float, device) -> Tensor | None:
    """Per-member KL weights as a (K, 1) tensor when every member's objective is
    recon + w * kl (no capacity target, no free bits); None otherwise."""
    if any(m.weighting.schedule == "capacity" or m.weighting.free_bits > 0 for m in members):
        return None
    return torch.tensor([m.weighting.weight(t) for m in members], device=device).unsqueeze(1)


def _losses(members: list[_Member], recon: Tensor, kl: Tensor, t: float, weights: Tensor | None) -> Tensor:
    """(K, N) per-example training losses; `weights` from _kl_weights, vectorised when there are some."""
    if weights is not None:
        return recon + weights * kl
    return torch.stack([m.weighting.per_example(recon[i], kl[i], t) for i, m in enumerate(members)])


def _objective_and_loss(members: list[_Member], recon: Tensor, kl_dims: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """The sum of the members' training objectives (their gradients stay apart: each
    depends on its own slice only) and the (K, N) per-example losses."""
    weights = _kl_weights(members, t, recon.device)
    loss = _losses(members, recon, kl_dims.sum(2), t, weights)
    if weights is not None:
        return loss.mean(1).sum(), loss.detach()
    objective = sum(m.weighting.objective(recon[i], kl_dims[i], t) for i, m in enumerate(members))
    return objective, loss.detach()


def _member_images(x: Tensor, data: ImageData, members: list[_Member]) -> Tensor:
    """Augment and binarise each member's batch with its own generator, in its single run's order."""
    if not (data.augment or data.dynamic_binarize):
        return x
    out = []
    for xi, m in zip(x, members, strict=True):
        if data.augment:
            xi = augment_batch(xi, m.noise_gen)
        if data.dynamic_binarize:
            xi = torch.bernoulli(xi, generator=m.noise_gen)
        out.append(xi)
    return torch.stack(out)


def _noise(generators: list[torch.Generator], n: int, z_dim: int, device) -> Tensor:
    return torch.stack([torch.randn((n, z_dim), generator=g, device=device) for g in generators])


def _validate(forward, params, buffers, members, likelihood, data: ImageData, batch_size: int, z_dim: int):
    """(K, 5) means of loss, recon, kl, elbo, mse over the validation split, as split_terms computes them."""
    device = data.val.x.device
    gens = [torch.Generator(device=device).manual_seed(m.run.train.seed + 2) for m in members]
    shared_images = vmap(forward, in_dims=(0, 0, None, 0, None))
    weights = _kl_weights(members, math.inf, device)  # validation uses the schedule's final form
    totals = torch.zeros(len(members), 5, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, len(data.val), batch_size):
            x, y = data.val.x[start : start + batch_size], data.val.y[start : start + batch_size]
            out, mu, logvar = shared_images(params, buffers, x, _noise(gens, len(x), z_dim, device), y)
            recon = -likelihood.log_prob(x.expand(len(members), *x.shape).flatten(0, 1), out.flatten(0, 1))
            recon = recon.view(len(members), -1)
            kl = kl_per_dimension(mu, logvar).sum(2)
            loss = _losses(members, recon, kl, math.inf, weights)
            mse = (likelihood.mean(out) - x).pow(2).flatten(2).mean(2)
            totals += torch.stack([loss, recon, kl, recon + kl, mse], 1).sum(2).double()
    return (totals / len(data.val)).tolist()


def fit_stack(
    runs: list[RunSpec],
    models: list[VAE],
    data: ImageData,
    callbacks: list[list[Callable[[int, dict[str, float]], None]]] | None = None,
    show_progress: bool = True,
) -> list[MemberResult]:
    """Train `models` (built from `runs`, same stack key) together; on return each
    holds the weights of its best epoch. A member's callbacks run after each of its
    epochs; one that raises ends that member only (its error is in its result)."""
    if len({stack_key(r) for r in runs}) != 1:
        raise ValueError("runs in one stack may differ only in " + ", ".join(STACKABLE_KEYS))
    blocked = [b for b in map(stack_blocker, runs) if b]
    if blocked:
        raise ValueError(f"cannot stack: {blocked[0]}")
    device = data.train.x.device
    train, k = runs[0].train, len(runs)
    callbacks = callbacks or [[] for _ in runs]
    storage, buffers = stack_module_state(models)
    # Linear weights are stored as (K, in, out): vmap's batched linear multiplies by the transpose of
    # (K, out, in), and from this layout that transpose is contiguous, so no weight copy per step.
    linear = {f"{name}.weight" for name, module in models[0].named_modules() if isinstance(module, torch.nn.Linear)}
    storage = {n: p.detach().transpose(1, 2).contiguous().requires_grad_() if n in linear else p
               for n, p in storage.items()}

    def as_params() -> dict[str, Tensor]:
        return {n: p.transpose(1, 2) if n in linear else p for n, p in storage.items()}

    template = copy.deepcopy(models[0]).to("meta")
    forward = _vmapped_forward(template)
    likelihood = models[0].likelihood  # parameter-free (stack_blocker): one instance serves all members
    step_terms = MaybeCompiled(_stacked_terms(vmap(forward), likelihood, train.precision == "bf16"),
                               compile=train.compile, on_cuda=device.type == "cuda")
    z_dim = models[0].z_dim
    optimizer = stacked_optimizer(list(storage.values()), [r.train.lr for r in runs])
    members = [
        _Member(run=r, weighting=kl_weighting(r), batch_gen=torch.Generator().manual_seed(r.train.seed),
                noise_gen=torch.Generator(device=device).manual_seed(r.train.seed),
                best_state=copy.deepcopy(m.state_dict()))
        for r, m in zip(runs, models, strict=True)
    ]
    n = len(data.train)
    n_batches = math.ceil(n / train.batch_size)
    with denormals_flushed():
        for epoch in range(1, train.epochs + 1):
            with tqdm(total=n_batches, desc=f"epoch {epoch}/{train.epochs} ({k} stacked)", unit="batch",
                      disable=not show_progress, dynamic_ncols=True) as bar:
                started = time.perf_counter()
                orders = torch.stack([torch.randperm(n, generator=m.batch_gen) for m in members]).to(device)
                sums = torch.zeros(k, 3, device=device)
                for step, start in enumerate(range(0, n, train.batch_size)):
                    idx = orders[:, start : start + train.batch_size]
                    x = _member_images(data.train.x[idx], data, members)
                    noise = _noise([m.noise_gen for m in members], idx.shape[1], z_dim, device)
                    recon, kl_dims = step_terms(as_params(), buffers, x, noise, data.train.y[idx])
                    progress = epoch - 1 + step / n_batches
                    objective, loss = _objective_and_loss(members, recon, kl_dims, progress)
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward()
                    optimizer.step()
                    sums += torch.stack([loss.sum(1), recon.detach().sum(1), kl_dims.detach().sum((1, 2))], 1)
                    bar.update(1)
                epoch_s = time.perf_counter() - started
                params = as_params()
                val = _validate(forward, params, buffers, members, likelihood, data, runs[0].eval.batch_size, z_dim)
            train_means = (sums / n).tolist()
            for i, m in enumerate(members):
                if not m.done:
                    _end_epoch(m, i, epoch, n_batches, train_means[i], val[i], epoch_s, params, buffers, callbacks[i])
            if all(m.done for m in members):
                break
    for model, m in zip(models, members, strict=True):
        model.load_state_dict(m.best_state)
    return [m.outcome for m in members]


def _end_epoch(m: _Member, i: int, epoch: int, n_batches: int, train_means, val_means, epoch_s: float,
               params, buffers, callbacks) -> None:
    """Member i's epoch as fit() would end it: metrics, non-finite check, callbacks, early stopping."""
    metrics = train_metrics(m.weighting, epoch, n_batches, *train_means)
    metrics["time/epoch_s"] = epoch_s  # the stack's wall time: every member shared the whole of it
    metrics.update({f"val/{name}": v for name, v in zip(SPLIT_TERMS, val_means, strict=True)})
    result = m.outcome.result
    reason = non_finite_reason(metrics, epoch)
    if reason:
        m.outcome.error = NonFiniteLossError(f"{reason} (try a lower train.lr)")
        m.done = True
        return
    if result.observe(epoch, metrics, m.run.train.patience):
        m.best_state = {**{n: p[i].detach().clone() for n, p in params.items()},
                        **{n: b[i].clone() for n, b in buffers.items()}}
    try:
        for callback in callbacks:
            callback(epoch, metrics)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # e.g. the tracking store refused a write: this member ends, the rest go on
        m.outcome.error = err
        m.done = True
        return
    m.done = result.stopped_early or epoch >= m.run.train.epochs
