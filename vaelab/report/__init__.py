"""A study's report from the tracking store alone: runs -> pandas -> markdown
tables (mean ± std over seeds), a CSV, and figures. Nothing is trained or loaded."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from vaelab.errors import ReportError
from vaelab.evaluation.evaluators import EVALUATORS, Evaluator, owner
from vaelab.evaluation.evaluators import metrics as evaluator_metrics
from vaelab.report import figures as report_figures
from vaelab.report.escape import md_cell, md_text, md_url
from vaelab.runlog import HASH_TAG
from vaelab.tracking import UI_BASE, run_link, ui_base_for

# The run's own metrics a table shows, after the evaluators': metric -> (header, which way is better).
RUN_METRICS: dict[str, tuple[str, str | None]] = {"train/epochs_run": ("epochs", None),
                                                  "time/train_s": ("train time (s)", None)}


def known_metrics() -> dict[str, tuple[str, str | None]]:
    """metric -> (column header with its unit, which way is better: "min", "max" or None): every evaluator's
    metrics that tables show (vaelab.evaluation's records, in run order), then the run's own."""
    shown = {metric.key: (metric.header, metric.better) for _, metric in evaluator_metrics() if metric.in_table}
    return {**shown, **RUN_METRICS}


@dataclass
class StudyRuns:
    name: str
    experiment_id: str
    runs: pd.DataFrame  # child runs (or plain runs), one row each
    parent: pd.Series | None
    swept: list[str]  # dotted keys that vary between configurations (train.seed excluded)
    ui_base: str = UI_BASE  # where run links point: the tracking server itself, else `make ui`
    left_out: int = 0  # runs of earlier specs of the study (children of older parent runs), not reported


def _outcome(row: pd.Series) -> str:
    status = row["status"]
    reason = str(row.get("tags.failure_reason") or "")
    if status == "FINISHED":
        return "finished"
    if status == "KILLED":
        return "pruned" if "pruned" in reason else "killed"
    return {"FAILED": "failed", "RUNNING": "running"}.get(status, status.lower())


# Tags of a sweep's parent run, written by vaelab.sweeps.coordinator (the report imports no optuna): the
# study's generation (a spec replaced with --allow-spec-change starts the next), and the runs of earlier
# generations that are points of its spec too (comma-separated ids in tags GENERATION_CARRIED<n>).
GENERATION_COLUMN = "tags.vaelab.sweep.generation"
GENERATION_CARRIED = "tags.vaelab.sweep.carried."


def _carried(parent: pd.Series) -> set[str]:
    return {run_id for column, value in parent.items() if str(column).startswith(GENERATION_CARRIED)
            and isinstance(value, str) for run_id in value.split(",") if run_id}


def select_runs(name: str, experiment_id: str, frame: pd.DataFrame) -> StudyRuns:
    """The runs of the study's current spec: the children of its newest parent run (the latest generation)
    and the earlier runs that parent names as points of its spec too; the children of older parent runs
    (earlier specs) are left out, and counted."""
    is_parent = frame["tags.vaelab.sweep"].notna() if "tags.vaelab.sweep" in frame else pd.Series(False, frame.index)
    parents = frame[is_parent].copy()
    generation = parents[GENERATION_COLUMN] if GENERATION_COLUMN in parents else pd.Series(1, parents.index)
    parents["generation"] = pd.to_numeric(generation, errors="coerce").fillna(1)  # a parent from before: 1
    parents = parents.sort_values(["generation", "start_time"])
    parent = parents.iloc[-1] if len(parents) else None
    runs = frame[~is_parent].copy()
    left_out = 0
    if parent is not None and "tags.mlflow.parentRunId" in runs:
        mine = (runs["tags.mlflow.parentRunId"] == parent["run_id"]) | runs["run_id"].isin(_carried(parent))
        left_out = int((~mine & runs["tags.mlflow.parentRunId"].isin(parents["run_id"])).sum())
        runs = runs[mine].copy()
    runs["outcome"] = [_outcome(row) for _, row in runs.iterrows()]
    listed = str(parent.get("params.search.params") or "") if parent is not None else ""
    swept = [k for k in listed.split(", ") if k] if listed else _varying_params(runs)
    return StudyRuns(name=name, experiment_id=experiment_id, runs=runs, parent=parent,
                     swept=[k for k in swept if k != "train.seed"], left_out=left_out)


def _left_out_note(study: StudyRuns) -> list[str]:
    """One line on the runs of earlier specs that select_runs left out."""
    if not study.left_out:
        return []
    return ["", f"> **Earlier specs left out:** {study.left_out} run{'s' if study.left_out != 1 else ''} of "
                "earlier specs of this study (under older sweep parent runs, before `--allow-spec-change`) "
                "are not in this report."]


def _varying_params(runs: pd.DataFrame) -> list[str]:
    cols = [c for c in runs if c.startswith("params.") and c != "params.train.seed"]
    return [c[len("params."):] for c in cols if runs[c].nunique(dropna=False) > 1]


def metric_columns(runs: pd.DataFrame) -> list[str]:
    present = {c[len("metrics."):] for c in runs if c.startswith("metrics.") and runs[c].notna().any()}
    known = known_metrics()
    ordered = [m for m in known if m in present and m.startswith("test/")]
    # Then settings-marked names (test/nll_iw_k5000) and test metrics no evaluator declares; what an evaluator
    # keeps out of tables stays out (test/loss includes beta, so it differs between configurations by
    # construction; test/kl_dim/<d> belong in the run's figure; side numbers stay in MLflow).
    ordered += sorted(m for m in present if m.startswith("test/") and m not in known and _in_tables(m))
    return ordered + [m for m in RUN_METRICS if m in present]


def _in_tables(key: str) -> bool:
    found = owner(key)
    return found is None or found[1].in_table


def _section(key: str) -> Evaluator | None:
    """The evaluator whose report section of its own shows `key`, or None (the results table)."""
    found = owner(key)
    return found[0] if found is not None and found[0].section is not None else None


def _settings_column(evaluator: Evaluator) -> str:
    return f"{evaluator.name} settings"


def _marked(evaluator: Evaluator) -> bool:
    """Whether its metrics depend on settings that can differ between runs (their labels are shown)."""
    return any(metric.by_settings for metric in evaluator.metrics)


HASH_COLUMN = f"tags.{HASH_TAG}"


def one_per_identity(finished: pd.DataFrame) -> pd.DataFrame:
    """`finished` with the copies of one identical run (the same vaelab.run_hash: `vaelab train --again`, or
    a spec trained twice) collapsed to the latest finished one, in the order given. A copy is no new seed:
    counted as one it would show ± 0.00 and give the t-test a spread the runs do not have."""
    if HASH_COLUMN not in finished or finished.empty:
        return finished
    keyed = finished[HASH_COLUMN].notna()
    latest = finished[keyed].sort_values("end_time", kind="stable").drop_duplicates(HASH_COLUMN, keep="last")
    return finished[~keyed | finished.index.isin(latest.index)]


def _finished(study: StudyRuns) -> pd.DataFrame:
    """The finished runs the tables, figures and picks count: one per run identity."""
    return one_per_identity(study.runs[study.runs["outcome"] == "finished"]).copy()


def _copies_note(study: StudyRuns) -> list[str]:
    """One line on the finished runs left out as copies of another (one_per_identity)."""
    copies = int((study.runs["outcome"] == "finished").sum()) - len(_finished(study))
    if not copies:
        return []
    runs = f"{copies} finished runs repeat" if copies != 1 else "1 finished run repeats"
    return ["", f"> **Copies collapsed:** {runs} "
                "an identical run (the same `vaelab.run_hash`: `vaelab train --again`, or a spec trained twice); each "
                "counts once, as its latest finished run: a copy is no new seed."]


def aggregate(study: StudyRuns) -> pd.DataFrame:
    """One row per configuration: mean, std and n of every metric over seeds (runs of one identity count once)."""
    finished = _finished(study)
    keys = [f"params.{k}" for k in study.swept]
    for key in keys:  # a swept key no finished run uses yet (a union's other grid) is not in the store at all
        if key not in finished:
            finished[key] = np.nan
    metrics = metric_columns(finished)
    if finished.empty:
        return pd.DataFrame()
    grouped = finished.groupby(keys, sort=False, dropna=False) if keys else finished.groupby(lambda _: "all")
    rows = []
    for group_key, part in grouped:
        values = group_key if isinstance(group_key, tuple) else (group_key,)
        row = dict(zip(study.swept, values, strict=False)) if keys else {}
        row["n"] = len(part)
        for metric in metrics:
            column = part[f"metrics.{metric}"].astype(float).dropna()
            row[f"{metric} mean"] = column.mean() if len(column) else np.nan
            row[f"{metric} std"] = column.std(ddof=1) if len(column) > 1 else np.nan
            row[f"{metric} n"] = len(column)  # runs that have it: the t-test's sample size
        row["run_ids"] = list(part["run_id"])
        for evaluator in filter(_marked, EVALUATORS.values()):
            tags = part.get(_settings_tag(evaluator), pd.Series(dtype=str))
            row[_settings_column(evaluator)] = sorted({_settings_label(evaluator, tag) for tag in tags
                                                      if isinstance(tag, str)})
        rows.append(row)
    table = pd.DataFrame(rows)
    if study.swept:  # rows in the order of the swept values, numerically where they are numbers
        keys = pd.DataFrame({k: _sortable(table[k]) for k in study.swept})
        table = table.loc[keys.sort_values(study.swept).index].reset_index(drop=True)
    return table


DIS_PREFIX = "test/dis/"  # the scores whose best run's factor figures the report shows


def _settings_tag(evaluator: Evaluator) -> str:
    """The runs-table column of the tag an evaluator's settings are logged in (vaelab.evaluation.stage)."""
    return f"tags.vaelab.eval.{evaluator.name}"


def _settings_label(evaluator: Evaluator, tag: str) -> str:
    """An evaluator's settings in words (`k=100, 1000 of 10000 images`) from a run's vaelab.eval.<name> tag."""
    try:
        return evaluator.words(json.loads(tag))
    except (ValueError, KeyError, TypeError):
        return "unknown settings"


def _settings_marks(table: pd.DataFrame, evaluator: Evaluator) -> list[str] | None:
    """Per row, the evaluator's settings to write beside its numbers, when rows differ in them; else None."""
    column = _settings_column(evaluator)
    if column not in table:
        return None
    labels = [tuple(x) for x in table[column]]
    if len(set(labels)) <= 1 and all(len(x) <= 1 for x in labels):
        return None
    return [" | ".join(x) if len(x) == 1 else ("mixed: " + "; ".join(x) if x else "") for x in labels]


def _sortable(values: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers if numbers.notna().all() else values.astype(str)


def _fmt(mean: float, std: float, metric: str) -> str:
    digits = 4 if metric.endswith("mse") else (1 if metric.startswith(("time/", "train/")) else 2)
    if np.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}")


def _fmt_param(value) -> str:
    """Optuna's floats (0.0026938830192854116) as 4 significant digits; the rest as logged."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if number.is_integer() or len(str(value)) <= 6 else f"{number:.4g}"


# Text from a spec, a param, a tag or the store reaches report.md only through these: markup in it is shown,
# never run, wherever the markdown is rendered (report.html, a code host, an editor's preview).
def _run_link(study: StudyRuns, run_id: str) -> str:
    link = run_link(study.ui_base, study.experiment_id, run_id)
    return f"[{md_cell(run_id[:8])}]({md_url(link)})"


# Two configurations differ beyond seed noise when Welch's t-test over their seeds gives p below this.
SIGNIFICANCE = 0.05


def rank_against_noise(table: pd.DataFrame, metric: str, better: str) -> tuple[int | None, list[int]]:
    """(position of the column's best row, positions of the rows that Welch's unequal-variance t-test over
    seeds cannot tell from it at p < SIGNIFICANCE: Welch 1947). The best is None when it cannot be judged:
    a row of one run has no spread to compare. A "best" with rows tied to it is no winner."""
    means = table[f"{metric} mean"].astype(float)
    if means.isna().all():
        return None, []
    best = int(np.nanargmin(means) if better == "min" else np.nanargmax(means))
    counted = f"{metric} n" if f"{metric} n" in table else "n"
    stds, counts = table[f"{metric} std"].astype(float), table[counted].astype(int)
    if counts.iloc[best] < 2:
        return None, []
    tied = []
    for position in range(len(table)):
        if position == best or np.isnan(means.iloc[position]):
            continue
        if counts.iloc[position] < 2:
            tied.append(position)  # one run: no spread to tell it from the best
            continue
        p = _welch_p(means.iloc[best], stds.iloc[best], counts.iloc[best], means.iloc[position], stds.iloc[position],
                     counts.iloc[position])
        if not p < SIGNIFICANCE:
            tied.append(position)
    return best, tied


def _welch_p(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int) -> float:
    from scipy.stats import ttest_ind_from_stats

    if std_a == 0 and std_b == 0:
        return 0.0 if mean_a != mean_b else 1.0
    return float(ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue)


def _table_metrics(table: pd.DataFrame) -> list[str]:
    return [c[: -len(" mean")] for c in table if c.endswith(" mean")]


def markdown_table(study: StudyRuns, table: pd.DataFrame, metrics: list[str] | None = None) -> str:
    """The table of one row per configuration, of `metrics` (default: all but those a report section of
    their own shows)."""
    if metrics is None:
        metrics = [m for m in _table_metrics(table) if _section(m) is None]
    shown = pd.DataFrame({md_cell(key): table[key].map(lambda v: "—" if pd.isna(v) else md_cell(_fmt_param(v)))
                          for key in study.swept})
    known = known_metrics()
    for metric in metrics:
        header, better = known.get(metric, (metric, None))
        cells = [_fmt(m, s, metric) for m, s in zip(table[f"{metric} mean"], table[f"{metric} std"], strict=True)]
        found = owner(metric)
        settled = found is not None and found[1].by_settings and found[1].key == metric
        marks = _settings_marks(table, found[0]) if found is not None and settled else None
        if better and len(table) > 1 and marks is None:  # numbers made with different settings are not ranked
            best, tied = rank_against_noise(table, metric, better)
            for position in [best, *tied] if tied and best is not None else []:  # the best and its ties
                cells[position] = f"{cells[position]} †"
            if best is not None and not tied:
                cells[best] = f"**{cells[best]}**"
        if marks is not None:  # labels from the runs' tags
            cells = [f"{cell} ({md_cell(mark)})" if mark else cell for cell, mark in zip(cells, marks, strict=True)]
        shown[md_cell(header)] = cells
    shown["n"] = table["n"]
    shown["runs"] = [" ".join(_run_link(study, r) for r in ids) for ids in table["run_ids"]]
    return shown.to_markdown(index=False, disable_numparse=True)


def _header(study: StudyRuns, description: str) -> list[str]:
    runs = study.runs
    counts = runs["outcome"].value_counts()
    done = runs[runs["end_time"].notna()]
    compute_s = float(((done["end_time"] - done["start_time"]) / 1000).sum())
    commits = sorted(set(runs.get("tags.vaelab.git_commit", pd.Series(dtype=str)).dropna()))
    name = study.name.replace("`", "'")  # a backtick would end the code span
    lines = [f"# Study `{name}`", ""]
    if description:
        lines += [md_text(description.strip()), ""]
    lines += [
        f"- generated: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} from the MLflow store (experiment "
        f"{md_text(study.experiment_id)})",
        f"- git commit(s): {md_text(', '.join(c[:10] for c in commits)) or 'unknown'}",
        "- runs: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("finished", "pruned", "failed", "running")),
        f"- total compute: {compute_s / 60:.1f} min of wall time over all runs",
        "- units: nats per image; **test −ELBO** is the negative ELBO (recon + KL at beta = 1), lower is better;"
        " mean ± std over seeds, n runs per row (copies of one identical run count once)",
        "- **bold** = best in its column and better than every other row beyond seed noise (Welch's t-test over "
        f"seeds, p < {SIGNIFICANCE:g}); † = the column's best and every row not distinguishable from it at that "
        "level (then no row is bold); rows of one run are not ranked",
    ]
    for evaluator in EVALUATORS.values():
        if not evaluator.title:
            continue
        tags = runs.get(_settings_tag(evaluator), pd.Series(dtype=str)).dropna()
        settings = sorted({_settings_label(evaluator, t) for t in tags})
        if len(settings) == 1:
            lines.append(f"- {evaluator.title}: {md_text(settings[0])}; `{evaluator.suffix_shape}` columns are "
                         "later `vaelab evaluate` runs with the settings their name says")
        elif settings:
            lines.append(f"- {evaluator.title}: runs used different settings, written beside each number; such "
                         "numbers are not ranked against each other")
    return lines


def _missing_note(study: StudyRuns) -> list[str]:
    expected = None
    if study.parent is not None and study.parent.get("params.search.total") is not None:
        expected = int(study.parent["params.search.total"])
    counted = int(study.runs["outcome"].isin(["finished", "pruned", "failed"]).sum())
    running = int((study.runs["outcome"] == "running").sum())
    if expected is not None and counted < expected:
        return ["", f"> **Partial study:** {counted} of {expected} runs are done"
                    f"{f', {running} running' if running else ''}; the tables below cover the finished ones."]
    return []


def _likelihood_note(study: StudyRuns) -> list[str]:
    column = "params.loss.likelihood"
    finished = study.runs[study.runs["outcome"] == "finished"]
    if column in finished and finished[column].nunique() > 1:
        return ["", "> **Mixed likelihoods:** ELBOs under different likelihoods are not comparable (a Gaussian "
                    "density is not a Bernoulli probability). Compare **test MSE (per pixel)** across likelihoods, "
                    "and ELBO/recon only within one likelihood."]
    return []


def build_report(study: StudyRuns, out_dir: Path, description: str = "",
                 best_images: dict[str, Path] | None = None, extra_sections: list[str] | None = None) -> Path:
    """Write report.md, table.csv and figures/ under `out_dir`; returns the report path."""
    table = aggregate(study)
    if table.empty:
        raise ReportError(f"study '{study.name}' has no finished runs yet ({len(study.runs)} runs in the store)")
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*figures_dir.glob("by_*.png"), *figures_dir.glob("disentanglement_by_*.png")]:
        stale.unlink()  # a parameter may no longer be swept
    settings_columns = [_settings_column(e) for e in EVALUATORS.values()]
    table.drop(columns=["run_ids", *settings_columns], errors="ignore").to_csv(out_dir / "table.csv", index=False)
    lines = _header(study, description) + _missing_note(study) + _left_out_note(study) + _copies_note(study)
    lines += ["", "## Results", *_likelihood_note(study), "", markdown_table(study, table), "",
              "Raw numbers: [table.csv](table.csv)."]
    for evaluator in EVALUATORS.values():  # the evaluators whose metrics have a section of their own
        shown = [m for m in _table_metrics(table) if evaluator.section is not None and _section(m) is evaluator]
        if shown and evaluator.section is not None:
            lines += ["", f"## {evaluator.section.heading}", "", evaluator.section.text, "",
                      markdown_table(study, table, shown)]
    finished = _finished(study)
    for key in study.swept:  # a swept key no finished run uses yet has no column in the store
        if f"params.{key}" not in finished:
            finished[f"params.{key}"] = np.nan
    is_grid = study.parent is None or study.parent.get("params.search.kind") == "grid"
    # Per-parameter curves need repeated values (a grid); an Optuna search gets Optuna's own plots.
    if is_grid and "loss.objective" in study.swept:
        # Objectives are swept over strengths of their own (beta, factor_gamma, dip_lambda_od): each is
        # drawn against its own strength, the ELBO terms and the disentanglement scores alike.
        figures = report_figures.by_objective(finished, figures_dir, report_figures.PANELS, "by_objective")
        figures += report_figures.by_objective(finished, figures_dir)
    elif is_grid:
        figures = report_figures.swept_param_figures(finished, study.swept, figures_dir)
        figures += report_figures.swept_param_figures(finished, study.swept, figures_dir, report_figures.DIS_PANELS,
                                                      "disentanglement_by")
    else:
        figures = []
    figures += report_figures.rate_distortion(finished, study.swept, figures_dir)
    if figures:
        lines += ["", "## Figures", ""]
        lines += [_figure(path) for path in figures]
    lines += extra_sections or []
    if best_images:
        lines += ["", "## Best run"]
        for label, path in best_images.items():  # the label says which run, chosen by what
            lines += ["", f"{label}:", "", _figure(path)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _figure(path: Path) -> str:
    """A figure's markdown; its name may hold a swept key from the store."""
    alt = re.sub(r"[^\w.-]", "_", path.stem)
    return f"![{alt}](figures/{md_url(path.name)})"


def _best_run(study: StudyRuns) -> tuple[pd.Series, str]:
    """The finished run the sweep's own metric ranks first, and the reason in words."""
    finished = _finished(study)
    metric, direction = "test/elbo", "minimize"
    if study.parent is not None and study.parent.get("params.search.metric"):
        metric, direction = f"best/{study.parent['params.search.metric']}", study.parent["params.search.direction"]
    if f"metrics.{metric}" not in finished:
        metric, direction = "test/elbo", "minimize"
    values = finished[f"metrics.{metric}"].astype(float)
    row = finished.loc[values.idxmin() if direction == "minimize" else values.idxmax()]
    word = "lowest" if direction == "minimize" else "highest"
    return row, f"the {word} {metric} ({float(row[f'metrics.{metric}']):.2f}) of {len(finished)} finished runs"


def _most_disentangled(study: StudyRuns) -> tuple[pd.Series, str] | None:
    """The finished run with the highest MIG, when runs were scored against ground-truth factors."""
    finished = _finished(study)
    column = f"metrics.{DIS_PREFIX}mig"
    if column not in finished or finished[column].isna().all():
        return None
    row = finished.loc[finished[column].astype(float).idxmax()]
    return row, f"the highest {DIS_PREFIX}mig ({float(row[column]):.3f}) of {len(finished)} finished runs"


def write_study_report(spec, tracker, out_dir: Path, optuna_figures=None) -> Path:
    """The report of `spec`'s experiment in `tracker`'s store, written under out_dir.
    `optuna_figures(folder) -> (markdown lines)` adds the Optuna study's own plots."""
    none = ReportError(f"no runs of '{spec.name}' in {tracker.shown_uri}; run `make sweep EXP={spec.name}` first")
    if not tracker.exists:  # reading makes no store
        raise none
    experiment_id, frame = tracker.runs_table(spec.name)
    if frame is None or frame.empty:
        raise none
    study = replace(select_runs(spec.name, experiment_id, frame), ui_base=ui_base_for(tracker.uri))
    if not (study.runs["outcome"] == "finished").any():
        raise ReportError(f"study '{spec.name}' has no finished runs yet ({len(study.runs)} runs in the store)")
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    best, criterion = _best_run(study)
    images = {}
    wanted = [(best, criterion, name) for name in ("reconstructions", "samples")]
    disentangled = _most_disentangled(study)
    if disentangled is not None:
        wanted += [(disentangled[0], disentangled[1], name) for name in ("factor_mi", "factor_traversals")]
    for row, why, name in wanted:
        fetched = tracker.fetch_artifact(row["run_id"], f"figures/{name}.png", figures_dir / ".best")
        if fetched is not None:
            target = figures_dir / f"best_{name}.png"
            fetched.replace(target)
            images[f"{name.replace('_', ' ')} of run {_run_link(study, row['run_id'])}, {md_text(why)}"] = target
    extra = optuna_figures(figures_dir) if optuna_figures else []
    path = build_report(study, out_dir, spec.description, images, extra)
    if study.parent is not None:
        publish_on_parent(tracker, study, out_dir, best, criterion)
    return path


# The metrics of the winning run copied onto the sweep's parent run, under this prefix.
PARENT_BEST_PREFIX = "best_run/"


def publish_on_parent(tracker, study: StudyRuns, out_dir: Path, best: pd.Series, criterion: str) -> None:
    """The sweep's parent run carries its outcome: the report (markdown, table, figures) as artifacts under
    report/, the best run's test metrics as best_run/<metric>, and tags and a note naming that run, its
    values and why it won; so the MLflow UI alone answers "which configuration won"."""
    assert study.parent is not None
    parent_id = str(study.parent["run_id"])
    values = ", ".join(f"{k}={_fmt_param(best.get(f'params.{k}'))}" for k in study.swept
                       if not pd.isna(best.get(f"params.{k}")))
    seed = best.get("params.train.seed")
    label = values + (f", seed={seed}" if seed is not None and not pd.isna(seed) else "")
    metrics = {f"{PARENT_BEST_PREFIX}{c[len('metrics.'):]}": float(best[c]) for c in best.index
               if c.startswith("metrics.test/") and not c.startswith("metrics.test/kl_dim/") and not pd.isna(best[c])}
    parent = tracker.attach(parent_id)
    parent.log_metrics(metrics)
    before = str(study.parent.get("tags.mlflow.note.content") or "").split("\n\nBest run:")[0]
    note = (f"{before}\n\nBest run: {md_text(label or best['run_id'])} ({_run_link(study, str(best['run_id']))}), "
            f"{criterion}. The report is in this run's report/ artifacts (report.md, table.csv, figures/).").strip()
    parent.set_tags({"vaelab.best_run": best["run_id"], "vaelab.best_config": label, "mlflow.note.content": note})
    for name in ("report.md", "table.csv"):
        if (out_dir / name).is_file():
            parent.log_artifact(out_dir / name, "report")
    parent.log_artifacts(out_dir / "figures", "report/figures")
