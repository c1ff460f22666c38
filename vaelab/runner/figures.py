"""The figures a run writes: every one of a finished run (`write_figures`), and the reconstructions
and samples of every train.figure_every epochs, logged as images with the epoch as their step."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaelab import figures
from vaelab.data import ImageData
from vaelab.evaluation.estimators import latent_means, mean_kl_per_dimension
from vaelab.runlog import RunLog
from vaelab.spec import RunSpec
from vaelab.training import EpochCallback

# Figures also logged at the artifact root, so MLflow's compare view shows them side by side across runs.
COMPARED_FIGURES = ("samples.png", "reconstructions.png", "traversals.png", "learning_curves.png")
FIGURE_STEPS = 8  # for the progress bar: one step per figure written


def write_figures(model, likelihood, data: ImageData, history, folder: Path, run_spec: RunSpec,
                  step: Callable[[], None] = lambda: None) -> None:
    """Every figure of a finished run into `folder`; `step()` after each one (a progress bar)."""
    seed = run_spec.train.seed
    test = data.test
    folder.mkdir(parents=True, exist_ok=True)
    n_tsne = min(run_spec.eval.tsne_points, len(test))
    with ThreadPoolExecutor(max_workers=1) as pool:
        # t-SNE is the slowest figure and pure numerics: it runs beside the plotting (matplotlib stays on
        # this thread, which it needs).
        tsne = None
        if n_tsne >= 10:
            means = latent_means(model, test.x.first(n_tsne), run_spec.eval.batch_size, test.y[:n_tsne])
            tsne = pool.submit(figures.tsne_embedding, means, seed)
        figures.write_reconstructions(model, likelihood, test.x[:32], folder / "reconstructions.png", test.y[:32])
        step()
        figures.write_samples(model, likelihood, folder / "samples.png", n=64, seed=seed)
        step()
        pairs = min(8, len(test)) // 2 * 2  # consecutive test images form the interpolation pairs
        if pairs:
            figures.write_interpolation(model, likelihood, test.x[:pairs], folder / "interpolation.png",
                                        y=test.y[:pairs])
        step()
        figures.write_learning_curves(history, folder / "learning_curves.png")
        step()
        kl_dims = mean_kl_per_dimension(model, test.x.first(2000), run_spec.eval.batch_size, test.y[:2000])
        figures.write_kl_per_dimension(kl_dims, folder / "kl_per_dimension.png")
        step()
        figures.write_traversals(model, likelihood, test.x[:1], kl_dims, folder / "traversals.png", y=test.y[:1])
        step()
        if data.factors is not None and run_spec.eval.disentanglement and not model.num_classes:
            from vaelab.disentanglement.figures import FIGURE_SAMPLES, write_factor_figures
            from vaelab.evaluation.disentanglement import sample_share

            share = sample_share(run_spec, len(data.train))
            samples = max(1000, round(FIGURE_SAMPLES * share))  # as many as MIG draws
            write_factor_figures(model, likelihood, data.factors, folder, seed + 1, samples, run_spec.eval.batch_size)
        step()
        if tsne is not None:
            figures.write_tsne(means, test.y[:n_tsne], folder / "tsne.png", data.class_names, seed=seed,
                               points=tsne.result())
        step()


def epoch_figures(run_spec: RunSpec, model, data: ImageData, log: RunLog) -> EpochCallback:
    """Reconstructions and samples every train.figure_every epochs, named by epoch."""
    every = run_spec.train.figure_every

    def callback(epoch: int, _metrics: dict) -> None:
        if not every or epoch % every:
            return
        with tempfile.TemporaryDirectory(prefix="vaelab-") as tmp:
            folder = Path(tmp)
            figures.write_reconstructions(model, model.likelihood, data.test.x[:32],
                                          folder / "reconstructions.png", data.test.y[:32])
            figures.write_samples(model, model.likelihood, folder / "samples.png", seed=run_spec.train.seed)
            # Image logging with the epoch as its step: MLflow's run page slides through them.
            for name in ("reconstructions", "samples"):
                log.log_image(folder / f"{name}.png", key=name, step=epoch)
        model.train()

    return callback
