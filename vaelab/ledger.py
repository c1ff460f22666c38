"""`vaelab ledger`: vaelab's test NLL beside the published numbers it reproduces, in nats per image.

A row is a spec in experiments/ledger/ with a `ledger` section (vaelab.spec.Ledger): the paper, its table, the
published number with its ± and k, the paper's protocol, vaelab's tolerance, what was checked against what. Its
`base` is the run that reproduces the row with vaelab's keys (`vaelab train experiments/ledger/ROW.yaml`, for a
GPU). The ledger finds the latest FINISHED run of that very run (its run hash) in the row's experiment and prints,
per row: published (±), vaelab's test/nll_iw (with the k and images its run logged), the difference, epochs run,
pass or fail against the tolerance, and the run id; a row with no such run says "not run" and the command that
trains it.

`--quick` first trains every row through the normal runner for QUICK's few epochs on a small subset, tracked in
the experiment QUICK_EXPERIMENT so that quick runs never mix with full ones, then prints the same table marked
quick: such runs check the machinery (data, model, objective, estimate, tracking), not the papers' numbers, so
they pass or fail nothing. A row that cannot train (its data missing) says why in its line; the others still
train and print.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaelab.errors import SpecError, UsageError, UserInputError
from vaelab.spec import HOW_NOT_WHAT, Ledger, Spec, apply_overrides, flatten, load_spec, with_values

if TYPE_CHECKING:
    from vaelab.tracking import Tracker

LEDGER_DIR = Path("experiments") / "ledger"
QUICK_EXPERIMENT = "ledger-quick"
# What makes a row quick: a CPU trains each in seconds. Every evaluator but the IWAE estimate is off or cheap;
# k = 50 on 200 test images is still an importance-weighted estimate, through the same code as k = 5000.
QUICK = ("data.subset=2000", "train.epochs=2", "train.patience=null", "eval.iw_samples=50", "eval.iw_images=200",
         "eval.iw_capped=false", "eval.probe=false", "eval.figures=false", "eval.tsne_points=0")
ROW_TAG = "vaelab.ledger.row"  # a quick run's row (full runs are found by their experiment and run hash)
_IWAE_TAG = "vaelab.eval.iwae"  # the iwae evaluator's settings; a later evaluation's carry a suffix (_k5000)
_NLL = "test/nll_iw"


@dataclass(frozen=True)
class Row:
    """One ledger spec, with the caller's overrides applied to its base."""

    path: Path
    spec: Spec

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def entry(self) -> Ledger:
        assert self.spec.ledger is not None  # load_rows refuses a spec without one
        return self.spec.ledger


@dataclass(frozen=True)
class Found:
    """The run a row's number came from: its test NLL at the k and images its run logged."""

    run_id: str
    nll: float | None  # None: the run has no test/nll_iw (eval.iw_samples 0)
    k: int
    images: int
    of: int  # test images in all
    epochs: int
    departs: tuple[str, ...] = ()  # the run's values of the row's keys it does not share ("train.epochs=150")


def parse_data_roots(items: list[str] | None) -> dict[str, str]:
    """`--data-root DATASET=PATH` (repeatable): data.root of the rows on that dataset. Per dataset, because the
    MNIST family's files have the same names: a folder of digits given to a Fashion-MNIST row would be read as
    clothes."""
    from vaelab.registry import DATASETS  # records only

    roots: dict[str, str] = {}
    for item in items or []:
        dataset, sep, root = item.partition("=")
        if not sep or not root or dataset not in DATASETS:
            raise UsageError(f"--data-root {item!r}: expected DATASET=PATH, DATASET one of {', '.join(DATASETS)} "
                             "(e.g. --data-root mnist=/data/mnist)")
        roots[dataset] = str(Path(root).expanduser())  # the shell leaves a ~ after '=' as it is
    return roots


def load_rows(folder: Path, sets: list[str] | None = None, data_roots: Mapping[str, str] | None = None,
              names: list[str] | None = None, quick: bool = False) -> list[Row]:
    """The rows in `folder` (all, or those `names` names), each spec with QUICK (if `quick`), then `sets`, then
    data.root from `data_roots` (by dataset). A spec that does not parse, or has no ledger section, is a one-line
    SpecError naming its file and the dotted key."""
    paths = sorted(folder.glob("*.yaml"))
    if not paths:
        raise UsageError(f"{folder}: no ledger rows (*.yaml) there")
    known = [p.stem for p in paths]
    for name in names or []:
        if name not in known:
            raise UsageError(f"--rows: no row {name!r} in {folder}; rows: {', '.join(known)}")
    rows = []
    for path in paths:
        if names and path.stem not in names:
            continue
        try:
            spec = apply_overrides(load_spec(path), [*(QUICK if quick else ()), *(sets or [])])
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None
        if spec.ledger is None:
            raise SpecError(f"{path}: ledger: missing; a ledger row states the published number its base "
                            "reproduces (`vaelab keys` lists the ledger keys)")
        root = (data_roots or {}).get(spec.base.data.dataset)
        if root is not None:  # MNIST's IDX files are where the user put them
            spec = dataclasses.replace(spec, base=with_values(spec.base, {"data.root": root}))
        rows.append(Row(path, spec))
    return rows


def train_quick(rows: list[Row], tracker: Tracker, show_progress: bool = True) -> dict[str, str]:
    """Train every (quick) row through the normal runner, tracked in QUICK_EXPERIMENT, one after another. A row
    that cannot train (MNIST's files not in data.root, say) is said in one line and left; the others go on.
    Returns why each such row failed, by name."""
    from vaelab import progress
    from vaelab.runner import run

    tracker.describe_experiment(QUICK_EXPERIMENT, "vaelab ledger --quick: every ledger row trained briefly on a "
                                                  "subset, to check the machinery; not comparable with the papers")
    failed: dict[str, str] = {}
    for i, row in enumerate(rows, 1):
        progress.say(f"ledger --quick: row {i}/{len(rows)}, {row.name}")
        try:
            run(row.spec.base, QUICK_EXPERIMENT, tracker, show_progress=show_progress,
                extra_tags={ROW_TAG: row.name}, name=row.name)
        except Exception as err:  # noqa: BLE001 - one row's failure is that row's line; Ctrl-C still stops all
            reason = str(err) if isinstance(err, UserInputError) else f"{type(err).__name__}: {err}"
            failed[row.name] = plain(reason.strip().splitlines()[0] if reason.strip() else type(err).__name__)
            progress.say(f"ledger --quick: {row.name} could not train: {failed[row.name]}")
    return failed


def find_run(row: Row, tracker: Tracker, experiment: str, exact: bool = False) -> Found | None:
    """The latest FINISHED run of the row's very base (its run hash) in `experiment`; else (unless `exact`) the
    latest FINISHED run there of another configuration (`vaelab train ROW --set train.epochs=150`: a row
    trained as long as a machine allowed), with the keys where it departs from the row's base; or None.
    Reading makes no store."""
    finished = tracker.latest_finished(experiment, row.spec.base.hash())
    if finished is None and not exact:
        finished = tracker.latest_finished_in(experiment)
    if finished is None:
        return None
    data = tracker.finished_run(finished.run_id).data
    found = estimate(finished.run_id, finished.metrics, data.tags, row.entry.k)
    return dataclasses.replace(found, departs=departures(row, data.params))


# Keys that say where the images live, how a run is computed or what else it draws, not what the paper's protocol
# trains and estimates: a run, or a `vaelab ledger --set`, that differs only in these is still the row's protocol.
NOT_PROTOCOL = HOW_NOT_WHAT | frozenset({
    "data.root", "data.download", "train.device", "train.compile", "train.figure_every", "train.checkpoint_every",
    "eval.batch_size", "eval.tsne_points", "eval.probe", "eval.disentanglement", "eval.dis_samples",
    "eval.dci_importance", "eval.figures"})


def protocol_sets(sets: list[str] | None) -> list[str]:
    """The `--set KEY=VALUE` items that change a row's protocol (not NOT_PROTOCOL's keys)."""
    return [item for item in sets or [] if item.partition("=")[0].strip() not in NOT_PROTOCOL]


def departures(row: Row, params: Mapping[str, str]) -> tuple[str, ...]:
    """The keys of the row's base whose value the run's params (MLflow's strings) differ in, as "key=value"
    with the run's value; keys the run did not log (not used by it) are not compared."""
    from vaelab.tracking.writer import param_text  # how the run logged each value (None as "null")

    def text(value: Any) -> str:
        return param_text(list(value) if isinstance(value, tuple) else value)

    return tuple(f"{key}={params[key]}" for key, value in flatten(row.spec.base).items()
                 if key in params and key not in NOT_PROTOCOL and params[key] != text(value))


def estimate(run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str], k: int) -> Found:
    """The run's importance-weighted NLL closest to the paper's estimate: one with k samples on every test image
    if the run has it (its own, or a later `vaelab evaluate`'s, named with a suffix such as _k5000), else its
    own test/nll_iw, with the k and images its settings tag logged."""
    logged = []
    for key, text in tags.items():
        if not key.startswith(_IWAE_TAG):
            continue
        suffix = key[len(_IWAE_TAG):]
        try:
            settings = json.loads(text)
            entry = (suffix, int(settings["k"]), int(settings["images"]), int(settings["of"]))
        except (ValueError, KeyError, TypeError):
            continue
        if _NLL + suffix in metrics:
            logged.append(entry)
    epochs = int(metrics.get("train/epochs_run", 0))
    if not logged:
        return Found(run_id, None, 0, 0, 0, epochs)
    # the paper's estimate first, then the run's own, then the most samples
    suffix, k_run, images, of = max(logged, key=lambda e: ((e[1], e[2]) == (k, e[3]), e[0] == "", e[1] * e[2]))
    return Found(run_id, float(metrics[_NLL + suffix]), k_run, images, of, epochs)


def plain(value: Any) -> str:
    """Text from a spec as a terminal shows it: one line, no control or format character (an escape sequence,
    a bidirectional override) to act on."""
    return "".join(" " if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch for ch in str(value)).strip()


def _published(entry: Ledger) -> str:
    return f"{entry.published:.2f}" + (f" ± {entry.published_pm:.2f}" if entry.published_pm is not None else "")


def _verdict(entry: Ledger, found: Found, quick: bool, overridden: bool = False) -> str:
    if quick:
        return "quick"
    assert found.nll is not None
    if found.departs or overridden:  # a run of another configuration than the paper's: nothing to pass
        return "not the protocol"
    if found.k != entry.k or found.images < found.of:
        return f"not comparable (the paper: k={entry.k} on every test image)"
    ok = abs(found.nll - entry.published) <= entry.tolerance
    return f"{'pass' if ok else 'FAIL'} (tol {entry.tolerance:g})"


def table(rows: list[Row], found: Mapping[str, Found | None], quick: bool,
          train_command: Callable[[Row], str], sets: list[str] | None = None,
          failed: Mapping[str, str] | None = None) -> list[str]:
    """The ledger's lines: a header, then per paper and table its rows, each one line (published, vaelab,
    difference, k and images, epochs, verdict, run) and a line naming the row in the paper's words. `sets`: the
    overrides the runs were looked up with; those that change the protocol are said in the header (such runs
    pass or fail nothing). `failed`: why a quick row could not train, by name."""
    width = max([len(row.name) for row in rows] + [3])
    head = (f"{'row':<{width}}  {'published':>15}  {'vaelab':>8}  {'diff':>6}  {'k':>5}  {'images':>11}  "
            f"{'epochs':>6}  {'verdict':<16}  run")
    lines = ["vaelab ledger: test NLL, nats per image (lower is better); vaelab's number is test/nll_iw of the run "
             "named, at the k it logged" + (", from QUICK runs" if quick else "")]
    if quick:
        lines.append(f"QUICK (experiment {QUICK_EXPERIMENT}): {', '.join(QUICK)}: the machinery is checked, not "
                     "the papers' numbers")
    changed = protocol_sets(sets)
    if changed:
        lines.append(f"every row's run with --set {plain(' '.join(changed))}: not the protocol its spec states")
    lines.append(head)
    paper = None
    for row in rows:
        entry = row.entry
        if (entry.paper, entry.table) != paper:
            paper = (entry.paper, entry.table)
            lines.append(f"{plain(entry.paper)}; {plain(entry.table)}")
        start = f"{plain(row.name):<{width}}  {_published(entry):>15}  "
        hit = found.get(row.name)
        if row.name in (failed or {}):
            lines.append(start + f"{'failed':>8}  could not train: {plain((failed or {})[row.name])}")
        elif hit is None:
            lines.append(start + f"{'not run':>8}  train it: {plain(train_command(row))}")
        elif hit.nll is None:
            lines.append(start + f"{'no NLL':>8}  run {hit.run_id} logged no {_NLL} (eval.iw_samples 0?)")
        else:
            diff = "-" if quick else f"{hit.nll - entry.published:+.2f}"
            images = "all" if hit.images >= hit.of else f"{hit.images}/{hit.of}"
            lines.append(start + f"{hit.nll:>8.2f}  {diff:>6}  {hit.k:>5}  {images:>11}  {hit.epochs:>6}  "
                                 f"{_verdict(entry, hit, quick, bool(changed)):<16}  {hit.run_id}")
            if hit.departs and not quick:
                lines.append(f"{'':<{width}}  this run departs from the row's base: {plain(', '.join(hit.departs))}")
        note = f"{'':<{width}}  {plain(entry.row)}"
        if entry.unverified:
            note += f"; unverified: {', '.join(plain(u) for u in entry.unverified)}"
        lines.append(note)
    lines.append("pass: |vaelab - published| <= the row's tolerance in nats; each row's spec states the paper's "
                 "protocol, its sources and where vaelab's run departs from it (ledger.differs)")
    return lines


@dataclass(frozen=True)
class Printed:
    """What `vaelab ledger` prints, and the quick rows that could not train (the command then exits 1)."""

    lines: list[str]
    failed: tuple[str, ...] = ()


def run_ledger(folder: Path = LEDGER_DIR, quick: bool = False, tracking_uri: str | None = None,
               sets: list[str] | None = None, data_roots: list[str] | None = None, names: list[str] | None = None,
               program: str = "vaelab", show_progress: bool = True) -> Printed:
    """`vaelab ledger`: the table's lines, after training the quick rows when `quick`. `data_roots`: as
    `--data-root` takes them (DATASET=PATH)."""
    from vaelab.tracking import Tracker

    roots = parse_data_roots(data_roots)
    rows = load_rows(folder, sets, roots, names, quick)
    tracker = Tracker(tracking_uri)
    failed = train_quick(rows, tracker, show_progress) if quick else {}
    found = {row.name: find_run(row, tracker, QUICK_EXPERIMENT if quick else row.spec.name, exact=quick)
             for row in rows}

    def train_command(row: Row) -> str:
        root = roots.get(row.spec.base.data.dataset)
        extra = [*(sets or []), *([f"data.root={root}"] if root is not None else [])]
        args = ["train", str(row.path), *(a for s in extra for a in ("--set", s)),
                *(["--tracking-uri", tracking_uri] if tracking_uri else [])]
        return f"{program} {shlex.join(args)}"

    return Printed(table(rows, found, quick, train_command, sets, failed), tuple(failed))
