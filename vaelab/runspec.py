"""One run's fields: the sections of a spec's `base` (data, model, loss, train, eval) as frozen,
checked dataclasses, their dotted names, unused keys, and the run's identity (RunSpec.hash).

This module imports nothing of a spec file's other parts: `search.py` checks its values against these
fields, and `spec.py` (the file: name, base, search, loading, `--set`) sits above both, so nothing imports
upward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from vaelab.checks import (
    AutoBool,
    Bool,
    ByteSize,
    Check,
    Choice,
    Float,
    Int,
    IntChoice,
    IntList,
    Optional,
    OrAuto,
    SpecError,
    Text,
    did_you_mean,
    fail,
    show_key,
)
from vaelab.objectives import OBJECTIVES, SCHEDULES, foreign_keys, objective_keys, unhashed_keys

__all__ = ["SpecError", "RunSpec", "parse_run", "check_run", "flatten", "with_values", "unused_keys", "field_check"]

# Part of every RunSpec.hash(): bump it when what a resolved run means changes, so states
# and sweep points keyed by an older hash are not reused. 2: every value counts, defaults too.
# 3: image folders' split folders are recognised by name (a layout may now mean other splits).
RUN_HASH_VERSION = 3

# Keys that say how the data is held, not what a run is: the same run resumes, and a study
# goes on, whether its images are resident or streamed, decoded by 2 processes or 16.
# Defaults changed after hash version 3 (key: (new default, old default)). In a run that does not use the
# key (RunSpec.hash, unused_keys) the new default hashes as the old one, so the identities of existing runs
# and studies that never used it stay; where the key is used the run does change, and so does its identity.
_DEFAULT_WAS: dict[str, tuple[Any, Any]] = {"eval.dis_samples": ("auto", 1.0)}
# Keys added after hash version 3, with the value that leaves a model as it was before them: a run that
# holds that value, or does not use the key, hashes as it did, so existing runs and studies are still found.
_ADDED_NEUTRAL: dict[str, Any] = {"model.hidden_act": "relu", "model.prior": "gaussian", "model.prior_components": 500,
                                  "model.levels": 1, "model.z2_dim": None, "model.hidden2": None}

HOW_NOT_WHAT = frozenset({"data.storage", "data.memory_budget", "data.decode_workers", "data.cache_dir",
                          "train.system_metrics", "train.system_metrics_s",
                          # which weights are kept on the side changes nothing that is trained
                          "train.keep_every", "train.keep_best"})


@dataclass(frozen=True)
class RegistryChoice(Check):
    """A name that must be registered in vaelab.registry (looked up when a spec is
    parsed; the registry names its builders as strings, so this imports no torch)."""

    kind: str

    def names(self) -> list[str]:
        from vaelab import registry  # records only: naming them imports neither torch nor the models

        return registry.names(self.kind)

    def describe(self) -> str:
        return "one of " + ", ".join(self.names())

    def parse(self, value: Any, path: str) -> str:
        return Choice(tuple(self.names())).parse(value, path)


def _f(default: Any, check: Check, doc: str) -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


def _sub(cls: type) -> Any:
    """A nested section (`data.hf.name`): a mapping in YAML, dotted paths everywhere else."""
    return field(default_factory=cls, metadata={"section": cls})


_SPLIT_NAME = Optional(Text(numbers=True))  # a folder may be named "2019"


@dataclass(frozen=True)
class SplitNames:
    """Which folder (image_folder) or split (huggingface) plays each part; null = recognised by name."""

    train: str | None = _f(None, _SPLIT_NAME, "the training split's folder or split name; null = recognised "
                                              "(train, training, 'Training Data', ...)")
    val: str | None = _f(None, _SPLIT_NAME, "the validation split's name; null = recognised (val, valid, "
                                            "validation, dev), else held out from train by val_fraction")
    test: str | None = _f(None, _SPLIT_NAME, "the test split's name; null = recognised (test, testing), "
                                             "else held out by test_fraction")


@dataclass(frozen=True)
class HFSpec:
    """A Hugging Face dataset (data.dataset: huggingface)."""

    name: str | None = _f(None, Optional(Text()), "hub dataset 'owner/name' (the local cache when offline)")
    revision: str | None = _f(None, Optional(Text(numbers=True)), "hub revision: a branch, tag or commit; null = main")
    path: str | None = _f(None, Optional(Text()), "instead of name: a save_to_disk folder, or parquet files "
                                                  "(a file, a folder or a glob)")
    image_column: str | None = _f(None, Optional(Text()), "column of images; null = the first Image column")
    label_column: str | None = _f(None, Optional(Text()), "column of class labels; null = 'label' or 'labels' "
                                                          "if present, else one class")


@dataclass(frozen=True)
class DataSpec:
    dataset: str = _f("fashion_mnist", RegistryChoice("dataset"), "which dataset")
    root: str = _f("data", Text(), "dsprites, fashion_mnist, image_folder, mnist: the folder of the images "
                                   "(image_folder) or searched first for the dataset files")
    download: bool = _f(True, Bool(), "fashion_mnist, mnist: try a torchvision download when the files are not "
                                      "found (no other source downloads)")
    val_fraction: float = _f(0.1, Float(0.0, 0.9, min_open=True),
                             "share of training images held out for validation (data without a val split)")
    split_seed: int = _f(0, Int(0), "seed of the held-out splits and of binarised evaluation images (fixed across "
                                    "train.seed)")
    subset: int | None = _f(None, Optional(Int(1)), "use only the first N training images (dsprites: a random "
                                                    "sample of N); null = all")
    image_size: int = _f(64, Int(28, 512), "huggingface, image_folder: side of the square images fed to the model")
    channels: int = _f(3, IntChoice((1, 3)), "huggingface, image_folder: 1 (grey) or 3 (RGB)")
    resize: str = _f("crop", Choice(("crop", "stretch")), "huggingface, image_folder: centre-crop to square or stretch")
    test_fraction: float = _f(0.1, Float(0.0, 0.9, min_open=True),
                              "dsprites, huggingface, image_folder: share held out for testing (data without a test "
                              "split)")
    cache_dir: str = _f("data/cache", Text(),
                        "where decoded or rendered images are cached (and any set streamed: data.storage)")
    splits: SplitNames = _sub(SplitNames)
    hf: HFSpec = _sub(HFSpec)
    storage: str = _f("auto", Choice(("auto", "resident", "stream")),
                      "images on the device (resident) or streamed from the disk cache; auto = resident when "
                      "they fit data.memory_budget")
    memory_budget: int | str = _f("auto", ByteSize(), "bytes the images may take in memory (host, or device on "
                                                      "CUDA); auto = half of what is free when the run starts")
    decode_workers: int | None = _f(None, Optional(Int(1, 256)), "huggingface, image_folder: processes decoding "
                                                                 "images into the cache; null = one per CPU core")
    augment: bool = _f(False, Bool(), "random horizontal flips and small rotations of training batches")
    binarize: str = _f("none", Choice(("none", "static", "dynamic")),
                       "grey images (fashion_mnist, mnist; huggingface, image_folder with channels 1): sample binary "
                       "pixels once (static) or anew each time an image is seen (dynamic)")


@dataclass(frozen=True)
class ModelSpec:
    arch: str = _f("mlp", RegistryChoice("arch"), "encoder/decoder architecture")
    z_dim: int = _f(20, Int(1, 4096), "latent dimensions")
    hidden: tuple[int, ...] = _f((400,), IntList(Int(1, 65536)), "mlp hidden layer sizes")
    conditional: bool = _f(False, Bool(), "condition encoder and decoder on the class label (a CVAE)")
    channels: tuple[int, ...] | None = _f(None, Optional(IntList(Int(1, 4096), max_len=6)),
                                          "conv/resnet channels per stride-2 stage; null = from the image size")
    hidden_act: str = _f("relu", RegistryChoice("hidden_act"), "mlp hidden layers: relu, tanh (the IWAE paper's), "
                                                               "or gated (a sigmoid-gated linear layer: the "
                                                               "VampPrior paper's, Dauphin et al. 2017)")
    prior: str = _f("gaussian", RegistryChoice("prior"), "p(z): gaussian = N(0, I); vamp = the VampPrior "
                                                         "(Tomczak & Welling 2018), its KL by Monte Carlo")
    prior_components: int = _f(500, Int(1, 100_000), "vamp: pseudo-inputs K of the mixture")
    levels: int = _f(1, IntChoice((1, 2)), "stochastic layers: 2 = z2 -> z1 -> x (Burda et al. 2016), mlp only; "
                                           "model.z_dim is z1's size")
    z2_dim: int | None = _f(None, Optional(Int(1, 4096)), "levels 2: the top latent's size; null = model.z_dim")
    hidden2: tuple[int, ...] | None = _f(None, Optional(IntList(Int(1, 65536))),
                                         "levels 2: hidden sizes between z1 and z2 (both ways); null = model.hidden")


def _with_objective_keys(after: str) -> Callable[[type], type]:
    """Add every objective's own loss.* keys (vaelab.objectives: OBJECTIVES' SpecKeys) to the class
    being made a dataclass, right after the field `after`, so LossSpec checks, documents and flattens
    them like its own fields while each key is declared once, beside its objective."""

    def add(cls: type) -> type:
        annotations: dict[str, Any] = {}
        for name, hint in cls.__annotations__.items():
            annotations[name] = hint
            if name == after:
                for key in objective_keys():
                    annotations[key.name] = key.hint
                    setattr(cls, key.name, key.dataclass_field())
        cls.__annotations__ = annotations
        return cls

    return add


@dataclass(frozen=True)
@_with_objective_keys(after="objective")
class LossSpec:
    likelihood: str = _f("bernoulli", RegistryChoice("likelihood"), "p(x|z)")
    objective: str = _f("beta_vae", Choice(tuple(OBJECTIVES)),
                        "; ".join(f"{o.name}: {o.summary}" for o in OBJECTIVES.values()))
    # (each objective's own keys here: loss.factor_gamma, loss.discriminator.*, loss.dip_lambda_od, ...)
    beta: float = _f(1.0, Float(0.0, 1e6), "weight of the KL term in the training loss")
    sigma: float = _f(0.1, Float(0.0, 1e3, min_open=True),
                      "gaussian std, laplace scale, or the starting std of gaussian_learned")
    sigma_mode: str = _f("shared", Choice(("shared", "per_pixel")), "gaussian_learned: one sigma, or one per pixel")
    kl_schedule: str = _f("constant", Choice(SCHEDULES),
                          "how the KL weight evolves during training")
    warmup_epochs: float = _f(10.0, Float(0.0, 1e5, min_open=True), "linear: epochs to ramp the KL weight to beta")
    cycles: int = _f(4, Int(1, 1000), "cyclical: number of ramp cycles over train.epochs")
    capacity_max: float = _f(25.0, Float(0.0, 1e5), "capacity: final KL target C in nats")
    capacity_epochs: float = _f(10.0, Float(0.0, 1e5, min_open=True), "capacity: epochs to grow C to capacity_max")
    gamma: float = _f(100.0, Float(0.0, 1e6), "capacity: weight of |KL - C|")
    free_bits: float = _f(0.0, Float(0.0, 1e3), "minimum KL per latent dimension in the training loss (nats)")


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = _f(10, Int(1, 100_000), "maximum epochs")
    batch_size: int = _f(128, Int(1, 1_000_000), "examples per optimiser step")
    lr: float = _f(1e-3, Float(0.0, 10.0, min_open=True), "Adam learning rate")
    patience: int | None = _f(5, Optional(Int(1)), "epochs without val/loss improvement before stopping; null = never")
    seed: int = _f(0, Int(0, 2**32 - 1), "seed of initialisation, batching and sampling")
    device: str = _f("auto", Choice(("auto", "cpu", "cuda")), "auto = cuda when available")
    figure_every: int = _f(0, Int(0, 100_000), "also write reconstructions and samples every N epochs; 0 = off")
    precision: str = _f("fp32", Choice(("fp32", "bf16")),
                        "bf16: training matmuls in bfloat16 autocast (weights, loss and evaluation stay fp32)")
    compile: bool = _f(False, Bool(), "torch.compile the training step (CUDA graphs on GPU); eager if it fails")
    checkpoint_every: int = _f(1, Int(0, 100_000), "save the resumable training state every N epochs; 0 = never")
    system_metrics: bool | str = _f("auto", AutoBool(), "log the machine's CPU, memory (and GPU utilisation and "
                                    "memory, by NVML) as system/* metrics of the run (MLflow's system metrics); "
                                    "auto = on with a tracking server, off with a local SQLite store")
    system_metrics_s: float = _f(10.0, Float(0.5, 3600.0), "seconds between system-metric samples")
    nan_policy: str = _f("fail", Choice(("fail", "retry")),
                         "on a non-finite epoch: fail the run, or roll back once to the last good epoch at lr/10")
    keep_every: int = _f(0, Int(0, 100_000), "also keep the weights every N epochs as a model of their own (an "
                                             "MLflow LoggedModel at that step; --no-track: kept/epoch-NNNN/); 0 = off")
    keep_best: int = _f(0, Int(0, 1000), "also keep the weights of the K best epochs by val/loss so far as models of "
                                         "their own (the others deleted as they drop out); 0 = off")


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int = _f(1000, Int(1, 1_000_000), "examples per evaluation batch")
    tsne_points: int = _f(1000, Int(0, 20_000), "test points in the t-SNE figure; 0 = no t-SNE")
    iw_samples: int = _f(100, Int(0, 100_000), "importance samples k per test image for test/nll_iw; 0 = skip")
    iw_images: int | None = _f(1000, Optional(Int(1)),
                               "test images in test/nll_iw (a seeded subset, the same for every run); null = all")
    iw_capped: bool = _f(True, Bool(), "cap test/nll_iw's images so it costs no more decoder passes than training "
                                       "did (at least 100 images); false = exactly iw_images")
    probe: bool = _f(True, Bool(), "fit a logistic-regression probe on latent means (test/probe_acc)")
    disentanglement: bool | str = _f("auto", AutoBool(), "score disentanglement (test/dis/*: BetaVAE, FactorVAE, MIG, "
                                                        "SAP, DCI, modularity): auto = when the data has ground-truth "
                                                        "factors (dsprites); true = required of the data")
    dis_samples: float | str = _f("auto", OrAuto(Float(0.0, 1.0, min_open=True)),
                                  "share of disentanglement_lib's sample sizes the disentanglement metrics use; "
                                  "auto = as many as cost no more image passes than training (at least 0.01), "
                                  "1 = the reference sizes")
    dci_importance: str = _f("gbt", Choice(("gbt", "random_forest")),
                             "DCI's importance estimator: gbt (disentanglement_lib's, minutes per run on a CPU) "
                             "or random_forest (seconds; numbers differ, compare runs on one estimator only)")
    figures: bool = _f(True, Bool(), "write the PNG figures")


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run needs."""

    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def hash(self) -> str:
        """A short, stable identity of the resolved run: resume states, sweep points and
        the `vaelab.run_hash` tag are keyed by it. Every resolved key and value counts,
        defaults included, so a default that changes between versions (or a new field)
        gives a new identity instead of reusing a state saved for another configuration;
        RUN_HASH_VERSION changes it when the way a run is resolved changes. HOW_NOT_WHAT
        keys (where the images live) do not count, nor another objective's keys added after
        version 3 (objectives.unhashed_keys: a new objective leaves existing identities alone)."""
        skipped = unhashed_keys(self.loss.objective)
        run = {key: value for key, value in flatten(self).items()
               if key not in HOW_NOT_WHAT and not _named(key, skipped)}
        changed = [key for key, (new, _) in _DEFAULT_WAS.items() if run.get(key) == new]
        unused = unused_keys(self)
        for key, neutral in _ADDED_NEUTRAL.items():
            if key in run and (run[key] == neutral or key in unused):
                del run[key]
        for key in changed:
            if key in unused:
                run[key] = _DEFAULT_WAS[key][1]  # a changed default of a key this run does not use keeps its identity
        blob = json.dumps({"version": RUN_HASH_VERSION, "run": run}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = {
    "data": DataSpec, "model": ModelSpec, "loss": LossSpec, "train": TrainSpec, "eval": EvalSpec,
}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _parse_section(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise fail(path, "a mapping", raw)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise SpecError(f"{path}.{show_key(key)}: unknown key; allowed: {', '.join(known)}"
                            f"{did_you_mean(key, known)}")
    values = {}
    for name, f in known.items():
        if name in raw and "section" in f.metadata:
            values[name] = _parse_section(f.metadata["section"], raw[name], f"{path}.{name}")
        elif name in raw:
            values[name] = f.metadata["check"].parse(raw[name], f"{path}.{name}")
    return cls(**values)


def parse_run(raw: Any, path: str = "base") -> RunSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise fail(path or "(run)", "a mapping with sections " + ", ".join(SECTIONS), raw)
    for key in raw:
        if key not in SECTIONS:
            raise SpecError(f"{_join(path, show_key(key))}: unknown section; allowed: {', '.join(SECTIONS)}"
                            f"{did_you_mean(key, SECTIONS)}")
    run = RunSpec(**{name: _parse_section(cls, raw.get(name), _join(path, name)) for name, cls in SECTIONS.items()})
    check_run(run)
    return run


def _data_keys(cls: type = DataSpec, prefix: str = "data.") -> tuple[str, ...]:
    """Every dotted data key, nested sections' included."""
    return tuple(key for f in fields(cls) for key in (
        _data_keys(f.metadata["section"], f"{prefix}{f.name}.") if "section" in f.metadata else (prefix + f.name,)))


def _source_ignores(key: str, run: RunSpec) -> bool:
    from vaelab import registry  # records only: a source's keys are known without torch

    return not registry.source(run.data.dataset).honours(key, run.data)


def _prior_keys() -> dict[str, tuple[str, ...]]:
    from vaelab.registry import PRIORS  # records only

    return {name: prior.keys for name, prior in PRIORS.items() if prior.keys}


# (when a run does not use them, the keys or key prefixes): spec.unused_keys.
_NOT_USED: tuple[tuple[Callable[[RunSpec], bool], tuple[str, ...]], ...] = (
    # a data key its source does not honour (vaelab.data.sources: each source's keys)
    *((lambda r, key=key: _source_ignores(key, r), (key,)) for key in _data_keys()),
    (lambda r: r.model.arch == "mlp", ("model.channels",)),
    (lambda r: r.model.arch != "mlp", ("model.hidden", "model.hidden_act")),
    (lambda r: r.model.levels == 1, ("model.z2_dim", "model.hidden2")),
    *((lambda r, name=name: r.model.prior != name, keys) for name, keys in _prior_keys().items()),
    (lambda r: r.loss.likelihood in ("bernoulli", "continuous_bernoulli"), ("loss.sigma",)),
    (lambda r: r.loss.likelihood != "gaussian_learned", ("loss.sigma_mode",)),
    (lambda r: r.loss.kl_schedule != "linear", ("loss.warmup_epochs",)),
    (lambda r: r.loss.kl_schedule != "cyclical", ("loss.cycles",)),
    (lambda r: r.loss.kl_schedule != "capacity", ("loss.capacity_max", "loss.capacity_epochs", "loss.gamma")),
    # an objective's run does not use the other objectives' own keys
    *((lambda r, name=name: r.loss.objective == name, foreign_keys(name)) for name in OBJECTIVES),
    (lambda r: r.eval.iw_samples == 0, ("eval.iw_images", "eval.iw_capped")),
    (lambda r: r.eval.disentanglement is False or not _has_factors(r), ("eval.dis_samples", "eval.dci_importance")),
)


def _has_factors(run: RunSpec) -> bool:
    from vaelab.registry import DATASETS

    return DATASETS[run.data.dataset].factors


def unused_keys(run: RunSpec) -> set[str]:
    """The dotted keys whose value does not change what this run does (loss.sigma of a Bernoulli run,
    data.hf.* of an image folder, the discriminator of a beta_vae): left out of its MLflow params so the
    UI shows what mattered. They still count in RunSpec.hash (identity covers every key), except an
    objective's keys added after hash version 3 in runs of other objectives."""
    keys = flatten(run)
    unused: set[str] = set()
    for applies, names in _NOT_USED:
        if applies(run):
            unused.update(k for k in keys if _named(k, names))
    return unused


def _named(key: str, names: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of `names`, or under one of them that ends in '.' (a section)."""
    return key in names or key.startswith(tuple(n for n in names if n.endswith(".")))


def check_run(run: RunSpec) -> None:
    """What one key cannot say alone: settings that need something of another section."""
    from vaelab.registry import DATASETS, kl_by_dimension

    DATASETS[run.data.dataset].source().check(run.data)  # a data key its source cannot honour, by name

    model = run.model
    standard = kl_by_dimension(model)  # e.g. a N(0, I) prior on a single code
    if not standard and model.conditional:
        raise SpecError(f"model.conditional: a conditional VAE takes model.prior gaussian and model.levels 1 "
                        f"(got prior {model.prior}, levels {model.levels}): the prior's encoder passes have no labels")
    if model.levels == 2 and model.arch != "mlp":
        raise SpecError(f"model.levels: 2 stochastic levels are built from MLPs; model.arch {model.arch} takes "
                        "levels 1")
    if not standard and run.loss.free_bits > 0:
        raise SpecError(f"loss.free_bits: free bits need the KL per latent dimension, which model.prior {model.prior} "
                        f"with model.levels {model.levels} has not (its KL is a Monte Carlo estimate); leave it 0")
    objective = OBJECTIVES[run.loss.objective]
    if not standard and objective.penalty is not None:
        raise SpecError(f"loss.objective: {objective.name}'s penalty assumes a N(0, I) prior on one code; use it "
                        f"with model.prior gaussian and model.levels 1 (got {model.prior}, {model.levels})")
    conflict = objective.conflicts(run) if objective.conflicts is not None else None
    if conflict is not None:
        raise SpecError(conflict)

    if run.eval.disentanglement is True and not DATASETS[run.data.dataset].factors:
        with_factors = ", ".join(name for name, d in DATASETS.items() if d.factors)
        raise SpecError(f"eval.disentanglement: true needs data with ground-truth factors ({with_factors}); "
                        f"data.dataset {run.data.dataset} has none (use auto or false)")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def to_dict(obj: Any) -> Any:
    """A spec or run spec as plain YAML-able data."""
    return _to_plain(obj)


def field_check(dotted: str) -> Check | None:
    """The check of a dotted run path such as `model.z_dim` or `data.hf.name`, or None if no such path."""
    section, _, rest = dotted.partition(".")
    cls: type | None = SECTIONS.get(section)
    parts = rest.split(".") if rest else []
    for i, part in enumerate(parts):
        found = {f.name: f for f in fields(cls)}.get(part) if cls is not None else None
        if found is None:
            return None
        if "section" not in found.metadata:
            return found.metadata["check"] if i == len(parts) - 1 else None
        cls = found.metadata["section"]
    return None


def is_section(dotted: str) -> bool:
    """Whether a dotted path names a nested section (`data.splits`), which --set may give as a mapping."""
    section, _, rest = dotted.partition(".")
    cls: type | None = SECTIONS.get(section)
    for part in rest.split(".") if rest else []:
        found = {f.name: f for f in fields(cls)}.get(part) if cls is not None else None
        if found is None or "section" not in found.metadata:
            return False
        cls = found.metadata["section"]
    return bool(rest)


def _replaced(obj: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    return dataclasses.replace(obj, **{parts[0]: _replaced(getattr(obj, parts[0]), parts[1:], value)})


def with_values(run: RunSpec, values: Mapping[str, Any]) -> RunSpec:
    """`run` with dotted values replaced (values already checked)."""
    for dotted, value in values.items():
        run = _replaced(run, dotted.split("."), tuple(value) if isinstance(value, list) else value)
    return run


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, dataclasses.Field]]:
    for f in fields(obj):
        if "section" in f.metadata:
            yield from _leaves(f.metadata["section"], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def flatten(run: RunSpec) -> dict[str, Any]:
    """{'model.z_dim': 20, 'data.hf.name': None, ...}: the dotted names used everywhere."""
    flat: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        for dotted, _ in _leaves(cls, f"{section}."):
            value: Any = run
            for part in dotted.split("."):
                value = getattr(value, part)
            flat[dotted] = list(value) if isinstance(value, tuple) else value
    return flat


def run_to_yaml(run: RunSpec, name: str) -> str:
    """The resolved run as a spec file that `load_spec` reads back."""
    return yaml.safe_dump({"name": name, "base": to_dict(run)}, sort_keys=False)
