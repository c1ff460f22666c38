"""The registry's records: names known without torch, builders that resolve, and the
dataset facts (shape, size, classes) each record carries."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO
from vaelab import likelihoods, objectives, registry
from vaelab.spec import DataSpec, LossSpec, field_check, parse_spec


def test_names_come_without_torch():
    code = ("import sys; from vaelab import registry, spec; "
            "print(registry.names('dataset'), registry.names('arch'), registry.names('likelihood')); "
            "spec.parse_spec({'name': 'x'}); "
            "print(sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "['dsprites', 'fashion_mnist', 'huggingface', 'image_folder', 'mnist'] ['conv', 'mlp', 'resnet'] "
        "['bernoulli', 'continuous_bernoulli', 'gaussian', 'gaussian_learned', 'laplace']",
        "[]",
    ]


@pytest.mark.parametrize("kind", sorted(registry.REGISTRIES))
def test_every_record_resolves_to_a_callable(kind: str):
    for record in registry.REGISTRIES[kind].values():
        if kind == "dataset":
            assert record.source().name == record.name, f"{record.name}: {record.target}"
        else:
            assert callable(registry.resolve(record.target)), f"{kind} {record.name}: {record.target}"


def test_every_likelihood_record_builds_a_likelihood():
    shape = (1, 28, 28)
    for name, record in registry.LIKELIHOODS.items():
        loss = dataclasses.replace(LossSpec(), likelihood=name)
        assert isinstance(record.build(loss, shape), likelihoods.Likelihood)
    assert isinstance(registry.LIKELIHOODS["gaussian_learned"].build(LossSpec(), shape), likelihoods.Gaussian)


def test_the_registry_is_a_leaf():
    """registry.py imports nothing of vaelab (records name their targets as strings), so nothing that
    imports it can close a circle through it."""
    tree = ast.parse((REPO / "vaelab" / "registry.py").read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for node in ast.walk(block)}
    imported = [alias.name if isinstance(node, ast.Import) else node.module or "" for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only
                for alias in node.names]
    assert imported and not [name for name in imported if name.startswith("vaelab")], imported


def test_spec_checks_use_the_registry_and_objectives_lists():
    assert field_check("data.dataset").names() == registry.names("dataset")
    assert field_check("model.arch").names() == registry.names("arch")
    assert field_check("loss.likelihood").names() == registry.names("likelihood")
    assert tuple(field_check("loss.kl_schedule").names) == objectives.SCHEDULES
    run = parse_spec({"name": "x"}).base
    for schedule in objectives.SCHEDULES:  # every listed schedule is one KLWeighting implements
        weighting = objectives.kl_weighting(dataclasses.replace(run, loss=dataclasses.replace(run.loss,
                                                                                             kl_schedule=schedule)))
        assert weighting.schedule == schedule and weighting.weight(1.0) >= 0


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_mnist_family_facts(dataset: str):
    spec = DataSpec(dataset=dataset)
    assert registry.image_shape(spec) == (1, 28, 28)
    assert registry.num_classes(spec) == 10
    assert registry.train_size(spec) == 54_000  # 60,000 less the 10% validation split
    assert registry.train_size(dataclasses.replace(spec, subset=1000)) == 900


def test_image_folder_facts_come_from_the_folder(tmp_path: Path):
    for cls, n in (("cats", 6), ("dogs", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / ".hidden").mkdir()
    spec = DataSpec(dataset="image_folder", root=str(tmp_path), image_size=32, channels=1, val_fraction=0.2)
    assert registry.image_shape(spec) == (1, 32, 32)
    assert registry.num_classes(spec) == 2
    # 10 images, no test folder: 1 held out for test, then 2 of the other 9 for validation
    assert registry.train_size(spec) == 7
    assert registry.num_classes(dataclasses.replace(spec, root=str(tmp_path / "missing"))) == 1
