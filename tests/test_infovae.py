"""InfoVAE / MMD-VAE (vaelab.objectives.infovae): the unbiased MMD against closed-form answers, the
penalty replayed from the step's generator, a run through the CLI, stacking, its spec keys, and the
identities of existing specs left as they were by adding it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_run
from vaelab.checks import SpecError
from vaelab.cli import main
from vaelab.data import load_data
from vaelab.objectives import OBJECTIVES, kl_weighting
from vaelab.objectives.infovae import mmd2_unbiased
from vaelab.spec import RunSpec, load_spec, parse_spec, unused_keys, with_values
from vaelab.training import fit, fit_stack, init_model, stack_blocker

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def batch_estimates(kernel: str, shift: float, dims: int, batches: int, n: int = 128) -> torch.Tensor:
    """MMD^2_u between N(shift * e_1, I) and N(0, I), one estimate per batch of n samples each (all batches
    at once under vmap)."""
    gen = torch.Generator().manual_seed(0)
    offset = torch.zeros(dims, dtype=torch.float64)
    offset[0] = shift
    x = torch.randn(batches, n, dims, generator=gen, dtype=torch.float64) + offset
    y = torch.randn(batches, n, dims, generator=gen, dtype=torch.float64)
    return torch.func.vmap(lambda a, b: mmd2_unbiased(a, b, kernel))(x, y)


def rbf_mmd2(shift: float, dims: int) -> float:
    """MMD^2 of N(delta, I) and N(0, I) under k = exp(-|a - b|^2 / C), C = 2 d, in closed form: a difference of
    two independent samples is N(m, 2I), and E exp(-|W|^2 / C) = (1 + 4/C)^(-d/2) exp(-|m|^2 / (C + 4))."""
    c = 2.0 * dims
    return 2 * (1 + 4 / c) ** (-dims / 2) * (1 - math.exp(-shift**2 / (c + 4)))


def imq_mmd2_1d(shift: float) -> float:
    """The same for the inverse multiquadratic C / (C + w^2) in one dimension (C = 2), by quadrature."""
    w = np.linspace(-60, 60, 600_001)

    def mean_kernel(m: float) -> float:  # E k over w ~ N(m, 2)
        return float(np.trapezoid(2.0 / (2.0 + w**2) * np.exp(-((w - m) ** 2) / 4) / np.sqrt(4 * np.pi), w))

    return 2 * mean_kernel(0.0) - 2 * mean_kernel(shift)


@pytest.mark.parametrize(("kernel", "dims", "exact"), [("rbf", 4, rbf_mmd2), ("imq", 1, lambda s, d: imq_mmd2_1d(s))])
def test_mmd_is_unbiased_zero_between_equal_distributions_and_matches_the_closed_form_apart(kernel, dims, exact):
    for shift in (0.0, 1.0, 2.0):
        estimates = batch_estimates(kernel, shift, dims, batches=200)
        mean, standard_error = float(estimates.mean()), float(estimates.std()) / math.sqrt(len(estimates))
        assert abs(mean - exact(shift, dims)) < 4 * standard_error + 1e-4, (shift, mean, exact(shift, dims))
    # Unbiased: between equal distributions the mean estimate is 0 within a standard error of 5e-4, where the
    # biased (V-statistic) estimate would sit 2 (k(x, x) - E k(x, x')) / n above it: 0.008 and more here.
    assert abs(float(batch_estimates(kernel, 0.0, dims, batches=200).mean())) < 2e-3
    assert float(batch_estimates(kernel, 0.5, dims, batches=20).mean()) < float(batch_estimates(kernel, 2.0, dims,
                                                                                                 batches=20).mean())


def infovae_run(root: Path, **loss) -> RunSpec:
    return tiny_run(root, train={"epochs": 1, "patience": None}, loss={"objective": "infovae", **loss})


def test_the_penalty_draws_its_prior_samples_from_the_steps_generator(mnist_root: Path):
    run = infovae_run(mnist_root, mmd_weight=50.0)
    penalty = OBJECTIVES["infovae"].for_run(run, 240, 4, CPU).penalty
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(7)) * 2

    def value(seed: int) -> float:
        drawn = penalty.sample(torch.Generator().manual_seed(seed), 32, 4, CPU)
        return float(penalty(z, z, z, drawn))

    assert value(3) == value(3)  # the same generator state: the same prior samples, the same number
    assert value(3) != value(4)
    drawn = penalty.sample(torch.Generator().manual_seed(3), 32, 4, CPU)
    assert value(3) == pytest.approx(50.0 * float(mmd2_unbiased(z, drawn, "imq")))
    assert kl_weighting(run).beta == run.loss.beta  # the KL keeps loss.beta: beta 0 is the paper's MMD-VAE


def test_an_infovae_run_replays_and_stacks_like_its_single_runs(mnist_root: Path):
    run = infovae_run(mnist_root, mmd_kernel="rbf")
    data = load_data(run.data, CPU)
    histories = [fit(run, init_model(run, data.shape, CPU), data, show_progress=False).history for _ in range(2)]
    untimed = [[{k: v for k, v in epoch.items() if not k.startswith("time/")} for epoch in h] for h in histories]
    assert untimed[0] == untimed[1]  # the prior samples come from the seeded generator: bit for bit again
    assert stack_blocker(run) is None
    other = with_values(run, {"loss.beta": 0.0, "train.seed": 5})
    alone = fit(other, init_model(other, data.shape, CPU), data, show_progress=False).history[0]
    stacked = fit_stack([run, other], [init_model(r, data.shape, CPU) for r in (run, other)], data,
                        show_progress=False)
    for single, member in zip((histories[0][0], alone), stacked, strict=True):
        for key in ("train/loss", "train/penalty", "train/kl", "val/loss"):
            assert member.result.history[0][key] == pytest.approx(single[key], rel=1e-5), key


def test_vaelab_train_runs_infovae_and_logs_its_penalty(mnist_root: Path, tmp_path: Path):
    spec = tmp_path / "info.yaml"
    spec.write_text(f"""name: infovae_run
base:
  data: {{dataset: mnist, root: '{mnist_root}', download: false}}
  model: {{z_dim: 4, hidden: [32]}}
  loss: {{objective: infovae, mmd_weight: 100, mmd_kernel: imq}}
  train: {{epochs: 1, batch_size: 64, device: cpu}}
  eval: {{tsne_points: 0, iw_samples: 4, probe: false, figures: false}}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", str(spec), "--tracking-uri", uri, "--no-progress"]) == 0
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("infovae_run").experiment_id])
    assert found.info.status == "FINISHED"
    assert math.isfinite(found.data.metrics["train/penalty"]) and math.isfinite(found.data.metrics["test/elbo"])
    assert found.data.params["loss.mmd_weight"] == "100.0" and "loss.factor_gamma" not in found.data.params


def spec_with_loss(loss: str) -> dict:
    import yaml

    return yaml.safe_load(f"name: s\nbase:\n  loss: {loss}\n")


def test_its_keys_are_checked_and_a_misspelling_is_one_line_naming_the_key():
    with pytest.raises(SpecError) as typo:
        parse_spec(spec_with_loss("{objective: infovae, mmd_weigth: 10}"))
    message = str(typo.value)
    assert "\n" not in message and "base.loss.mmd_weigth: unknown key" in message and "mmd_weight" in message
    with pytest.raises(SpecError, match=r"^base\.loss\.mmd_weight: "):
        parse_spec(spec_with_loss("{objective: infovae, mmd_weight: -1}"))
    with pytest.raises(SpecError, match=r"^base\.loss\.mmd_kernel: .*imq.*rbf"):
        parse_spec(spec_with_loss("{objective: infovae, mmd_kernel: laplace}"))
    run = parse_spec(spec_with_loss("{objective: infovae}")).base
    assert {"loss.factor_gamma", "loss.dip_lambda_od", "loss.discriminator.layers"} <= unused_keys(run)
    assert not {"loss.mmd_weight", "loss.mmd_kernel", "loss.beta"} & unused_keys(run)
    assert {"loss.mmd_weight", "loss.mmd_kernel"} <= unused_keys(RunSpec())


# RunSpec.hash of existing specs as the code before InfoVAE (commit 5d26453) computed them: sweeps, resume
# states and runs are found by these, so adding an objective and its keys must not move them. Defaults changed
# on purpose since then (a changed default is a new run) are set back to their old values first.
OLD_DEFAULTS = {"eval.dis_samples": 1.0}
HASHES_BEFORE = {
    "default": "4296fc5ce781dfc8",
    "factorvae": "09c48b02528608d8",
    "dip_vae_i with dip_lambda_od 5": "dfb2aeaedd5bb309",
    "beta_vae with factor_gamma 40": "a322166e19dc1846",
    "experiments/beta_study.yaml": "18d0ddaab7d5e93a",
    "experiments/disentanglement_study.yaml": "5bc96804356dad09",
}


def test_adding_infovae_leaves_every_existing_specs_hash_unchanged():
    runs = {
        "default": RunSpec(),
        "factorvae": with_values(RunSpec(), {"loss.objective": "factorvae"}),
        "dip_vae_i with dip_lambda_od 5": with_values(RunSpec(), {"loss.objective": "dip_vae_i",
                                                                  "loss.dip_lambda_od": 5.0}),
        "beta_vae with factor_gamma 40": with_values(RunSpec(), {"loss.factor_gamma": 40.0}),
        "experiments/beta_study.yaml": load_spec(REPO / "experiments/beta_study.yaml").base,
        "experiments/disentanglement_study.yaml": load_spec(REPO / "experiments/disentanglement_study.yaml").base,
    }
    assert {name: with_values(run, OLD_DEFAULTS).hash() for name, run in runs.items()} == HASHES_BEFORE
    # InfoVAE's own keys count in its runs only.
    assert with_values(RunSpec(), {"loss.mmd_weight": 5.0}).hash() == RunSpec().hash()
    info = with_values(RunSpec(), {"loss.objective": "infovae"})
    assert with_values(info, {"loss.mmd_weight": 5.0}).hash() != info.hash()
    assert with_values(info, {"loss.mmd_kernel": "rbf"}).hash() != info.hash()


def test_the_new_dis_samples_default_keeps_the_identity_of_runs_that_do_not_use_it():
    """eval.dis_samples went from 1.0 to auto: a run without factors (MNIST) is the run it was, so its hash
    is HEAD's without setting anything back; a dSprites run's default evaluation did change, and so does its."""
    assert RunSpec().hash() == HASHES_BEFORE["default"]
    assert load_spec(REPO / "experiments/beta_study.yaml").base.hash() == HASHES_BEFORE["experiments/beta_study.yaml"]
    dsprites = with_values(RunSpec(), {"data.dataset": "dsprites", "eval.disentanglement": True})
    assert dsprites.hash() != with_values(dsprites, {"eval.dis_samples": 1.0}).hash()
