"""The ledger (experiments/ledger/, `vaelab ledger`): every row's spec parses and states its paper, table, number,
protocol, tolerance and sources; the rows carry the numbers their sources give; `vaelab ledger --quick` trains
rows through the normal runner on generated IDX files and prints a vaelab number per row, kept apart from full
runs; without runs each row says "not run" and how to train it; a bad ledger section is one line naming its key.

tests/test_experiments.py checks the specs directly in experiments/ (git's tracked *.yaml without a '/'); the
ledger's specs live in experiments/ledger/ and are checked here instead: each parses, names its command on its
first line, and (test_whole_ledger_quick, slow) trains end to end."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_idx_folder
from vaelab import cli
from vaelab.errors import SpecError
from vaelab.ledger import QUICK_EXPERIMENT, Found, estimate, load_rows, plain, table
from vaelab.spec import LEDGER_KEYS, PROTOCOL_KEYS, REQUIRED, describe_fields, load_spec, parse_spec

LEDGER = REPO / "experiments" / "ledger"
ROWS = sorted(LEDGER.glob("*.yaml"))
# The rows the ledger must carry and the numbers their sources give (nats per image, ± or None): IWAE paper
# Table 1 as github.com/nbip/IWAE quotes it; the Exemplar VAE table as github.com/sajadn/Exemplar-VAE shows it.
CARRIED = {
    "iwae_mnist_l1_vae": (86.76, None), "iwae_mnist_l1_iwae_k5": (85.54, None),
    "iwae_mnist_l1_iwae_k50": (84.78, None), "iwae_mnist_l2_vae": (85.33, None),
    "iwae_mnist_l2_iwae_k5": (83.89, None), "iwae_mnist_l2_iwae_k50": (82.90, None),
    "exemplar_mnist_vae_vamp": (82.43, 0.06), "exemplar_mnist_hvae_vamp": (81.56, 0.09),
    "exemplar_fmnist_vae_gaussian": (228.70, 0.15), "exemplar_fmnist_vae_vamp": (227.35, 0.05),
    "exemplar_fmnist_hvae_vamp": (226.72, 0.08),
}
QUICK_ROWS = "exemplar_mnist_vae_vamp,iwae_mnist_l2_iwae_k5"  # gated + VampPrior + warm-up; tanh, 2 levels, IWAE


@pytest.fixture
def ledger_cli(tmp_path: Path, monkeypatch, capsys, tracking_uri: str):
    """`vaelab ledger ARGS` in this process, on a fresh MLflow store: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def call(*args: str, uri: str = tracking_uri) -> tuple[int, str, str]:
        code = cli.main(["ledger", "--tracking-uri", uri, "--no-progress", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_the_ledger_carries_the_rows_it_must():
    assert sorted(p.stem for p in ROWS) == sorted(CARRIED)


@pytest.mark.parametrize("path", ROWS, ids=lambda p: p.stem)
def test_every_row_parses_and_its_ledger_is_complete(path: Path):
    spec = load_spec(path)
    assert spec.name == path.stem and spec.search is None
    assert path.read_text().splitlines()[0].startswith(f"# vaelab train experiments/ledger/{path.stem}.yaml")
    raw = yaml.safe_load(path.read_text())["ledger"]
    # every required key written out, published_pm too (null where the table gives no ±)
    assert {k.name for k in LEDGER_KEYS if k.default is REQUIRED} <= set(raw)
    assert {k.name for k in PROTOCOL_KEYS} <= set(raw["protocol"])
    entry = spec.ledger
    assert entry is not None and entry.sources and entry.paper.strip() and entry.table.strip() and entry.row.strip()
    assert (entry.published, entry.published_pm) == CARRIED[path.stem]
    # the run is the paper's estimate: k samples on every test image of data binarised as the paper's
    assert (spec.base.eval.iw_samples, spec.base.eval.iw_images, spec.base.eval.iw_capped) == (entry.k, None, False)
    assert spec.base.data.binarize == entry.protocol.binarization == "dynamic"
    assert spec.base.model.arch == "mlp" and 0 < entry.tolerance <= 2


def test_the_rows_are_the_papers_models():
    """What the sources say of each row's model, in vaelab's keys (a typo in one spec fails here)."""
    rows = {p.stem: yaml.safe_load(p.read_text())["base"] for p in ROWS}
    for name, base in rows.items():
        model, loss, train = base["model"], base["loss"], base["train"]
        if name.startswith("iwae_"):
            assert (model["hidden"], model["hidden_act"], train["batch_size"], train["epochs"]) == \
                   ([200, 200], "tanh", 20, 3280)
            levels = 2 if "_l2_" in name else 1
            assert model.get("levels", 1) == levels
            assert model["z_dim"] == (50 if levels == 1 else 100)
            if levels == 2:
                assert (model["z2_dim"], model["hidden2"]) == (50, [100, 100])
            k = re.search(r"_k(\d+)$", name)
            assert (loss.get("objective"), loss.get("iw_k")) == (("iwae", int(k.group(1))) if k else ("beta_vae", None))
        else:
            assert (model["hidden"], model["hidden_act"], model["z_dim"], train["lr"], train["batch_size"]) == \
                   ([300, 300], "gated", 40, 5.0e-4, 100)
            assert (loss["kl_schedule"], loss["warmup_epochs"], train["patience"]) == ("linear", 100, 50)
            assert model["prior"] == ("gaussian" if "gaussian" in name else "vamp")
            assert model.get("levels", 1) == (2 if "_hvae_" in name else 1)


def test_without_runs_every_row_says_not_run_and_how_to_train_it(ledger_cli, tmp_path: Path):
    store = tmp_path / "nowhere" / "mlflow.db"
    code, out, _ = ledger_cli("--folder", str(LEDGER), "--data-root", f"mnist={tmp_path / 'mnist'}",
                              uri=f"sqlite:///{store}")
    assert code == 0
    for path in ROWS:
        (line,) = [ln for ln in out.splitlines() if ln.startswith(path.stem + " ")]
        assert "not run" in line and f"train {path}" in line
        assert (f"--set data.root={tmp_path / 'mnist'}" in line) == ("_mnist_" in path.stem)
    assert "nats per image" in out
    assert not store.exists()  # reading the ledger makes no store


def test_quick_ledger_trains_rows_and_prints_their_numbers(ledger_cli, tmp_path: Path):
    """Two rows on generated IDX files through the normal runner, tracked in ledger-quick; a full ledger after
    it still finds no run of those rows (quick runs never stand in for full ones)."""
    root = make_idx_folder(tmp_path / "mnist-files")
    code, out, err = ledger_cli("--folder", str(LEDGER), "--quick", "--rows", QUICK_ROWS, "--data-root",
                                f"mnist={root}")
    assert code == 0, err
    assert f"experiment {QUICK_EXPERIMENT}" in out
    for name in QUICK_ROWS.split(","):
        (line,) = [ln for ln in out.splitlines() if ln.startswith(name + " ")]
        fields = line.split()
        nll, diff, k, images, epochs, verdict, run_id = fields[-7:]
        assert float(nll) > 0 and (diff, k, images, epochs, verdict) == ("-", "50", "all", "2", "quick")
        assert re.fullmatch(r"[0-9a-f]{32}", run_id)
    code, out, _ = ledger_cli("--folder", str(LEDGER), "--rows", QUICK_ROWS, "--data-root", f"mnist={root}")
    assert code == 0 and out.count("not run") == 2


def test_a_full_row_is_found_by_its_spec_and_judged_against_its_tolerance(ledger_cli, tmp_path: Path, capsys,
                                                                          tracking_uri: str):
    """A run trained by the command the ledger gives (here with --set making it tiny: the ledger looks it up with
    the same --set and says so) is found, compared at the paper's k on every test image, and passes or fails."""
    root = make_idx_folder(tmp_path / "mnist-files", n_train=120, n_test=20)
    row = LEDGER / "exemplar_mnist_vae_vamp.yaml"
    tiny = ["train.epochs=1", "model.prior_components=10", "eval.probe=false", "eval.figures=false",
            "eval.tsne_points=0"]
    sets = [a for s in tiny for a in ("--set", s)]
    assert cli.main(["train", str(row), *sets, "--set", f"data.root={root}", "--tracking-uri", tracking_uri,
                     "--no-progress"]) == 0
    run_id = re.search(r"run ([0-9a-f]{32}) FINISHED", capsys.readouterr().out).group(1)
    code, out, err = ledger_cli("--folder", str(LEDGER), "--rows", row.stem, *sets, "--data-root", f"mnist={root}")
    assert code == 0, err
    # the header names the --set items that change the protocol, not those that only say what else a run draws
    assert "every row's run with --set train.epochs=1 model.prior_components=10: not the protocol" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith(row.stem + " ")]
    nll, diff, k, images, epochs = line.split()[4:9]
    assert (k, images, epochs) == ("5000", "all", "1") and line.endswith(run_id)
    assert float(diff) == pytest.approx(float(nll) - 82.43, abs=0.011)
    assert "not the protocol" in line  # looked up with --set: a run of another configuration passes nothing
    # Looked up as the row states it, the ledger still shows that run, and where it departs from the row's base.
    code, out, err = ledger_cli("--folder", str(LEDGER), "--rows", row.stem, "--data-root", f"mnist={root}")
    assert code == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.startswith(row.stem + " ")]
    assert line.endswith(run_id) and "not the protocol" in line and "pass" not in line and "FAIL" not in line
    departs = next(ln for ln in out.splitlines() if "departs from the row's base" in ln)
    assert "train.epochs=1" in departs and "model.prior_components=10" in departs and "data.root" not in departs
    assert "model.hidden_act" not in departs and "model.hidden" not in departs  # shared keys are not listed
    assert "eval.iw_images" not in departs and "data.subset" not in departs  # nor shared nulls (logged "null")


@pytest.mark.slow
def test_whole_ledger_quick(ledger_cli, tmp_path: Path):
    """`vaelab ledger --quick` over every row, MNIST and Fashion-MNIST rows on generated IDX files."""
    root = make_idx_folder(tmp_path / "idx")
    code, out, err = ledger_cli("--folder", str(LEDGER), "--quick", "--data-root", f"mnist={root}",
                                "--data-root", f"fashion_mnist={root}")
    assert code == 0, err
    lines = out.splitlines()
    for path in ROWS:
        (line,) = [ln for ln in lines if ln.startswith(path.stem + " ")]
        assert float(line.split()[-7]) > 0 and " quick " in line


def _bad_row(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "ledger"
    folder.mkdir()
    raw = yaml.safe_load((LEDGER / "exemplar_fmnist_vae_gaussian.yaml").read_text())
    edit(raw)
    (folder / "row.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.mark.parametrize(("edit", "said"), [
    (lambda r: r["ledger"].update(published=-228.7), "ledger.published: expected float > 0, got -228.7"),
    (lambda r: r["ledger"].update(tolerence=1.0), "ledger.tolerence: unknown key; allowed: paper, table"),
    (lambda r: r["ledger"]["protocol"].pop("split"), "ledger.protocol.split: missing"),
    (lambda r: r["ledger"].pop("published_pm"), "ledger.published_pm: missing"),
    (lambda r: r["ledger"].update(k=1000), "ledger.k: 1000, but base.eval.iw_samples is 5000"),
    (lambda r: r["ledger"]["protocol"].update(binarization="static"), "ledger.protocol.binarization: static, but"),
    (lambda r: r["base"]["eval"].update(iw_images=1000), "ledger: the published number is over the whole test"),
    (lambda r: r["ledger"].update(unverified=["model.prior_compnents"]),
     "ledger.unverified[0]: 'model.prior_compnents' is neither a ledger key nor a run key; did you mean "
     "model.prior_components?"),
    (lambda r: r.pop("ledger"), "ledger: missing; a ledger row states"),
])
def test_a_bad_ledger_section_is_one_line_naming_the_key(ledger_cli, tmp_path: Path, edit, said):
    folder = _bad_row(tmp_path, edit)
    code, out, err = ledger_cli("--folder", str(folder))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"vaelab: error: {folder / 'row.yaml'}: ") and said in err


def test_a_typo_in_a_ledger_key_gets_did_you_mean_and_a_row_has_no_search():
    raw = yaml.safe_load((LEDGER / "exemplar_fmnist_vae_gaussian.yaml").read_text())
    raw["ledger"]["tolerence"] = raw["ledger"].pop("tolerance")
    with pytest.raises(SpecError, match="did you mean tolerance"):
        parse_spec(raw)
    raw = yaml.safe_load((LEDGER / "exemplar_fmnist_vae_gaussian.yaml").read_text())
    raw["search"] = {"kind": "grid", "params": {"loss.beta": [1, 2]}}
    with pytest.raises(SpecError, match="search: a ledger row is one run"):
        parse_spec(raw)


def test_keys_lists_the_ledger_keys():
    listed = {path: default for path, default, _, _ in describe_fields()}
    assert repr(listed["ledger.published"]) == "required" and listed["ledger.unverified"] == ()
    assert "ledger.protocol.binarization" in listed and "ledger.protocol" not in listed


def test_bad_command_line_input_is_one_line(ledger_cli, tmp_path: Path):
    code, _, err = ledger_cli("--folder", str(LEDGER), "--rows", "iwae_mnist_l9_vae")
    assert code == 2 and "--rows: no row 'iwae_mnist_l9_vae'" in err
    code, _, err = ledger_cli("--folder", str(LEDGER), "--data-root", str(tmp_path))
    assert code == 2 and "expected DATASET=PATH" in err
    code, _, err = ledger_cli("--folder", str(tmp_path))
    assert code == 2 and "no ledger rows" in err


def test_data_root_goes_to_its_datasets_rows_only(tmp_path: Path):
    """MNIST's and Fashion-MNIST's files have the same names: a digits folder must never reach a Fashion row."""
    folder = tmp_path / "ledger"
    folder.mkdir()
    for name in ("exemplar_fmnist_vae_gaussian", "exemplar_mnist_vae_vamp"):
        shutil.copy(LEDGER / f"{name}.yaml", folder)
    rows = {row.name: row for row in load_rows(folder, data_roots={"mnist": "/digits"})}
    assert rows["exemplar_mnist_vae_vamp"].spec.base.data.root == "/digits"
    assert rows["exemplar_fmnist_vae_gaussian"].spec.base.data.root == "data"


def test_the_estimate_compared_is_the_papers_when_the_run_has_it():
    """A later `vaelab evaluate --set eval.iw_samples=5000` logs test/nll_iw_k5000 beside the run's own estimate:
    the ledger compares that one, at the k it logged."""
    tags = {"vaelab.eval.iwae": '{"k": 100, "images": 1000, "of": 10000}',
            "vaelab.eval.iwae_k5000": '{"k": 5000, "images": 10000, "of": 10000}',
            "vaelab.eval.iwae_k50_n200": "not json"}
    metrics = {"test/nll_iw": 90.0, "test/nll_iw_k5000": 88.5, "train/epochs_run": 7}
    found = estimate("r1", metrics, tags, k=5000)
    assert (found.nll, found.k, found.images, found.of, found.epochs) == (88.5, 5000, 10000, 10000, 7)
    found = estimate("r1", metrics, {"vaelab.eval.iwae": tags["vaelab.eval.iwae"]}, k=5000)
    assert (found.nll, found.k, found.images) == (90.0, 100, 1000)
    assert estimate("r1", {}, {}, k=5000).nll is None


def test_spec_text_is_printed_as_one_plain_line():
    assert plain("Table 1\x1b[2J\nrow\u202e") == "Table 1 [2J row"


def _judged(found: Found, sets: list[str] | None = None) -> str:
    """The verdict column of exemplar_fmnist_vae_gaussian's line (228.70, tolerance 1 nat) for `found`."""
    (row,) = load_rows(LEDGER, names=["exemplar_fmnist_vae_gaussian"])
    lines = table([row], {row.name: found}, quick=False, train_command=lambda r: "train", sets=sets)
    (line,) = [ln for ln in lines if ln.startswith(row.name + " ")]
    return line.split(maxsplit=9)[-1].rsplit(maxsplit=1)[0].strip()  # name, published (3), vaelab .. epochs


@pytest.mark.parametrize(("nll", "k", "images", "departs", "verdict"), [
    (229.69, 5000, 10000, (), "pass (tol 1)"),  # within the row's tolerance, either side
    (227.71, 5000, 10000, (), "pass (tol 1)"),
    (229.71, 5000, 10000, (), "FAIL (tol 1)"),  # just outside it
    (226.50, 5000, 10000, (), "FAIL (tol 1)"),  # better than the paper by more than the tolerance is a FAIL too
    (228.70, 1000, 10000, (), "not comparable (the paper: k=5000 on every test image)"),
    (228.70, 5000, 1000, (), "not comparable (the paper: k=5000 on every test image)"),
    (228.70, 5000, 10000, ("train.epochs=150",), "not the protocol"),
])
def test_a_full_run_passes_or_fails_against_the_rows_tolerance_at_the_papers_estimate(nll, k, images, departs,
                                                                                     verdict):
    assert _judged(Found("r1", nll, k, images, 10000, 900, departs)) == verdict


def test_a_set_that_changes_no_protocol_still_passes_or_fails():
    """`vaelab ledger --set train.device=cuda` (how, not what) keeps the verdict; `--set train.epochs=5` does not."""
    exact = Found("r1", 228.9, 5000, 10000, 10000, 900)
    assert _judged(exact, ["train.device=cuda", "eval.batch_size=500", "data.root=/x"]) == "pass (tol 1)"
    assert _judged(exact, ["train.device=cuda", "train.epochs=5"]) == "not the protocol"


def test_a_quick_row_that_cannot_train_says_why_and_the_others_still_print(ledger_cli, tmp_path: Path):
    """Offline without MNIST's files, a quick ledger still trains and prints the rows it can; the one that cannot
    train says why in its line, and the command exits 1 naming it."""
    root = make_idx_folder(tmp_path / "mnist-files", n_train=120, n_test=20)
    folder = tmp_path / "ledger"
    folder.mkdir()
    raw = yaml.safe_load((LEDGER / "exemplar_mnist_vae_vamp.yaml").read_text())
    for name, data_root in (("a_missing", tmp_path / "no-mnist-here"), ("b_present", root)):
        raw.update(name=name)
        raw["base"]["data"].update(root=str(data_root), download=False)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = ledger_cli("--folder", str(folder), "--quick")
    assert code == 1 and err.strip().splitlines()[-1] == "vaelab ledger: 1 row(s) could not train: a_missing"
    (missing,) = [ln for ln in out.splitlines() if ln.startswith("a_missing ")]
    assert "failed  could not train: " in missing and str(tmp_path / "no-mnist-here") in missing
    (present,) = [ln for ln in out.splitlines() if ln.startswith("b_present ")]
    assert present.split()[-2] == "quick" and float(present.split()[4]) > 0  # name, published (3), vaelab
