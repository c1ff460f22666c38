from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vaelab import runspec as spec_module
from vaelab.spec import (
    LossSpec,
    RunSpec,
    SpecError,
    apply_overrides,
    flatten,
    load_spec,
    parse_spec,
    run_to_yaml,
    to_dict,
)

REQUIRED_KEYS = {
    "data.dataset", "data.root", "data.val_fraction", "data.subset",
    "model.arch", "model.z_dim",
    "loss.likelihood", "loss.beta",
    "train.epochs", "train.batch_size", "train.lr", "train.patience", "train.seed", "train.device",
}


def spec_with(base: dict) -> dict:
    return {"name": "t", "base": base}


def test_defaults_and_dotted_keys():
    spec = parse_spec({"name": "demo"})
    flat = flatten(spec.base)
    assert REQUIRED_KEYS <= set(flat)
    assert flat["data.dataset"] == "fashion_mnist"
    assert flat["model.hidden"] == [400]


@pytest.mark.parametrize(
    ("base", "path", "allowed"),
    [
        ({"model": {"z_dim": "ten"}}, "base.model.z_dim", "int"),
        ({"model": {"z_dim": 0}}, "base.model.z_dim", "int in [1, 4096]"),
        ({"model": {"z_dim": True}}, "base.model.z_dim", "int"),
        ({"model": {"arch": "transformer"}}, "base.model.arch", "one of conv, mlp, resnet"),
        ({"loss": {"likelihood": "poisson"}}, "base.loss.likelihood", "bernoulli, gaussian"),
        ({"loss": {"beta": -1}}, "base.loss.beta", ">= 0"),
        ({"loss": {"beta": ".nan"}}, "base.loss.beta", "float"),
        ({"train": {"lr": 0}}, "base.train.lr", "> 0"),
        ({"train": {"device": "tpu"}}, "base.train.device", "auto, cpu, cuda"),
        ({"train": {"patience": -2}}, "base.train.patience", "or null"),
        ({"data": {"val_fraction": 1.5}}, "base.data.val_fraction", "<= 0.9"),
        ({"data": {"dataset": "cifar"}}, "base.data.dataset", "fashion_mnist"),
        ({"data": {"subset": 0}}, "base.data.subset", "int > 0 or null"),
        ({"model": {"hidden": []}}, "base.model.hidden", "a list"),
        ({"model": {"hidden": [400, "x"]}}, "base.model.hidden[1]", "int"),
        ({"model": {"zdim": 3}}, "base.model.zdim", "unknown key"),
        ({"optim": {}}, "base.optim", "unknown section"),
        ({"model": [1, 2]}, "base.model", "a mapping"),
    ],
)
def test_bad_values_name_their_path(base, path, allowed):
    with pytest.raises(SpecError) as err:
        parse_spec(spec_with(base))
    message = str(err.value)
    assert message.startswith(f"{path}:"), message
    assert allowed in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 65, 42, "a..b"])
def test_names_cannot_escape_directories(name):
    with pytest.raises(SpecError, match="^name:"):
        parse_spec({"name": name})


def test_unknown_top_level_key_and_missing_name():
    with pytest.raises(SpecError, match="^serach: unknown key"):
        parse_spec({"name": "x", "serach": {}})
    with pytest.raises(SpecError, match="^name: missing"):
        parse_spec({"base": {}})


def test_scientific_notation_without_dot_is_a_float():
    # PyYAML reads `1e-3` as a string; a researcher writes it that way anyway.
    spec = parse_spec(yaml.safe_load("name: x\nbase: {train: {lr: 1e-3}}"))
    assert spec.base.train.lr == pytest.approx(1e-3)


def test_python_tags_are_refused(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)


def test_missing_file_is_a_spec_error(tmp_path: Path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_are_typed_like_the_field():
    spec = parse_spec({"name": "x"})
    spec = apply_overrides(spec, ["model.z_dim=7", "train.lr=3e-4", "data.subset=null", "model.hidden=[64, 32]"])
    assert spec.base.model.z_dim == 7
    assert spec.base.train.lr == pytest.approx(3e-4)
    assert spec.base.data.subset is None
    assert spec.base.model.hidden == (64, 32)


@pytest.mark.parametrize(
    ("override", "start"),
    [("model.z_dim=ten", "--set model.z_dim:"), ("model.zdim=3", "model.zdim: not a spec path"),
     ("z_dim", "--set 'z_dim': expected KEY=VALUE")],
)
def test_bad_overrides(override, start):
    with pytest.raises(SpecError) as err:
        apply_overrides(parse_spec({"name": "x"}), [override])
    assert str(err.value).startswith(start), str(err.value)


def test_resolved_run_round_trips_through_yaml(tmp_path: Path):
    spec = apply_overrides(parse_spec({"name": "x"}), ["model.arch=conv", "loss.beta=4", "train.patience=null"])
    path = tmp_path / "spec.yaml"
    path.write_text(run_to_yaml(spec.base, "x"))
    again = load_spec(path)
    assert again.base == spec.base
    assert again.base.hash() == spec.base.hash()
    assert to_dict(again.base)["model"]["arch"] == "conv"


def test_hash_changes_with_any_value():
    base = parse_spec({"name": "x"}).base
    assert apply_overrides(parse_spec({"name": "x"}), ["train.seed=1"]).base.hash() != base.hash()


def test_hash_changes_when_a_default_changes(monkeypatch: pytest.MonkeyPatch):
    """A spec that omits loss.beta means beta=1.0 today; if a later version makes the
    default 2.0, the same file is another run and must not find today's resume state
    or sweep point."""
    today = parse_spec({"name": "x"}).base
    recorded = today.hash()  # what a resume state or sweep point saved today is keyed by
    index = [f.name for f in dataclasses.fields(LossSpec)].index("beta")
    defaults = list(LossSpec.__init__.__defaults__)
    defaults[index] = 2.0
    monkeypatch.setattr(LossSpec.__init__, "__defaults__", tuple(defaults))  # "the next version"
    later = parse_spec({"name": "x"}).base
    assert later.loss.beta == 2.0 and today.loss.beta == 1.0
    assert later.hash() != recorded


def test_hash_covers_defaults_and_the_schema_version(monkeypatch: pytest.MonkeyPatch):
    run = RunSpec()
    assert dataclasses.replace(run, loss=dataclasses.replace(run.loss, beta=2.0)).hash() != run.hash()
    before = run.hash()
    monkeypatch.setattr(spec_module, "RUN_HASH_VERSION", spec_module.RUN_HASH_VERSION + 1)
    assert run.hash() != before


def test_equal_runs_hash_equally_however_written(tmp_path: Path):
    omitted = tmp_path / "omitted.yaml"
    omitted.write_text("name: a\nbase:\n  model: {z_dim: 8}\n")
    spelled = tmp_path / "spelled.yaml"  # defaults written out, a float as an int, 1e-3 as text
    spelled.write_text("name: b\nbase:\n  model: {z_dim: 8, arch: mlp, hidden: [400]}\n"
                       "  loss: {beta: 1, likelihood: bernoulli}\n  train: {lr: 1e-3, patience: 5}\n")
    everything = tmp_path / "everything.yaml"
    everything.write_text(run_to_yaml(load_spec(omitted).base, "c"))
    hashes = {load_spec(path).base.hash() for path in (omitted, spelled, everything)}
    assert len(hashes) == 1
    assert apply_overrides(load_spec(omitted), ["loss.beta=1.0"]).base.hash() in hashes


def test_nested_sections_take_dotted_keys_and_whole_mappings():
    spec = apply_overrides(parse_spec({"name": "x"}), ["data.dataset=huggingface",  # the source that reads both
                                                       "data.splits={train: Training, test: 2019}",
                                                       "data.hf.revision=1234567", "data.memory_budget=2GiB"])
    data = spec.base.data
    assert (data.splits.train, data.splits.test, data.splits.val) == ("Training", "2019", None)
    assert data.hf.revision == "1234567" and data.memory_budget == 2 * 2**30
    assert flatten(spec.base)["data.splits.test"] == "2019"
    with pytest.raises(SpecError, match=r"data.splits.trian: unknown key; allowed: train, val, test"):
        apply_overrides(parse_spec({"name": "x"}), ["data.splits={trian: a}"])
    with pytest.raises(SpecError, match=r"data.memory_budget: expected 'auto' or a size"):
        parse_spec({"name": "x", "base": {"data": {"memory_budget": "lots"}}})
    # Where images are held is not what the run is: the same identity either way.
    streamed = apply_overrides(spec, ["data.storage=stream", "data.memory_budget=1MB"])
    assert streamed.base.hash() == spec.base.hash()


def test_keys_a_run_does_not_use_are_named_and_the_rest_are_not():
    from vaelab.spec import RunSpec, flatten, unused_keys, with_values

    mnist = with_values(RunSpec(), {"data.dataset": "mnist", "loss.likelihood": "bernoulli"})
    unused = unused_keys(mnist)
    assert {"data.image_size", "data.resize", "data.hf.name", "data.splits.train", "loss.sigma", "loss.sigma_mode",
            "loss.factor_gamma", "loss.discriminator.lr", "loss.dip_lambda_od", "model.channels",
            "loss.capacity_max", "eval.dis_samples"} <= unused
    assert not {"loss.beta", "model.hidden", "train.seed", "data.dataset", "loss.objective"} & unused
    folder = with_values(RunSpec(), {"data.dataset": "image_folder", "model.arch": "conv",
                                     "loss.likelihood": "gaussian", "loss.objective": "factorvae",
                                     "loss.kl_schedule": "capacity"})
    used = set(flatten(folder)) - unused_keys(folder)
    assert {"data.image_size", "data.splits.train", "loss.sigma", "loss.factor_gamma", "loss.discriminator.lr",
            "model.channels", "loss.capacity_max", "loss.gamma"} <= used
    assert "model.hidden" in unused_keys(folder) and "data.hf.name" in unused_keys(folder)
