"""vaelab: tracked variational autoencoder experiments from YAML specs.

`vaelab.load(target)` gives a trained model to encode, decode, sample and reconstruct with
(`vaelab.loaded.LoadedModel`). It imports torch only when called: `import vaelab` stays light."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vaelab.loaded import LoadedModel

__version__ = "0.1.0"


def load(target: str | Path, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """A trained model: `target` is a checkpoint folder, a `models:/NAME/VERSION` or `models:/MODEL_ID` URI,
    a `runs:/RUN_ID` URI or a bare MLflow run id (in `tracking_uri`, default $MLFLOW_TRACKING_URI or
    runs/mlflow.db). `.encode(images)` -> (mu, logvar), `.decode(z)`, `.sample(n, label=None)`,
    `.reconstruct(images)`, `.run_spec`, `.classes`; see `vaelab.loaded`."""
    from vaelab.loaded import load as load_model

    return load_model(target, tracking_uri=tracking_uri, device=device)
