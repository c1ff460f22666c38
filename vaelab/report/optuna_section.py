"""The Optuna part of an Optuna search's report: the best trials, the optimisation
history and the parameter importances (Optuna's matplotlib plots). Reads only."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vaelab.report.escape import md_cell, md_text
from vaelab.search import OptunaSearch

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from vaelab.spec import Spec
from vaelab.sweeps.storage import STUDIES_DIR, open_storage, study_dir


def optuna_report_section(spec: Spec, storage_url: str | None, folder: Path,
                          studies_root: Path = STUDIES_DIR) -> list[str]:
    """Markdown lines for `spec`'s Optuna study; plots are written into `folder` (the
    report's figures/). [] for a grid."""
    if not isinstance(spec.search, OptunaSearch):
        return []
    journal = study_dir(spec.name, studies_root) / "optuna.journal"
    if not (storage_url or spec.search.storage) and not journal.exists():
        return ["", "## Optuna study", "", f"(no Optuna storage found at {journal})"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import pandas as pd
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    study = optuna.load_study(study_name=spec.name, storage=open_storage(spec, storage_url, studies_root))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    lines = ["", "## Optuna study", ""]
    if not complete:
        return lines + ["No complete trials yet."]
    reverse = spec.search.direction == "maximize"
    value = {t.number: float(t.value) for t in complete if t.value is not None}  # complete trials have one
    best = sorted(complete, key=lambda t: value[t.number], reverse=reverse)[:5]

    rows = [{"trial": t.number, md_cell(spec.search.metric): round(value[t.number], 4),
             **{md_cell(k): md_cell(v) if isinstance(v, str) else v for k, v in t.params.items()}} for t in best]
    lines += [f"Best trials by {md_text(spec.search.metric)} ({spec.search.direction}):", "",
              pd.DataFrame(rows).to_markdown(index=False), ""]
    plots: list[tuple[str, Callable[..., Any]]] = [
        ("optuna_history.png", optuna_plots.plot_optimization_history)]
    if len(complete) >= 2 and len(spec.search.params) >= 2:
        plots.append(("optuna_importances.png", optuna_plots.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:
                lines.append(f"({name}: {md_text(err)})")
                continue
        figure = cast("Figure", axes.figure if hasattr(axes, "figure") else axes.flat[0].figure)
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        lines.append(f"![{name[:-4]}](figures/{name})")
    return lines
