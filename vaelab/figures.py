"""Every PNG a run writes: reconstructions, samples, latent interpolation,
t-SNE of latent means, learning curves. Pictures are for screens: a grid is at most SCREEN_PX a
side whatever the image size (large tiles averaged down, small ones enlarged), and the model's
passes behind them are chunked by its evaluation budget (vaelab.models.footprint)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from vaelab.errors import UsageError  # noqa: E402
from vaelab.evaluation.record import PASSES_PER_TRAINING_IMAGE  # noqa: E402
from vaelab.likelihoods import Likelihood  # noqa: E402
from vaelab.models import VAE  # noqa: E402
from vaelab.models.footprint import in_chunks, rows  # noqa: E402

SCREEN_PX = 2048  # the most pixels a grid figure has a side
TRAVERSAL_TILE_PX = 128  # the traversal figure's tiles, drawn about 90 px wide
PAD = 2  # pixels between tiles
THUMBNAIL_PX = 640  # the compare view's copies at the artifact root (vaelab.runner.figures.COMPARED_FIGURES)
LABEL_PX = 160  # the left margin of a grid whose rows are labelled (a conditional model's classes)
KL_IMAGES = 2000  # test images the KL figure averages over where the latents evaluator logged no KL
INTERPOLATION_STEPS = 10
TRAVERSAL_STEPS = 9
# The figures take no more than this share of training's image passes, or they are drawn small
# (`SMALL`): a short training on large images would otherwise spend longer drawing than training.
FIGURE_SHARE = 0.25


@dataclass(frozen=True)
class FigurePlan:
    """How many tiles the figures of a finished run hold: samples, reconstructed test images,
    interpolated pairs (INTERPOLATION_STEPS each) and traversed latent dimensions (TRAVERSAL_STEPS each)."""

    samples: int = 64
    reconstructions: int = 32
    pairs: int = 4
    dims: int = 10

    def passes(self, test_images: int, tsne_points: int) -> int:
        """Encoder or decoder passes the figures make (each an image pass): the cost of drawing them. The
        KL per dimension comes from the latents evaluator (vaelab.runner.figures.logged_kl)."""
        pairs = min(self.pairs, test_images // 2)
        tsne = min(tsne_points, test_images)
        return (self.samples + 2 * min(self.reconstructions, test_images) + pairs * (2 + INTERPOLATION_STEPS)
                + 1 + self.dims * TRAVERSAL_STEPS + (tsne if tsne >= 10 else 0))


FULL = FigurePlan()
SMALL = FigurePlan(samples=16, reconstructions=8, pairs=2, dims=4)


def figure_plan(run_spec: Any, train_images: int, test_images: int, epochs: int) -> FigurePlan:
    """The full figures, or the small ones where the full would take more than FIGURE_SHARE of the
    image passes `epochs` of training took."""
    training = PASSES_PER_TRAINING_IMAGE * epochs * train_images
    return FULL if FULL.passes(test_images, run_spec.eval.tsne_points) <= FIGURE_SHARE * training else SMALL


def figure_passes(run_spec: Any, train_images: int, test_images: int, epochs: int) -> int:
    """Image passes the figures of a run will make (0 with eval.figures off): the evaluation's cost counts them."""
    if not run_spec.eval.figures:
        return 0
    return figure_plan(run_spec, train_images, test_images, epochs).passes(test_images, run_spec.eval.tsne_points)


def _grid_image(images: Tensor, nrow: int, screen: int = SCREEN_PX) -> np.ndarray:
    """A grid as an (H, W, C) array for matplotlib, large tiles averaged down to fit `screen` px."""
    tiles = _shrink(images.detach().float().cpu().clamp(0, 1), _most(len(images), nrow, screen))
    grid = make_grid(tiles, nrow=nrow, padding=PAD, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def _enlarge(images: Tensor, min_side: int = 56, most: int | None = None) -> Tensor:
    """Nearest-neighbour upscaling so 28x28 tiles are visible without zooming (to at most `most` px)."""
    factor = max(1, min_side // images.shape[-1])
    if most is not None:
        factor = max(1, min(factor, most // max(images.shape[-2:])))
    return images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2) if factor > 1 else images


def _most(n: int, nrow: int, screen: int) -> int:
    """The largest tile side of a grid of n tiles in `nrow` columns that is at most `screen` px a side."""
    columns, lines = min(nrow, n), math.ceil(n / nrow)
    return max(1, (screen - PAD) // max(columns, lines, 1) - PAD)


def _shrink(images: Tensor, most: int) -> Tensor:
    """Tiles larger than `most` px a side averaged down (area) to it; smaller ones as they are."""
    height, width = images.shape[-2:]
    if max(height, width) <= most:
        return images
    scale = most / max(height, width)
    size = (max(1, int(height * scale)), max(1, int(width * scale)))
    return torch.nn.functional.interpolate(images.float(), size=size, mode="area")


def fit_tiles(images: Tensor, nrow: int, screen: int = SCREEN_PX) -> Tensor:
    """Tiles (N, C, H, W) sized so a grid of `nrow` columns is at most `screen` px a side: small tiles
    enlarged as before (nearest neighbour, to 56 px), large ones averaged down."""
    most = _most(len(images), nrow, screen)
    return _enlarge(_shrink(images, most), most=most)


def save_grid(images: Tensor, path: Path, nrow: int) -> Path:
    """A plain grid PNG of `images` (N, C, H, W) in [0, 1], at most SCREEN_PX a side."""
    save_image(fit_tiles(images.detach().float().cpu().clamp(0, 1), nrow), path, nrow=nrow, padding=PAD,
               pad_value=1.0)
    return path


def _decode_mean(model: VAE, likelihood: Likelihood, z: Tensor, y: Tensor | None = None) -> Tensor:
    """Decoder means of codes z, as many at a time as the model's evaluation budget holds."""
    return in_chunks(lambda a, b: likelihood.mean(model.decode(z[a:b], None if y is None else y[a:b])).float()
                     .cpu(), len(z), rows(model, "decode", len(z)))


def _encode_mean(model: VAE, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Posterior means of images x, as many at a time as the model's evaluation budget holds."""
    return in_chunks(lambda a, b: model.encode(x[a:b], None if y is None else y[a:b])[0], len(x),
                     rows(model, "encode", len(x)))


def write_thumbnail(source: Path, path: Path, side: int = THUMBNAIL_PX) -> Path:
    """`source` PNG at most `side` px a side (a smaller one as it is), for views that show many at once."""
    from PIL import Image

    with Image.open(source) as image:
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        image.save(path, optimize=True)
    return path


def _save(fig, path: Path, tight_box: bool = False) -> Path:
    # A tight bounding box renders the figure twice; only a legend outside the axes needs it.
    if not tight_box:
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight" if tight_box else None)
    plt.close(fig)
    return path


@torch.inference_mode()
def sample_images(model: VAE, likelihood: Likelihood, n: int, generator: torch.Generator,
                  y: Tensor | None = None) -> Tensor:
    """Decoder means of n draws from the model's prior (of class y[i] each, for a conditional model)."""
    model.eval()
    device = next(model.parameters()).device
    z = model.sample_codes(n, generator, device)
    return _decode_mean(model, likelihood, z, None if y is None else y.to(device))


def write_samples(model: VAE, likelihood: Likelihood, path: Path, n: int = 64, seed: int = 0,
                  label: int | None = None, class_names: tuple[str, ...] = ()) -> Path:
    """n samples from the prior as a grid. A conditional model's: one row per class, labelled with
    its name (or index), n // classes samples each (at least one); with `label`, all n of that class."""
    classes = model.num_classes
    if label is not None and not 0 <= label < max(classes, 0):
        raise UsageError(f"label {label}: the model is not conditional" if not classes
                         else f"label {label}: the model has {classes} classes (0-{classes - 1})")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if not classes or label is not None:
        y = None if label is None else torch.full((n,), label, dtype=torch.long)
        return save_grid(sample_images(model, likelihood, n, generator, y), path, int(math.ceil(math.sqrt(n))))
    per_class = max(1, n // classes)
    y = torch.arange(classes).repeat_interleave(per_class)
    images = sample_images(model, likelihood, len(y), generator, y)
    names = [class_names[c] if c < len(class_names) else str(c) for c in range(classes)]
    return _labelled_rows(images, per_class, names, path)


def shown_name(name: str, limit: int = 24) -> str:
    """A class name (a user's folder or column text), cut to `limit` characters, control characters (no glyph)
    shown as `?`. Where it is drawn, mathtext is off (`literal`): `$` would start a formula."""
    return "".join(ch if ch.isprintable() else "?" for ch in name[:limit])


def literal(texts: Iterable[Any]) -> None:
    """Matplotlib texts drawn as written: `$...$` in a user's name is not parsed as mathtext."""
    for text in texts:
        text.set_parse_math(False)


def _labelled_rows(images: Tensor, nrow: int, names: list[str], path: Path) -> Path:
    """A grid of `nrow` columns whose rows are labelled by `names`, at most SCREEN_PX a side."""
    tiles = fit_tiles(images.detach().float().cpu().clamp(0, 1), nrow, SCREEN_PX - LABEL_PX)
    grid = make_grid(tiles, nrow=nrow, padding=PAD, pad_value=1.0).permute(1, 2, 0).numpy()
    height, width = grid.shape[:2]
    fig = plt.figure(figsize=((width + LABEL_PX) / 100, (height + 4) / 100), dpi=100)
    ax = fig.add_axes((LABEL_PX / (width + LABEL_PX), 0, width / (width + LABEL_PX), height / (height + 4)))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    line = (height - PAD) / len(names)
    ax.set_yticks([PAD + line * (i + 0.5) for i in range(len(names))], [shown_name(name) for name in names],
                  fontsize=min(10, max(5, line / 3)))
    literal(ax.get_yticklabels())
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.inference_mode()
def write_reconstructions(model: VAE, likelihood: Likelihood, x: Tensor, path: Path, y: Tensor | None = None) -> Path:
    """Originals and their reconstructions (decoder mean at the posterior mean)."""
    model.eval()
    recon = _decode_mean(model, likelihood, _encode_mean(model, x, y), y)
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
    mu = _encode_mean(model, pairs, y)
    start, end = mu[0::2], mu[1::2]
    labels = None if y is None else y[0::2].repeat_interleave(steps)  # decode with the start image's label
    weights = torch.linspace(0, 1, steps, device=mu.device).view(1, steps, 1)
    z = start.unsqueeze(1) * (1 - weights) + end.unsqueeze(1) * weights  # (rows, steps, z)
    decoded = _decode_mean(model, likelihood, z.flatten(0, 1), labels).view(len(start), steps, *pairs.shape[1:])
    lines = torch.cat([pairs[0::2].float().cpu().unsqueeze(1), decoded, pairs[1::2].float().cpu().unsqueeze(1)],
                      dim=1)
    return save_grid(lines.flatten(0, 1), path, steps + 2)


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
        name = shown_name(class_names[label], 40) if 0 <= label < len(class_names) else str(label)
        chosen = classes == label
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=cmap(label % cmap.N), label=name)
    literal(ax.legend(title="class", loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8,
                      markerscale=2).get_texts())
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
                     max_dims: int = 10, steps: int = 9, span: float = 3.0, y: Tensor | None = None,
                     unit: str = "nats") -> Path:
    """Decode the posterior mean of one image while moving one latent dimension
    from -span to +span (rows: dimensions with the most KL first, each labelled with its index and KL;
    unit "var": `kl` is the variance of the posterior means instead, for a KL that does not split by
    dimension)."""
    model.eval()
    label = None if y is None else y[:1]
    mu = model.encode(x[:1], label)[0]
    dims = torch.argsort(kl, descending=True)[:max_dims]
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu.repeat(len(dims) * steps, 1).view(len(dims), steps, -1).clone()
    for row, dim in enumerate(dims.tolist()):
        z[row, :, dim] = values
    flat = z.flatten(0, 1)
    images = _decode_mean(model, likelihood, flat, None if label is None else label.repeat(len(flat)))
    # Each tile is drawn about 90 px wide: larger images are averaged down first, so drawing stays quick.
    images = _shrink(images.clamp(0, 1), TRAVERSAL_TILE_PX)
    grid = images.view(len(dims), steps, *images.shape[1:])
    fig, axes = plt.subplots(len(dims), steps, figsize=(0.9 * steps + 1.6, 0.95 * len(dims) + 0.5), squeeze=False)
    for row, dim in enumerate(dims.tolist()):
        for col in range(steps):
            picture = grid[row, col].permute(1, 2, 0).numpy()
            axes[row][col].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray",
                                  vmin=0, vmax=1)
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
        axes[row][0].set_ylabel(f"z{dim}\n{float(kl[dim]):.1f} {unit}", rotation=0, ha="right", va="center", fontsize=8)
    for col, value in enumerate(values.tolist()):
        axes[-1][col].set_xlabel(f"{value:+.1f}", fontsize=8)
    measure = "its mean KL" if unit == "nats" else "the variance of its posterior means"
    fig.suptitle(f"each row: one latent dimension ({measure}) moved from -{span:g} to +{span:g}, the others at "
                 "the image's mean",
                 fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.99, top=0.93, bottom=0.06, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
