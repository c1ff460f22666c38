"""The importance-weighted bound as a training objective (vaelab.objectives.iwae, Burda et al. 2016): at k = 1
it is the ELBO objective bit for bit; its value is the k-sample bound of the log weights; on a model whose
log p(x) is computed by quadrature the bound rises with k and stays below it; a stacked iwae run follows its
single twins; a run replays and resumes; `vaelab train --no-track` runs one; its spec keys and refusals; the
pre-flight counts k codes per image."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_run
from vaelab import cli
from vaelab.checks import SpecError
from vaelab.data import load_data
from vaelab.models.vae import iw_bound, log_weights
from vaelab.objectives import OBJECTIVES, kl_weighting, objective_of, training_loss
from vaelab.preflight import check
from vaelab.spec import RunSpec, parse_spec, unused_keys, with_values
from vaelab.training import fit, fit_stack, init_model, stack_blocker
from vaelab.training.step import batch_terms

CPU = torch.device("cpu")


def small(z_dim: int = 4, hidden: tuple[int, ...] = (32,), **values) -> RunSpec:
    base = RunSpec()
    run = dataclasses.replace(base, model=dataclasses.replace(base.model, z_dim=z_dim, hidden=hidden))
    return with_values(run, values)


def step(model, run: RunSpec, x: torch.Tensor, seed: int = 3):
    """One training step's (objective, per-example loss, gradients, terms) as the single stepper takes it:
    the run's noise shape from the seeded generator, batch_terms, training_loss."""
    objective = objective_of(run).for_run(run, 100, model.z_dim, CPU)
    noise = torch.randn(objective.noise_shape(len(x), model.noise_dim), generator=torch.Generator().manual_seed(seed))
    y = torch.zeros(len(x), dtype=torch.long)
    recon, kl_dims, extra, _ = batch_terms(model, model.likelihood, x, y, noise, False, objective.penalty, None,
                                           objective.gain)
    value, loss = training_loss(kl_weighting(run), recon, kl_dims, 1.0, extra)
    model.zero_grad(set_to_none=True)
    value.backward()
    return value.detach(), loss, [p.grad.clone() for p in model.parameters()], (recon, kl_dims, extra, noise)


def test_at_k_1_the_bound_is_the_elbo_objective_bit_for_bit():
    elbo_run = small()
    iwae_run = with_values(elbo_run, {"loss.objective": "iwae", "loss.iw_k": 1})
    torch.manual_seed(0)
    elbo_model = init_model(elbo_run, (1, 28, 28), CPU)
    iwae_model = init_model(iwae_run, (1, 28, 28), CPU)
    iwae_model.load_state_dict(elbo_model.state_dict())
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)).bernoulli()
    value, loss, grads, _ = step(elbo_model, elbo_run, x)
    iw_value, iw_loss, iw_grads, (_, _, gain_term, noise) = step(iwae_model, iwae_run, x)
    assert noise.shape == (1, 16, 4)  # k codes per image, drawn as the ELBO's (16, 4) are: the same numbers
    assert torch.equal(iw_value, value) and torch.equal(iw_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(iw_grads, grads, strict=True))
    assert float(gain_term.detach()) == 0.0  # log-mean-exp of one log weight is that log weight
    assert kl_weighting(iwae_run).beta == 1.0 and kl_weighting(with_values(iwae_run, {"loss.beta": 4.0})).beta == 1.0


@pytest.mark.parametrize("prior", [{}, {"model.prior": "vamp", "model.prior_components": 6}], ids=["gaussian", "vamp"])
def test_its_loss_is_the_negative_k_sample_bound_of_the_log_weights(prior):
    """Against vaelab.models.vae.iw_bound (the estimate test/nll_iw uses) on the same codes: equal up to the
    closed-form KL standing in for the codes' mean log q(z|x) / p(z), a difference of mean 0; with the
    VampPrior, whose KL is that Monte Carlo mean, equal (the paper's estimator term for term)."""
    run = small(**{"loss.objective": "iwae", "loss.iw_k": 7, **prior})
    torch.manual_seed(0)
    model = init_model(run, (1, 28, 28), CPU)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)).bernoulli()
    value, _, _, (recon, kl_dims, gain_term, noise) = step(model, run, x)
    assert noise.shape == (7, 32, 4)
    with torch.no_grad():
        out = model(x, noise=noise)
        bound = iw_bound(log_weights(model.likelihood, x, out.params, out.log_ratio))
        mc_kl = out.log_ratio.mean(0)
    assert float(value) == pytest.approx(float((-bound + kl_dims.detach().sum(1) - mc_kl).mean()), rel=1e-5)
    if prior:
        assert float(value) == pytest.approx(float(-bound.mean()), rel=1e-5)
    assert float(gain_term.detach()) < 0  # train/penalty: minus the bound's gain over the codes' mean ELBO (Jensen)
    assert float(value) < float((recon + kl_dims.sum(1)).detach().mean())


def test_its_gradient_is_the_k_sample_bounds_through_the_normalised_weights():
    """With the VampPrior the objective is the paper's estimator term for term, so a training step's gradient is
    autograd's gradient of -L_k on the same codes (Burda et al. 2016, eq. 14: each code's ELBO gradient weighted by
    its normalised importance weight), not the codes' mean-ELBO gradient: a bound's gain detached from the graph,
    or an average of the k ELBOs, fails here."""
    run = small(**{"loss.objective": "iwae", "loss.iw_k": 5, "model.prior": "vamp", "model.prior_components": 6})
    torch.manual_seed(0)
    model = init_model(run, (1, 28, 28), CPU)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)).bernoulli()
    _, _, grads, (_, _, _, noise) = step(model, run, x)

    def gradient(loss_of_log_w) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(x, noise=noise)
        loss_of_log_w(log_weights(model.likelihood, x, out.params, out.log_ratio)).backward()
        return [p.grad.clone() for p in model.parameters()]

    bound = gradient(lambda log_w: -iw_bound(log_w).mean())
    mean_elbo = gradient(lambda log_w: -log_w.mean())
    for got, want in zip(grads, bound, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    apart = max(float((a - b).abs().max()) for a, b in zip(bound, mean_elbo, strict=True))
    assert apart > 1e-3  # the two gradients differ at k = 5, so the check above tells them apart


def exact_log_px(model, x: torch.Tensor) -> float:
    """log p(x) = log integral p(x|z) N(z; 0, 1) dz of a model with a 1-D code, by a Riemann sum on [-10, 10]."""
    z = torch.linspace(-10, 10, 20001).unsqueeze(1)
    with torch.no_grad():
        log_lik = model.likelihood.log_prob(x.expand(len(z), *x.shape[1:]), model.decode(z))
    log_prior = -0.5 * z[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
    return float(torch.logsumexp(log_lik + log_prior, 0)) + math.log(20 / 20000)


def test_the_bound_rises_with_k_and_stays_below_the_exact_log_likelihood():
    """Burda et al.'s Theorem 1 (ELBO = L_1 <= L_5 <= L_50 <= log p(x)) on a 4-pixel model with a 1-D code, each
    L_k the mean of the training loss over 20,000 draws (standard errors 0.001-0.02 nats)."""
    run = small(z_dim=1, hidden=(16,))
    torch.manual_seed(0)
    model = init_model(run, (1, 2, 2), CPU)
    with torch.no_grad():  # a sharp decoder and a poor encoder: the bounds stand well apart
        model.decoder.head.weight.mul_(6)
        model.encoder.head.weight.mul_(3)
    draws = 20_000
    for image in ([1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0]):
        x = torch.tensor(image, dtype=torch.float32).view(1, 1, 2, 2).expand(draws, 1, 2, 2)
        log_px = exact_log_px(model, x[:1])
        bounds, errors = [], []
        for k in (1, 5, 50):
            k_run = with_values(run, {"loss.objective": "iwae", "loss.iw_k": k})
            objective = objective_of(k_run).for_run(k_run, 1, 1, CPU)
            noise = torch.randn(objective.noise_shape(draws, 1), generator=torch.Generator().manual_seed(k))
            with torch.no_grad():
                recon, kl_dims, gain_term, _ = batch_terms(model, model.likelihood, x, torch.zeros(draws).long(),
                                                           noise, gain=objective.gain)
                value, _ = training_loss(kl_weighting(k_run), recon, kl_dims, math.inf, gain_term)
                # each draw's bound, for its standard error: the codes' mean ELBO plus the gain
                out = model(x, noise=noise)
                log_w = log_weights(model.likelihood, x, out.params, out.log_ratio)
                each = objective.gain(log_w) - recon - kl_dims.sum(1)
            assert float(-value) == pytest.approx(float(each.mean()), abs=1e-4)
            bounds.append(-float(value))
            errors.append(float(each.std()) / math.sqrt(draws))
        (l1, l5, l50), (e1, e5, e50) = bounds, errors
        assert l1 + 4 * (e1 + e5) < l5, (image, bounds, errors)
        assert l5 + 4 * (e5 + e50) < l50, (image, bounds, errors)
        assert l50 < log_px + 4 * e50, (image, bounds, log_px)


def iwae_run(root: Path, **values) -> RunSpec:
    run = tiny_run(root, train={"epochs": 2, "batch_size": 64, "device": "cpu", "patience": None},
                   loss={"objective": "iwae", "iw_k": 3})
    return with_values(run, values)


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if not k.startswith("time/")} for epoch in history]


def test_a_stacked_iwae_run_follows_its_single_twins(mnist_root: Path):
    runs = [iwae_run(mnist_root, **{"train.seed": 1}), iwae_run(mnist_root, **{"train.seed": 2, "train.lr": 3e-3})]
    assert all(stack_blocker(r) is None for r in runs)
    data = load_data(runs[0].data, CPU)
    singles = []
    for run in runs:
        model = init_model(run, data.shape, CPU)
        singles.append((model, fit(run, model, data, show_progress=False)))
    models = [init_model(r, data.shape, CPU) for r in runs]
    results = fit_stack(runs, models, data, show_progress=False)
    for model, member, (single_model, single) in zip(models, results, singles, strict=True):
        assert member.error is None
        for mine, theirs in zip(member.result.history, single.history, strict=True):
            assert theirs["train/penalty"] < 0  # minus the bound's gain over the ELBO
            assert theirs["train/loss"] == pytest.approx(theirs["train/elbo"] + theirs["train/penalty"], rel=1e-5)
            for key in ("train/loss", "train/penalty", "train/recon", "train/kl", "val/loss", "val/elbo"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-3), key
        # as tests/test_stacked.py: a few Adam steps of rounding; another seed's weights differ by ~0.05
        for (name, a), b in zip(model.state_dict().items(), single_model.state_dict().values(), strict=True):
            assert (a - b).abs().max() < 1e-2, name


def test_an_iwae_run_replays_and_resumes_exactly(mnist_root: Path):
    run = iwae_run(mnist_root, **{"train.checkpoint_every": 1})
    data = load_data(run.data, CPU)
    states = []
    whole = fit(run, init_model(run, data.shape, CPU), data, show_progress=False, save_state=states.append)
    again = fit(run, init_model(run, data.shape, CPU), data, show_progress=False)
    assert untimed(again.history) == untimed(whole.history)  # k codes per image from the seeded generator
    resumed = fit(run, init_model(run, data.shape, CPU), data, show_progress=False, resume=states[0])
    assert untimed(resumed.history)[1] == untimed(whole.history)[1]
    # k = 3 codes per image give another run than k = 1 from the same seed
    k1 = with_values(run, {"loss.iw_k": 1})
    assert fit(k1, init_model(k1, data.shape, CPU), data, show_progress=False).history[0]["train/loss"] != \
        whole.history[0]["train/loss"]


def test_vaelab_train_no_track_runs_an_iwae_spec(mnist_root: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = {"name": "iwae_demo", "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 4, "hidden": [32]},
        "loss": {"objective": "iwae", "iw_k": 4},
        "train": {"epochs": 2, "batch_size": 64, "patience": None, "device": "cpu"},
        "eval": {"tsne_points": 0, "iw_samples": 8, "probe": False, "figures": False}}}
    (tmp_path / "iwae_demo.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["train", "iwae_demo.yaml", "--dry-run"]) == 0
    assert cli.main(["train", "iwae_demo.yaml", "--no-track", "--no-progress"]) == 0
    assert "FINISHED not tracked" in capsys.readouterr().out
    [folder] = [p for p in (tmp_path / "untracked" / "iwae_demo").iterdir() if p.name != "resume"]
    checkpoint = folder / "checkpoint"
    assert yaml.safe_load((checkpoint / "spec.yaml").read_text())["base"]["loss"]["iw_k"] == 4
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert metrics["train/epochs_run"] == 2
    # evaluation is every objective's: test/elbo, and the IWAE estimate, the tighter of the two
    assert math.isfinite(metrics["test/elbo"]) and metrics["test/nll_iw"] <= metrics["test/elbo"]


def test_the_dry_run_cost_times_the_runs_own_k_sample_step(mnist_root: Path):
    from vaelab.cost import seconds_per_epoch

    assert seconds_per_epoch(iwae_run(mnist_root, **{"loss.iw_k": 8}), steps=2) > 0


def spec_with_loss(loss: str):
    return parse_spec(yaml.safe_load(f"name: s\nbase:\n  loss: {loss}\n"))


def test_its_keys_are_checked_and_what_it_cannot_train_with_is_refused_in_one_line():
    with pytest.raises(SpecError) as linear:
        spec_with_loss("{objective: iwae, kl_schedule: linear}")
    assert str(linear.value).startswith("loss.kl_schedule: ") and "\n" not in str(linear.value)
    with pytest.raises(SpecError, match=r"^loss\.free_bits: "):
        spec_with_loss("{objective: iwae, free_bits: 0.5}")
    for bad in ("0", "5001", "2.5"):
        with pytest.raises(SpecError, match=r"^base\.loss\.iw_k: expected int in \[1, 5000\]"):
            spec_with_loss(f"{{objective: iwae, iw_k: {bad}}}")
    run = spec_with_loss("{objective: iwae, iw_k: 50}").base
    assert run.loss.iw_k == 50 and OBJECTIVES["iwae"].samples_per_image(run.loss) == 50
    assert "loss.beta" in unused_keys(run) and "loss.iw_k" not in unused_keys(run)  # the bound has no KL weight
    assert "loss.iw_k" in unused_keys(RunSpec()) and "loss.beta" not in unused_keys(RunSpec())
    # a key added with the objective leaves every other run's identity alone; in its own runs it counts
    assert with_values(RunSpec(), {"loss.iw_k": 50}).hash() == RunSpec().hash()
    assert run.hash() != with_values(run, {"loss.iw_k": 5}).hash()


def test_the_preflight_counts_k_codes_per_image_and_names_loss_iw_k():
    run = small(hidden=(400,), **{"loss.objective": "iwae", "train.batch_size": 128})
    one = check([with_values(run, {"loss.iw_k": 1})], (1, 28, 28), 1000, 100, CPU)
    fifty = check([with_values(run, {"loss.iw_k": 50})], (1, 28, 28), 1000, 100, CPU)
    assert fifty.activation_mb == pytest.approx(50 * one.activation_mb, rel=1e-6)
    training = {p.name: p.bytes for p in fifty.phases}["training"]
    assert training - {p.name: p.bytes for p in one.phases}["training"] == pytest.approx(49 * one.activation_mb * 2**20)
    from vaelab.models import ConfigError

    with pytest.raises(ConfigError, match=r"in training .*: lower train\.batch_size or loss\.iw_k$"):
        check([with_values(run, {"loss.iw_k": 5000})], (1, 28, 28), 1000, 100, CPU, available=4 * 2**30)


def test_an_iwae_run_validates_on_its_bound_so_early_stopping_watches_what_it_optimises(mnist_root: Path):
    from vaelab.evaluation.estimators import split_terms

    run = iwae_run(mnist_root, **{"loss.iw_k": 8})
    data = load_data(run.data, CPU)
    model = init_model(run, data.shape, CPU)
    result = fit(run, model, data, show_progress=False)
    last = result.history[-1]
    # val/loss is the negative 8-sample bound: below the codes' mean negative ELBO, by Jensen
    assert last["val/loss"] < last["val/elbo"]
    # and it is the bound itself: split_terms with the run's k and the validation generator's draws
    generator = torch.Generator().manual_seed(0)
    bound = split_terms(model, data.val, model.likelihood, 1.0, 64, generator, bound_samples=8)
    elbo = split_terms(model, data.val, model.likelihood, 1.0, 64, torch.Generator().manual_seed(0))
    assert bound["loss"] < bound["elbo"] and bound["elbo"] == pytest.approx(elbo["elbo"], rel=0.02)
    # a beta_vae run's val/loss is still its (weighted) negative ELBO
    plain = with_values(run, {"loss.objective": "beta_vae"})
    history = fit(plain, init_model(plain, data.shape, CPU), data, show_progress=False).history
    assert history[-1]["val/loss"] == pytest.approx(history[-1]["val/elbo"])
