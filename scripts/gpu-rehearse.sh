#!/usr/bin/env bash
# Rehearse scripts/gpu-check.sh on this CPU machine before a GPU machine sees it: the same steps, the
# same paths, at tiny sizes (TINY=1) on the CPU, in a Python that has only what the GPU image has plus
# the wheels of .wheelhouse. The GPU image runs Python 3.12 and .wheelhouse holds 3.12 wheels, so the
# rehearsal downloads the same names and versions for this Python, and stands in for the image with
# links to this .venv's copies of the image's packages (IMAGE_PACKAGES below: the GPU image's list,
# of which the .venv has most): a package vaelab needs that is neither on the image nor carried fails here.
# Usage: bash scripts/gpu-rehearse.sh    (after ../shared/gpu/make-wheelhouse.sh and .gpu-data/ are made)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
REH=${REH:-/tmp/vaelab-gpu-rehearse}
VENV_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio interface-meta iniconfig jax jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numpy numpyro nvidia-ml-py onnx opencv-python-headless optax opt-einsum
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchvision tqdm transformers triton typer typing-extensions typing-inspect urllib3 werkzeug wheel
wrapt xarray xxhash yarl zipp"

rm -rf "$REH" && mkdir -p "$REH/image-site"
# The same wheels as .wheelhouse, for this Python.
ls .wheelhouse/*.whl >/dev/null
for w in .wheelhouse/*.whl; do basename "$w" | sed -E 's/^([A-Za-z0-9_.]+)-([0-9][^-]*)-.*/\1==\2/'; done \
  >"$REH/requirements.txt"
.venv/bin/pip download -q --no-deps --only-binary=:all: -d "$REH/wheels" -r "$REH/requirements.txt"
# The image's packages: links to this .venv's copies (top-level names from each RECORD).
.venv/bin/python - "$VENV_SITE" "$REH/image-site" "$IMAGE_PACKAGES" <<'EOF'
import re, sys
from pathlib import Path

site, out, names = Path(sys.argv[1]), Path(sys.argv[2]), {n.lower() for n in sys.argv[3].split()}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
linked = 0
for info in site.glob("*.dist-info"):
    name = re.search(r"^Name: (.+)$", (info / "METADATA").read_text(errors="replace"), re.M).group(1)
    if norm(name.strip()) not in names:
        continue
    linked += 1
    tops = {line.split(",")[0].split("/")[0] for line in (info / "RECORD").read_text().splitlines()}
    for top in tops - {"", ".."} - {t for t in tops if t.startswith("..")}:
        if (site / top).exists() and not (out / top).exists():
            (out / top).symlink_to(site / top)
print(f"{linked} of the image's packages linked from {site}")
EOF
# A Python with nothing installed: the image's packages come through PYTHONPATH, after the carried ones.
"$(readlink -f .venv/bin/python)" -m venv "$REH/venv"
PY="$REH/venv/bin/python" PYTHONPATH="$REH/image-site" DEVICE=cpu TINY=1 WHEELHOUSE="$REH/wheels" \
  DATA="${DATA:-.gpu-data/fashion-mnist}" OUT="$REH/out" DEADLINE_S="${DEADLINE_S:-900}" bash scripts/gpu-check.sh
ls -la "$REH/out"
