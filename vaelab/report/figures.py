"""The report's figures: each swept parameter against the test metrics (with the
spread over seeds), and the rate-distortion plane with its Pareto front."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PANELS = (("test/elbo", "test −ELBO (nats)"), ("test/recon", "test recon (nats)"), ("test/kl", "test KL (nats)"))
# Disentanglement scores (runs on data with ground-truth factors), one figure of their own per swept key.
DIS_PANELS = (("test/dis/beta_vae", "BetaVAE score"), ("test/dis/factor_vae", "FactorVAE score"),
              ("test/dis/mig", "MIG"), ("test/dis/sap", "SAP"), ("test/dis/dci_disentanglement", "DCI disentanglement"),
              ("test/dis/modularity", "modularity"))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(value) -> str:
    """A swept key or value as figure text, drawn as written: a `$` is no mathtext (whose parse errors would
    stop the report), and no control character (matplotlib's missing-glyph warning prints it to the terminal)."""
    return _CONTROL.sub(" ", str(value)).replace("$", r"\$")


def _file_part(key: str) -> str:
    """A swept key in a figure's file name: `loss.beta` -> `loss_beta`; nothing that leaves the folder."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _numeric(values: pd.Series) -> pd.Series | None:
    converted = pd.to_numeric(values, errors="coerce")
    return None if converted.isna().any() else converted


def _compact(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if len(str(value)) <= 6 else f"{number:.3g}"


def _short(key: str) -> str:
    return _text(key.rsplit(".", 1)[-1])


def swept_param_figures(runs: pd.DataFrame, swept: list[str], folder: Path,
                        panel_set: tuple[tuple[str, str], ...] = PANELS, prefix: str = "by") -> list[Path]:
    """One figure per swept parameter: mean ± std over seeds of each test metric of `panel_set`,
    a line per combination of the other swept parameters, seeds as dots."""
    paths: list[Path] = []
    panels = [(m, label) for m, label in panel_set if f"metrics.{m}" in runs]
    if not panels or runs.empty:
        return paths
    for key in swept:
        column = f"params.{key}"
        others = [f"params.{k}" for k in swept if k != key]
        numeric = _numeric(runs[column])
        positions = numeric if numeric is not None else runs[column].astype("category").cat.codes
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
        groups = runs.groupby(others, dropna=False) if others else [((), runs)]
        for label, part in groups:
            name = ", ".join(f"{_short(k[7:])}={_text(v)}" for k, v in zip(others, np.atleast_1d(label), strict=False))
            x = positions.loc[part.index]
            for ax, (metric, _) in zip(axes[0], panels, strict=True):
                y = part[f"metrics.{metric}"].astype(float)
                stats = y.groupby(x).agg(["mean", "std"]).sort_index()
                line = ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                                   capsize=3, label=name or None)
                ax.scatter(x, y, s=10, alpha=0.4, color=line[0].get_color())
        for ax, (_, ylabel) in zip(axes[0], panels, strict=True):
            ax.set_xlabel(_text(key))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if numeric is not None and numeric.min() > 0 and numeric.max() / numeric.min() >= 10:
                ax.set_xscale("log")
                ax.minorticks_off()  # label the swept values themselves, not powers of ten
                ax.set_xticks(sorted(numeric.unique()), [f"{v:g}" for v in sorted(numeric.unique())])
            if numeric is None:
                categories = runs[column].astype("category").cat.categories
                ax.set_xticks(range(len(categories)), [_text(c) for c in categories])
        if others:
            axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{_text(key)}: mean ± std over seeds (dots: single runs)")
        fig.tight_layout()
        path = folder / f"{prefix}_{_file_part(key)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def pareto_front(rate: np.ndarray, distortion: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both rate and distortion, by rate."""
    order = np.lexsort((distortion, rate))
    front, best = [], np.inf
    for i in order:
        if distortion[i] < best:
            front.append(i)
            best = distortion[i]
    return np.array(front, dtype=int)


def rate_distortion(runs: pd.DataFrame, swept: list[str], folder: Path) -> list[Path]:
    if runs.empty or "metrics.test/kl" not in runs or "metrics.test/recon" not in runs:
        return []
    rate = runs["metrics.test/kl"].astype(float).to_numpy()
    distortion = runs["metrics.test/recon"].astype(float).to_numpy()
    labels = [", ".join(f"{_short(k)}={_text(_compact(row[f'params.{k}']))}" for k in swept
                        if not pd.isna(row.get(f"params.{k}"))) for _, row in runs.iterrows()]
    front = pareto_front(rate, distortion)
    fig, ax = plt.subplots(figsize=(10, 7))
    ax.scatter(rate, distortion, s=18, color="tab:blue", label="runs")
    ax.step(rate[front], distortion[front], where="post", color="tab:red", label="Pareto front")
    for x, y, text in zip(rate, distortion, labels, strict=True):
        ax.annotate(text, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("rate: test KL (nats)")
    ax.set_ylabel("distortion: test recon (nats)")
    ax.set_title("rate–distortion (every finished run)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder / "rate_distortion.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def by_objective(runs: pd.DataFrame, folder: Path, panel_set: tuple[tuple[str, str], ...] = DIS_PANELS,
                 name: str = "disentanglement_by_objective") -> list[Path]:
    """A row per objective (loss.objective), a column per metric: the metric against that objective's own
    strength key (beta, factor_gamma, dip_lambda_od, ...: each Objective record's `strength`), mean ± std over
    seeds, seeds as dots; rows named by the records' labels. Columns share their y axis, so objectives compare
    at a glance."""
    from vaelab.objectives import OBJECTIVES

    panels = [(m, label) for m, label in panel_set if f"metrics.{m}" in runs and runs[f"metrics.{m}"].notna().any()]
    if not panels or runs.empty or "params.loss.objective" not in runs:
        return []
    objectives = [o for name, o in OBJECTIVES.items() if (runs["params.loss.objective"] == name).any()]
    fig, axes = plt.subplots(len(objectives), len(panels), figsize=(3.3 * len(panels), 2.6 * len(objectives)),
                             squeeze=False, sharey="col")
    for row, objective in enumerate(objectives):
        part = runs[runs["params.loss.objective"] == objective.name]
        key = objective.strength
        strength = _numeric(part.get(f"params.{key}", pd.Series(index=part.index, dtype=float)))
        for col, (metric, label) in enumerate(panels):
            ax = axes[row][col]
            y = part[f"metrics.{metric}"].astype(float)
            if strength is None:  # the strength key was not logged: one point per objective
                ax.errorbar([0], [y.mean()], yerr=[y.std() if len(y) > 1 else 0], marker="o", capsize=3)
            else:
                stats = y.groupby(strength).agg(["mean", "std"]).sort_index()
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3)
                ax.scatter(strength, y, s=10, alpha=0.4)
                values = sorted(strength.unique())
                if values and min(values) > 0 and max(values) / min(values) >= 10:
                    ax.set_xscale("log")
                    ax.minorticks_off()
                ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.grid(alpha=0.3)
            ax.set_xlabel(key if strength is not None else "")
            if row == 0:
                ax.set_title(label)
        axes[row][0].set_ylabel(objective.label, fontsize=11)
    fig.suptitle("against each objective's own strength: mean ± std over seeds (dots: single runs)")
    fig.tight_layout()
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
