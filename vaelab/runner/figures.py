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
from vaelab.figures import INTERPOLATION_STEPS, KL_IMAGES, TRAVERSAL_STEPS, FigurePlan, figure_plan
from vaelab.runlog import RunLog
from vaelab.spec import RunSpec
from vaelab.training import EpochCallback

# Figures also shown at the artifact root, as thumbnails (figures.write_thumbnail), so MLflow's compare
# view, which lines up only top-level files, shows them side by side across runs.
COMPARED_FIGURES = ("samples.png", "reconstructions.png", "traversals.png", "learning_curves.png")
FIGURE_STEPS = 8  # for the progress bar: one step per figure written
def write_figures(model, likelihood, data: ImageData, history, folder: Path, run_spec: RunSpec,
                  step: Callable[[], None] = lambda: None, plan: FigurePlan | None = None,
                  metrics: dict[str, float] | None = None) -> None:
    """Every figure of a finished run into `folder`; `step()` after each one (a progress bar). `plan`:
    how many tiles (None: `figure_plan` for the epochs in `history`); `metrics`: the run's test metrics,
    whose per-dimension KL (test/kl_dim/<d>, the latents evaluator's) the KL figure and the traversals
    take rather than encoding the test images again."""
    seed = run_spec.train.seed
    test = data.test
    plan = plan or figure_plan(run_spec, len(data.train), len(test), len(history))
    folder.mkdir(parents=True, exist_ok=True)
    n_tsne = min(run_spec.eval.tsne_points, len(test))
    with ThreadPoolExecutor(max_workers=1) as pool:
        # t-SNE is the slowest figure and pure numerics: it runs beside the plotting (matplotlib stays on
        # this thread, which it needs).
        tsne = None
        if n_tsne >= 10:
            means = latent_means(model, test.x.first(n_tsne), run_spec.eval.batch_size, test.y[:n_tsne])
            tsne = pool.submit(figures.tsne_embedding, means, seed)
        shown = plan.reconstructions
        figures.write_reconstructions(model, likelihood, test.x[:shown], folder / "reconstructions.png",
                                      test.y[:shown])
        step()
        figures.write_samples(model, likelihood, folder / "samples.png", n=plan.samples, seed=seed,
                              class_names=data.class_names)
        step()
        pairs = min(2 * plan.pairs, len(test)) // 2 * 2  # consecutive test images form the interpolation pairs
        if pairs:
            figures.write_interpolation(model, likelihood, test.x[:pairs], folder / "interpolation.png",
                                        steps=INTERPOLATION_STEPS, y=test.y[:pairs])
        step()
        figures.write_learning_curves(history, folder / "learning_curves.png")
        step()
        kl_dims = logged_kl(metrics or {}, model.z_dim)
        if kl_dims is None:
            kl_dims = mean_kl_per_dimension(model, test.x.first(KL_IMAGES), run_spec.eval.batch_size,
                                            test.y[:KL_IMAGES])
        if kl_dims is not None:
            figures.write_kl_per_dimension(kl_dims, folder / "kl_per_dimension.png")
            ranking, unit = kl_dims, "nats"
        else:  # a KL that does not split by dimension (VampPrior, two levels): rows by activity instead
            ranking = latent_means(model, test.x.first(KL_IMAGES), run_spec.eval.batch_size,
                                   test.y[:KL_IMAGES]).double().var(0).float().cpu()
            unit = "var"
        step()
        figures.write_traversals(model, likelihood, test.x[:1], ranking, folder / "traversals.png",
                                 max_dims=plan.dims, steps=TRAVERSAL_STEPS, y=test.y[:1], unit=unit)
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


def logged_kl(metrics: dict[str, float], z_dim: int):  # noqa: ANN201 - a Tensor or None
    """Each latent dimension's mean KL as the latents evaluator logged it, or None where it did not."""
    import torch

    values = [metrics.get(f"test/kl_dim/{d}") for d in range(z_dim)]
    return None if None in values else torch.tensor(values)


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
            figures.write_samples(model, model.likelihood, folder / "samples.png", seed=run_spec.train.seed,
                                  class_names=data.class_names)
            # Image logging with the epoch as its step: MLflow's run page slides through them.
            for name in ("reconstructions", "samples"):
                log.log_image(folder / f"{name}.png", key=name, step=epoch)
        model.train()

    return callback
