"""The differentiable part of a training step, eager or compiled.

`StepTerms` maps a batch (x, y, noise, and what the objective's penalty drew from the
step's generator) to the per-example reconstruction term, the per-dimension KL and the
objective's batch penalty; the KL weighting (a schedule in Python floats) stays outside,
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
                bf16: bool = False, penalty: Penalty | None = None,
                drawn: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(recon (N,), kl per dimension (N, z_dim), the objective's batch penalty (None without one), the
    codes z (detached: an objective's auxiliary trains on them)); `drawn` is what the penalty drew from
    the step's generator. Matmuls in bf16 autocast when asked, the log-densities and the penalty always
    in fp32 (sums over pixels need the bits)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, y=y, noise=noise)
    recon = -likelihood.log_prob(x, out.params.float())
    mu, logvar = out.mu.float(), out.logvar.float()
    z = out.z.float()
    extra = penalty(mu, logvar, z, drawn) if penalty is not None else None
    return recon, out.kl.float(), extra, z.detach()


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
    """(x, y, noise[, drawn]) -> batch_terms of one model (with its objective's penalty), eager or compiled."""

    def __init__(self, model: VAE, likelihood: Likelihood, bf16: bool = False, compile: bool = False,
                 penalty: Penalty | None = None):
        def terms(x: Tensor, y: Tensor, noise: Tensor,
                  drawn: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
            return batch_terms(model, likelihood, x, y, noise, bf16, penalty, drawn)

        super().__init__(terms, compile, on_cuda=next(model.parameters()).device.type == "cuda")


def member_images(x: Tensor, data, generator: torch.Generator) -> Tensor:
    """A training batch as its run sees it: flipped and rotated (data.augment), and a
    fresh binary sample of each image every time it is seen (data.binarize: dynamic)."""
    if data.augment:
        x = augment_batch(x, generator)
    if data.dynamic_binarize:
        x = torch.bernoulli(x, generator=generator)
    return x
