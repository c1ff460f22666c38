"""The importance-weighted bound as a training objective (Burda, Grosse & Salakhutdinov 2016,
"Importance Weighted Autoencoders", ICLR): loss.objective iwae, with k = loss.iw_k codes per image.

With z_1..z_k ~ q(z|x) and log weights log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), the k-sample
bound (their eq. 8) is

    L_k(x) = E[ log (1/k) sum_i w_i ],    ELBO = L_1 <= L_k <= L_{k+1} <= log p(x)  (their Theorem 1)

and its gradient weighs each code's gradient of log w_i by its normalised weight w_i / sum_j w_j
(their sec. 3), which is what autograd through logsumexp gives. vaelab minimises, per image, in nats

    -L_k  ~  (1/k) sum_i recon_i + KL - G,    G = log (1/k) sum_i w_i - (1/k) sum_i log w_i  >= 0

the k codes' mean negative ELBO (recon_i = -log p(x|z_i); KL the model's own term: closed form for a
N(0, I) prior, the Monte Carlo mean of log q/p for the VampPrior or two levels) less G, the bound's gain
over that ELBO on the same draws (Jensen's gap: >= 0 on every draw). Where the KL is the Monte Carlo mean
this is the paper's estimator term for term. Where it is in closed form the two differ by
KL - (1/k) sum_i log q(z_i|x)/p(z_i), zero in expectation, its gradient too: value and gradient stay
unbiased for L_k and -grad L_k, and at k = 1 (G = 0 exactly) the objective is vaelab's ELBO objective bit
for bit, as the paper's VAE is its IWAE at k = 1.

What a run logs: train/recon and train/kl are the k codes' means, train/elbo their sum, train/penalty is
-G (as it entered train/loss), so train/loss = train/elbo + train/penalty estimates -L_k. The bound has
no KL weight: kl_beta is 1, loss.beta is not read (an unused key), and a KL schedule or free bits are
refused. val/loss is the negative k-sample bound on the validation images (k = loss.iw_k, fresh codes
from the validation generator; val/recon, val/kl, val/elbo the codes' means), so early stopping and
train.keep_best watch what the run optimises, whose ELBO may stall while the bound still improves (the
paper trained a fixed schedule: train.patience null). test/elbo and test/nll_iw (eval.iw_samples) are the
evaluators', the same for every objective, so they compare across objectives.

The bound depends on loss.iw_k only, which stack members share (stacked.STACKABLE_KEYS), so iwae runs
stack; the stacked step computes the gain under vmap, each member on its own codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaelab.checks import Int
from vaelab.objectives.record import Objective, SampleBound, SpecKey

if TYPE_CHECKING:  # annotations only: spec checks read this record without torch
    from torch import Tensor

SAMPLES = SpecKey("iw_k", "iwae: codes per image in training, k of the k-sample importance-weighted bound "
                          "(Burda et al. 2016; 1 = the ELBO)", 5, Int(1, 5000), hint="int")


def gain(log_w: Tensor) -> Tensor:
    """log (1/k) sum_i w_i - (1/k) sum_i log w_i of each image, (N,), from log weights (k, N): how far the
    k-sample bound is above the samples' mean ELBO (>= 0 by Jensen; exactly 0 at k = 1)."""
    from vaelab.models.vae import iw_bound  # only when an iwae run trains: spec checks read this without torch

    return iw_bound(log_w) - log_w.mean(0)


def _conflicts(run: Any) -> str | None:
    loss = run.loss
    if loss.kl_schedule != "constant":
        return (f"loss.kl_schedule: iwae trains on the k-sample bound, which has no KL weight to schedule; "
                f"use constant (got {loss.kl_schedule})")
    if loss.free_bits > 0:
        return (f"loss.free_bits: iwae trains on the k-sample bound, which has no per-dimension KL to hold up; "
                f"leave it 0 (got {loss.free_bits:g})")
    return None


def _one(loss: Any) -> float:
    return 1.0


OBJECTIVE = Objective(
    name="iwae",
    label="IWAE",
    summary="-log (1/k) sum_i p(x, z_i) / q(z_i|x), k = loss.iw_k codes per image (Burda et al. 2016; k 1: the ELBO)",
    strength=SAMPLES.dotted,
    keys=(SAMPLES,),
    kl_beta=_one,
    conflicts=_conflicts,
    bound=SampleBound(SAMPLES, gain),
    ignores=("loss.beta",),
)
