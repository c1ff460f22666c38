"""The differentiable part of a training step, eager or compiled.

`StepTerms` maps a batch (x, y, noise, and what the objective's penalty drew from the
step's generator) to the per-example reconstruction term, the per-dimension KL and the
objective's batch term (its penalty; for a k-sample bound, noise (k, N, noise_dim) and minus the
bound's gain over the k codes' mean ELBO); the KL weighting (a schedule in Python floats) stays outside,
so a compiled graph never recompiles as the weight changes. With train.compile it
runs through torch.compile: on CUDA in mode "reduce-overhead", which replays the
forward and backward of a step as CUDA graphs (small VAEs are launch-bound there);
on CPU, inductor fuses the elementwise work. If compilation fails, the run warns
once and continues eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from vaelab.data.augment import augment_batch
from vaelab.likelihoods import Likelihood
from vaelab.models import VAE
from vaelab.objectives import Penalty


def batch_terms(model: VAE, likelihood: Likelihood, x: Tensor, y: Tensor, noise: Tensor,
                bf16: bool = False, penalty: Penalty | None = None, drawn: Tensor | None = None,
                gain: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(recon (N,), kl per dimension (N, z_dim), the objective's batch term (None without one), the
    codes z (detached: an objective's auxiliary trains on them)); `drawn` is what the penalty drew from
    the step's generator. With noise (k, N, noise_dim), k codes per image: recon and kl are the codes'
    means, and `gain` (a k-sample bound's, objectives.SampleBound) of their log weights enters the batch
    term as -gain, so the step minimises the negative bound. Matmuls in bf16 autocast when asked, the
    log-densities and the batch term always in fp32 (sums over pixels need the bits)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, y=y, noise=noise)
    mu, logvar = out.mu.float(), out.logvar.float()
    z = out.z.float()
    extra = penalty(mu, logvar, z, drawn) if penalty is not None else None
    if noise.dim() == 2:
        recon = -likelihood.log_prob(x, out.params.float())
    else:
        recon, bound_term = sampled_terms(likelihood, x, out.params.float(), out.log_ratio.float(), gain)
        extra = bound_term if extra is None or bound_term is None else extra + bound_term
    return recon, out.kl.float(), extra, z.detach()


def sampled_terms(likelihood: Likelihood, x: Tensor, params: Tensor, log_ratio: Tensor,
                  gain: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """(the k codes' mean recon (N,), -gain(log w).mean() or None) of one model, from its decoding of
    k codes per image (params (k * N, C, H, W)) and their log q(z|x) - log p(z) (k, N)."""
    samples = log_ratio.shape[0]
    x_rep = x.unsqueeze(0).expand(samples, *x.shape).flatten(0, 1)
    log_lik = likelihood.log_prob(x_rep, params).view(samples, len(x))
    recon = (-log_lik).mean(0)
    return recon, (-gain(log_lik - log_ratio).mean() if gain is not None else None)


class MaybeCompiled:
    """`fn`, through torch.compile when asked (CUDA graphs on a GPU), falling back
    to `fn` itself, with one warning, if compiling or running the compiled code fails."""

    def __init__(self, fn: Callable, compile: bool = False, on_cuda: bool = False):
        self.eager = fn
        self.fn = torch.compile(fn, mode="reduce-overhead" if on_cuda else None, dynamic=False) if compile else fn
        self.cuda_graphs = compile and on_cuda

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, *args):
        if not self.compiled:
            return self.eager(*args)
        if self.cuda_graphs:
            # A new step: outputs of the previous replay may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.fn(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back rather than lose the run
            warnings.warn(f"train.compile: compiling the step failed ({str(err).splitlines()[0][:200]}); "
                          "continuing without compilation", RuntimeWarning, stacklevel=2)
            self.fn, self.cuda_graphs = self.eager, False
            return self.eager(*args)


class StepTerms(MaybeCompiled):
    """(x, y, noise[, drawn]) -> batch_terms of one model (with its objective's penalty or its bound's
    gain), eager or compiled."""

    def __init__(self, model: VAE, likelihood: Likelihood, bf16: bool = False, compile: bool = False,
                 penalty: Penalty | None = None, gain: Callable[[Tensor], Tensor] | None = None):
        def terms(x: Tensor, y: Tensor, noise: Tensor,
                  drawn: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
            return batch_terms(model, likelihood, x, y, noise, bf16, penalty, drawn, gain)

        super().__init__(terms, compile, on_cuda=next(model.parameters()).device.type == "cuda")


def member_images(x: Tensor, data, generator: torch.Generator) -> Tensor:
    """A training batch as its run sees it: flipped and rotated (data.augment), and a
    fresh binary sample of each image every time it is seen (data.binarize: dynamic)."""
    if data.augment:
        x = augment_batch(x, generator)
    if data.dynamic_binarize:
        x = torch.bernoulli(x, generator=generator)
    return x
