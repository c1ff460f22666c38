"""The numerics of evaluation, on a trained VAE: the negative ELBO and its parts over a
split (also validation's), the importance-weighted NLL, bits per dimension, latent means,
active units, each latent dimension's KL averaged over a split, the linear probe. In nats
per example unless named otherwise. The evaluators (vaelab.evaluation.<name>) call these."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from vaelab.data import Split
from vaelab.data.store import Images
from vaelab.likelihoods import Likelihood
from vaelab.models import VAE
from vaelab.models.footprint import rows
from vaelab.models.vae import iw_bound
from vaelab.models.vae import log_weights as log_weights_of
from vaelab.objectives import KLWeighting, vae_terms

# Burda et al. 2016 (IWAE), section 5.2: a unit is active when Cov_x(E_q[z_u]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01


# What split_terms reports, in order (stacked validation reports the same).
SPLIT_TERMS = ("loss", "recon", "kl", "elbo", "mse")
# Importance samples are drawn for groups of DRAW_ROWS // k images at a time (DRAW_ROWS at most per
# draw): fixed, so the draws, and the estimate, do not depend on how many rows memory allows at once.
DRAW_ROWS = 16_384


@torch.inference_mode()
def split_terms(
    model: VAE, split: Split, likelihood: Likelihood, beta: float | KLWeighting, batch_size: int,
    generator: torch.Generator, bound_samples: int | None = None,
) -> dict[str, float]:
    """Means over the split of loss, recon, kl, elbo (= recon + kl, the negative
    ELBO) and mse (per pixel, between the image and the decoder mean). Batches of `batch_size`
    images, fewer where the model's evaluation budget holds fewer (vaelab.models.footprint).
    With `bound_samples` k (a run that trains on the k-sample bound, objectives.SampleBound), k codes per
    image: loss is the negative k-sample bound (Burda et al. 2016, eq. 8), the loss that run trains on, so
    its early stopping watches what it optimises; recon and kl are the k codes' means, mse the first's."""
    was_training = model.training
    k = bound_samples or 1
    batch_size = max(1, rows(model, "forward", batch_size) // k)
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=split.x.device)
    starts = range(0, len(split), batch_size)
    for start, x in zip(starts, split.x.batches(starts, batch_size), strict=True):
        y = split.y[start : start + batch_size]
        if bound_samples is None:
            out = model(x, generator=generator, y=y)
            terms = vae_terms(x, out.params, out.kl, likelihood, beta)
            loss, recon, kl, mean = terms.loss, terms.recon, terms.kl, likelihood.mean(out.params)
        else:
            noise = torch.randn((k, len(x), model.noise_dim), generator=generator, device=x.device)
            out = model(x, y=y, noise=noise)
            log_w = log_weights_of(likelihood, x, out.params, out.log_ratio)
            loss, kl = -iw_bound(log_w), out.kl.sum(1)
            recon = -(log_w + out.log_ratio).mean(0)  # the codes' mean -log p(x|z)
            mean = likelihood.mean(out.params[: len(x)])
        mse = (mean - x).pow(2).flatten(1).mean(1)
        batch = torch.stack([loss, recon, kl, recon + kl, mse])
        totals += batch.sum(1).double()
    model.train(was_training)
    means = (totals / len(split)).tolist()  # one host sync for the whole split
    return dict(zip(SPLIT_TERMS, means, strict=True))


@torch.inference_mode()
def latent_means(model: VAE, x: Tensor | Images, batch_size: int, y: Tensor | None = None) -> Tensor:
    """Posterior means of x, `batch_size` images at a time (fewer where the budget holds fewer)."""
    batch_size = rows(model, "encode", batch_size)
    model.eval()
    return torch.cat([model.encode(x[i : i + batch_size], None if y is None else y[i : i + batch_size])[0]
                      for i in range(0, len(x), batch_size)])


def active_units(means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent dimensions whose posterior mean varies across inputs."""
    return int((means.double().var(dim=0) > threshold).sum().item())


@torch.inference_mode()
def importance_weighted_nll(
    model: VAE, x: Tensor | Images, likelihood: Likelihood, k: int, generator: torch.Generator,
    budget: int | None = None, y: Tensor | None = None, on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """-log p(x) per example, estimated with k importance samples from q(z|x)
    (Burda et al. 2016, eq. 8): log (1/k) sum_i p(x, z_i) / q(z_i | x). The bound
    tightens as k grows; k = 1 is the ELBO. The noise is drawn per group of DRAW_ROWS // k
    images, as (samples, images, z) pieces of at most DRAW_ROWS rows, whatever the memory; the
    decoder then takes at most `budget` rows at once (None: as many as the model's evaluation
    budget holds, vaelab.models.footprint), so the peak follows the budget, not the image size,
    and the numbers do not depend on it. Estimates stay on the device until the end (no host
    sync per batch). `on_batch(n)` is told of each n images done, for a progress bar."""
    model.eval()
    decode_rows = budget or rows(model, "decode", DRAW_ROWS)
    encode_rows = rows(model, "encode", DRAW_ROWS)
    group = max(1, DRAW_ROWS // min(k, DRAW_ROWS))
    # Written in place: a small tensor kept per group, between the groups' large temporaries, pinned the
    # top of glibc's heap, so freed memory was never returned (RSS grew ~1 GB a minute over 10,000 images).
    estimates: Tensor | None = None
    for start in range(0, len(x), group):
        size = min(group, len(x) - start)
        piece = max(1, DRAW_ROWS // size)  # samples per draw
        eps = torch.cat([torch.randn((min(piece, k - done), size, model.noise_dim), generator=generator,
                                     device=x.device) for done in range(0, k, piece)])  # (k, size, z)
        # Images at a time, and samples of them at a time, within the decoder's rows.
        images = max(1, min(size, decode_rows // k))
        samples = max(1, min(k, decode_rows // images))
        for first in range(0, size, images):
            last = min(first + images, size)
            xb = x[start + first : start + last]
            yb = None if y is None else y[start + first : start + last]
            encoded = [model.encode(xb[i : i + encode_rows], None if yb is None else yb[i : i + encode_rows])
                       for i in range(0, len(xb), encode_rows)]
            mu = torch.cat([m for m, _ in encoded]) if len(encoded) > 1 else encoded[0][0]
            logvar = torch.cat([v for _, v in encoded]) if len(encoded) > 1 else encoded[0][1]
            log_weights = []
            for done in range(0, k, samples):
                e = eps[done : done + samples, first:last].to(mu.dtype)
                params, _, log_ratio = model.latent_pass(mu, logvar, e, yb)
                log_weights.append(log_weights_of(likelihood, xb, params, log_ratio))
            log_w = torch.cat(log_weights)  # (k, B)
            if estimates is None:
                estimates = torch.empty(len(x), dtype=log_w.dtype, device=log_w.device)
            estimates[start + first : start + last] = -(torch.logsumexp(log_w, dim=0) - math.log(k))
            if on_batch is not None:
                on_batch(len(xb))
    return estimates if estimates is not None else torch.empty(0, device=x.device)


def bits_per_dim(nll_nats: float, pixels: int, discrete: bool) -> float:
    """Bits per dimension of an NLL in nats per image. A density on [0, 1]
    (gaussian, laplace, continuous_bernoulli) is turned into the probability of the
    8-bit value's bin by its width 1/256: + pixels * ln 256 nats, i.e. + 8 bits per
    dimension (Theis et al. 2016, section 3.1). A probability mass (bernoulli) is one already."""
    nats = nll_nats if discrete else nll_nats + pixels * math.log(256)
    return nats / (pixels * math.log(2))


def mean_kl_per_dimension(model: VAE, x: Tensor | Images, batch_size: int,
                          y: Tensor | None = None) -> Tensor | None:
    """KL(q(z_d|x) || N(0,1)) of each latent dimension d, averaged over the images x: (z_dim,), in nats;
    None for a model whose KL does not split by dimension (a VampPrior, two levels)."""
    if not model.per_dimension_kl:
        return None
    batch_size = rows(model, "encode", batch_size)
    with torch.inference_mode():
        model.eval()
        total = torch.zeros(model.z_dim, device=x.device)
        for start in range(0, len(x), batch_size):
            labels = None if y is None else y[start : start + batch_size]
            mu, logvar = model.encode(x[start : start + batch_size], labels)
            total += model.prior.kl_dims(mu, logvar).sum(0)
        return total / len(x)


def probe_accuracy(train_means: Tensor, train_labels: Tensor, test_means: Tensor, test_labels: Tensor) -> float:
    """Test accuracy of a logistic regression fitted on latent means: how linearly
    the classes can be read off the code."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_means.double().cpu().numpy())
    probe = LogisticRegression(max_iter=500)
    probe.fit(scaler.transform(train_means.double().cpu().numpy()), train_labels.cpu().numpy())
    return float(probe.score(scaler.transform(test_means.double().cpu().numpy()), test_labels.cpu().numpy()))
