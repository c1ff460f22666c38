"""Every PNG a run writes: reconstructions, samples, latent interpolation,
t-SNE of latent means, learning curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from vaelab.likelihoods import Likelihood  # noqa: E402
from vaelab.models import VAE  # noqa: E402


def _grid_image(images: Tensor, nrow: int) -> np.ndarray:
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def _enlarge(images: Tensor, min_side: int = 56) -> Tensor:
    """Nearest-neighbour upscaling so 28x28 tiles are visible without zooming."""
    factor = max(1, min_side // images.shape[-1])
    return images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2) if factor > 1 else images


def _save(fig, path: Path, tight_box: bool = False) -> Path:
    # A tight bounding box renders the figure twice; only a legend outside the axes needs it.
    if not tight_box:
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight" if tight_box else None)
    plt.close(fig)
    return path


@torch.inference_mode()
def sample_images(model: VAE, likelihood: Likelihood, n: int, generator: torch.Generator) -> Tensor:
    """Decoder means of n draws from the prior N(0, I)."""
    model.eval()
    device = next(model.parameters()).device
    z = torch.randn(n, model.z_dim, generator=generator, device=device)
    return likelihood.mean(model.decode(z))


def write_samples(model: VAE, likelihood: Likelihood, path: Path, n: int = 64, seed: int = 0) -> Path:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    images = sample_images(model, likelihood, n, generator)
    save_image(_enlarge(images.cpu()), path, nrow=int(math.ceil(math.sqrt(n))), padding=2, pad_value=1.0)
    return path


@torch.inference_mode()
def write_reconstructions(model: VAE, likelihood: Likelihood, x: Tensor, path: Path, y: Tensor | None = None) -> Path:
    """Originals and their reconstructions (decoder mean at the posterior mean)."""
    model.eval()
    recon = likelihood.mean(model.decode(model.encode(x, y)[0], y))
    nrow = 8
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, images, title in zip(axes, (x, recon), ("original", "reconstruction"), strict=False):
        ax.imshow(_grid_image(images, nrow), cmap="gray" if images.shape[1] == 1 else None)
        ax.set_title(title)
        ax.axis("off")
    return _save(fig, path)


@torch.inference_mode()
def write_interpolation(model: VAE, likelihood: Likelihood, pairs: Tensor, path: Path, steps: int = 10,
                        y: Tensor | None = None) -> Path:
    """Rows of decoded linear interpolations between the latent means of image
    pairs; `pairs` is (2 * rows, C, H, W), consecutive images forming a pair.
    The first and last column show the real images."""
    model.eval()
    mu = model.encode(pairs, y)[0]
    start, end = mu[0::2], mu[1::2]
    labels = None if y is None else y[0::2].repeat_interleave(steps)  # decode with the start image's label
    weights = torch.linspace(0, 1, steps, device=mu.device).view(1, steps, 1)
    z = start.unsqueeze(1) * (1 - weights) + end.unsqueeze(1) * weights  # (rows, steps, z)
    decoded = likelihood.mean(model.decode(z.flatten(0, 1), labels)).view(len(start), steps, *pairs.shape[1:])
    rows = torch.cat([pairs[0::2].unsqueeze(1), decoded, pairs[1::2].unsqueeze(1)], dim=1)
    save_image(_enlarge(rows.flatten(0, 1).cpu()), path, nrow=steps + 2, padding=2, pad_value=1.0)
    return path


def tsne_embedding(means: Tensor, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of latent means (scikit-learn); means of 2 or fewer dimensions are returned as they are.
    Pure numerics, so it may run in a worker thread while other figures are drawn."""
    from sklearn.manifold import TSNE

    points = means.detach().double().cpu().numpy()
    if points.shape[1] <= 2:
        return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    perplexity = float(min(30, max(2, len(points) // 4)))
    # 500 iterations (250 past early exaggeration) and a coarser Barnes-Hut angle (0.8, the top of the
    # range the authors advise) settle class clusters from a PCA start at a third of the default cost,
    # which was most of a run's figure time.
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500,
                angle=0.8).fit_transform(points)


def write_tsne(means: Tensor, labels: Tensor, path: Path, class_names: tuple[str, ...] = (), seed: int = 0,
               points: np.ndarray | None = None) -> Path:
    """t-SNE of latent means coloured by class; `points` is a precomputed tsne_embedding."""
    if points is None:
        points = tsne_embedding(means, seed)
    kind = "t-SNE of test latent means" if means.shape[1] > 2 else "test latent means"
    title = f"{kind} (z_dim={means.shape[1]}, {len(points)} points)"
    fig, ax = plt.subplots(figsize=(7, 6))
    classes = labels.cpu().numpy()
    cmap = plt.get_cmap("tab10" if classes.max() < 10 else "tab20")
    for label in np.unique(classes):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        chosen = classes == label
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=cmap(label % cmap.N), label=name)
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8, markerscale=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path, tight_box=True)


def write_learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """train vs val loss, reconstruction and KL per epoch (nats per image)."""
    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, term in zip(axes, ("loss", "recon", "kl"), strict=False):
        for split, style in (("train", "-o"), ("val", "--s")):
            ax.plot(epochs, [h[f"{split}/{term}"] for h in history], style, markersize=3, label=split)
        ax.set_title(f"{term} (nats per image)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def write_kl_per_dimension(kl: Tensor, path: Path) -> Path:
    """KL of each latent dimension (nats, mean over test images), largest first:
    dimensions near zero carry no information (posterior collapse)."""
    values = kl.detach().cpu().numpy()
    order = np.argsort(-values)
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(values) + 2), 3.5))
    ax.bar(range(len(values)), values[order], color="tab:blue")
    ax.set_xticks(range(len(values)), [str(i) for i in order], fontsize=7)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"KL per dimension, total {values.sum():.1f} nats")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


@torch.inference_mode()
def write_traversals(model: VAE, likelihood: Likelihood, x: Tensor, kl: Tensor, path: Path,
                     max_dims: int = 10, steps: int = 9, span: float = 3.0, y: Tensor | None = None) -> Path:
    """Decode the posterior mean of one image while moving one latent dimension
    from -span to +span (rows: dimensions with the most KL first, each labelled with its index and KL)."""
    model.eval()
    label = None if y is None else y[:1]
    mu = model.encode(x[:1], label)[0]
    dims = torch.argsort(kl, descending=True)[:max_dims]
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu.repeat(len(dims) * steps, 1).view(len(dims), steps, -1).clone()
    for row, dim in enumerate(dims.tolist()):
        z[row, :, dim] = values
    flat = z.flatten(0, 1)
    images = likelihood.mean(model.decode(flat, None if label is None else label.repeat(len(flat))))
    grid = images.float().clamp(0, 1).cpu().view(len(dims), steps, *images.shape[1:])
    fig, axes = plt.subplots(len(dims), steps, figsize=(0.9 * steps + 1.6, 0.95 * len(dims) + 0.5), squeeze=False)
    for row, dim in enumerate(dims.tolist()):
        for col in range(steps):
            picture = grid[row, col].permute(1, 2, 0).numpy()
            axes[row][col].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray",
                                  vmin=0, vmax=1)
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
        axes[row][0].set_ylabel(f"z{dim}\n{float(kl[dim]):.1f} nats", rotation=0, ha="right", va="center", fontsize=8)
    for col, value in enumerate(values.tolist()):
        axes[-1][col].set_xlabel(f"{value:+.1f}", fontsize=8)
    fig.suptitle(f"each row: one latent dimension (its mean KL) moved from -{span:g} to +{span:g}, the others at "
                 "the image's mean",
                 fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.99, top=0.93, bottom=0.06, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
