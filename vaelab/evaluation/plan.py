"""The evaluation plan of a run in words, from its spec alone (no torch): what
`vaelab train --dry-run` prints. `vaelab sweep --dry-run` adds measured times (vaelab.cost)."""

from __future__ import annotations

from vaelab.spec import RunSpec

# The evaluators in the order they run; vaelab.evaluation.evaluators.EVALUATORS holds them (a test checks).
EVALUATOR_NAMES = ("elbo", "latents", "iwae", "probe", "disentanglement")


def iwae_words(run: RunSpec) -> str:
    e = run.eval
    images = f"up to {e.iw_images}" if e.iw_images else "every"
    cap = ", no more passes than training took (at least 100 images)" if e.iw_capped else ""
    return f"k={e.iw_samples} on {images} test images{cap}"


def describe(run: RunSpec) -> list[str]:
    """One line per evaluator (and the figures): what it computes, or why it is skipped."""
    e = run.eval
    lines = ["elbo     test/elbo, recon, kl, loss, mse on every test image (1 posterior sample)",
             "latents  test/active_units, test/kl_dim/<d> on every test image",
             f"iwae     test/nll_iw (+ _se, bits_per_dim): {iwae_words(run)}" if e.iw_samples
             else "iwae     skipped (eval.iw_samples is 0)",
             "probe    test/probe_acc: logistic regression on latent means (skipped when the data has no labels)"
             if e.probe else "probe    skipped (eval.probe is false)",
             f"disentanglement  test/dis/*: BetaVAE, FactorVAE, MIG, SAP, DCI, modularity at {e.dis_samples:g} of "
             "disentanglement_lib's sample sizes (only data with ground-truth factors: dsprites)"
             if e.disentanglement else "disentanglement  skipped (eval.disentanglement is false)",
             f"figures  {'the PNG figures, t-SNE of ' + str(e.tsne_points) + ' test points' if e.figures else 'off'}"]
    return lines
