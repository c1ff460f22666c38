"""Pictures of how a model's latents line up with ground-truth factors: the factor x latent mutual
information (normalised by each factor's entropy, as MIG normalises it; Chen et al. 2018), and latent
traversals with each row labelled by the factor its latent explains best."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vaelab.disentanglement.metrics import (  # noqa: E402
    NUM_BINS,
    FactorData,
    discrete_entropy,
    histogram_discretise,
    mutual_information_matrix,
    sample_codes,
)

# Codes the figures are drawn from: MIG's training sample at disentanglement_lib's size.
FIGURE_SAMPLES = 10_000
TRAVERSAL_STEPS = 9
# A traversal sweeps its latent between these quantiles of the latent's means over the sample.
TRAVERSAL_QUANTILES = (0.02, 0.98)


@dataclass
class FactorLatentMI:
    """I(z_d; v_f) / H(v_f) for every latent d and factor f, from `samples` draws of the factors."""

    normalised: np.ndarray  # (D, F)
    codes: np.ndarray  # (n, D) latent means of the draws
    factor_names: tuple[str, ...]
    samples: int

    def best_latent(self) -> list[int]:
        """For each factor, the latent that carries most information about it."""
        return [int(d) for d in self.normalised.argmax(0)]


def factor_latent_mi(data: FactorData, encode, n: int, seed: int) -> FactorLatentMI:
    codes, factors = sample_codes(data, encode, n, np.random.default_rng(seed))
    mi = mutual_information_matrix(histogram_discretise(codes, NUM_BINS), factors)
    entropy = discrete_entropy(factors)
    normalised = np.divide(mi, entropy, out=np.zeros_like(mi), where=entropy > 0)
    return FactorLatentMI(normalised, codes, tuple(data.factor_names), n)


def write_mi_heatmap(mi: FactorLatentMI, path: Path) -> Path:
    """Factors as rows, latents as columns, each cell's share of the factor's entropy written in it."""
    values = mi.normalised.T  # (F, D)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 0.6 * values.shape[1]), 1.4 + 0.5 * values.shape[0]))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(0.05, float(values.max())), aspect="auto")
    for (f, d), value in np.ndenumerate(values):
        ax.text(d, f, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="black" if value > 0.6 * values.max() else "white")
    ax.set_xticks(range(values.shape[1]), [f"z{d}" for d in range(values.shape[1])])
    ax.set_yticks(range(values.shape[0]), mi.factor_names)
    ax.set_xlabel("latent dimension")
    ax.set_title(f"I(z; factor) / H(factor)\n{mi.samples} draws, {NUM_BINS} bins per latent", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.inference_mode()
def write_factor_traversals(model, likelihood, mi: FactorLatentMI, path: Path) -> Path:
    """One row per factor: the code of one drawn image with the factor's best latent swept over its
    observed range, decoded. The row says which factor, which latent and how much it explains."""
    model.eval()
    device = next(model.parameters()).device
    start = torch.as_tensor(mi.codes[0], dtype=torch.float32, device=device)
    rows = []
    for d in mi.best_latent():
        low, high = np.quantile(mi.codes[:, d], TRAVERSAL_QUANTILES)
        z = start.repeat(TRAVERSAL_STEPS, 1)
        z[:, d] = torch.linspace(float(low), float(high), TRAVERSAL_STEPS, device=device)
        rows.append(likelihood.mean(model.decode(z)).float().clamp(0, 1).cpu())
    n_rows = len(rows)
    fig, axes = plt.subplots(n_rows, TRAVERSAL_STEPS, figsize=(1.0 * TRAVERSAL_STEPS + 2.2, 1.05 * n_rows),
                             squeeze=False)
    for r, (images, d) in enumerate(zip(rows, mi.best_latent(), strict=True)):
        for c in range(TRAVERSAL_STEPS):
            ax = axes[r][c]
            picture = images[c].permute(1, 2, 0).numpy()
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        f = r
        axes[r][0].set_ylabel(f"{mi.factor_names[f]}\nz{d} ({mi.normalised[d, f]:.2f})", rotation=0, ha="right",
                              va="center", fontsize=8)
    fig.suptitle("each row: a factor's most informative latent, swept from its 2nd to 98th percentile "
                 "(in brackets: I(z; factor) / H(factor))", fontsize=8)
    fig.subplots_adjust(left=0.17, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_factor_figures(model, likelihood, data: FactorData, folder: Path, seed: int,
                         samples: int = FIGURE_SAMPLES, batch_size: int = 1000) -> list[Path]:
    """factor_mi.png and factor_traversals.png of a model on factor data."""
    device = next(model.parameters()).device

    def encode(observations) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(observations, dtype=torch.float32, device=device)
            return torch.cat([model.encode(part)[0] for part in x.split(batch_size)]).double().cpu().numpy()

    model.eval()
    mi = factor_latent_mi(data, encode, samples, seed)
    return [write_mi_heatmap(mi, folder / "factor_mi.png"),
            write_factor_traversals(model, likelihood, mi, folder / "factor_traversals.png")]
