"""`vaelab completion bash`: the script is sourced into a real bash, and its completion function is
asked what a user's Tab would get."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _script() -> str:
    out = subprocess.run([sys.executable, "-m", "vaelab", "completion", "bash"], capture_output=True, text=True,
                         check=True)
    return out.stdout


def _complete(script: str, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY for the command line `words` (the last one being completed), in `cwd`."""
    (cwd / "completion.sh").write_text(script)
    line = " ".join(f"'{w}'" for w in words)
    program = (f"source completion.sh; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _vaelab_complete; "
               "printf '%s\\n' \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True, cwd=cwd)
    return [w for w in out.stdout.splitlines() if w]


def test_commands_spec_names_options_and_set_keys_complete(tmp_path: Path):
    script = _script()
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "beta_study.yaml").write_text("name: beta_study\n")
    (tmp_path / "experiments" / "baseline.yml").write_text("name: baseline\n")

    assert {"train", "sweep", "evaluate", "report", "completion"} <= set(_complete(script, ["vaelab", ""], tmp_path))
    assert _complete(script, ["vaelab", "sw"], tmp_path) == ["sweep"]
    # spec names in ./experiments, found when Tab is pressed
    assert "beta_study" in _complete(script, ["vaelab", "train", "be"], tmp_path)
    assert "baseline" in _complete(script, ["vaelab", "sweep", "ba"], tmp_path)
    # each command's own options
    assert "--dry-run" in _complete(script, ["vaelab", "train", "--d"], tmp_path)
    assert "--workers" in _complete(script, ["vaelab", "sweep", "--w"], tmp_path)
    assert "--workers" not in _complete(script, ["vaelab", "train", "--w"], tmp_path)
    # --set takes dotted keys, with '='
    keys = _complete(script, ["vaelab", "train", "beta_study", "--set", "model.z"], tmp_path)
    assert "model.z_dim=" in keys
    assert all(k.startswith("model.z") and k.endswith("=") for k in keys)
    assert "loss.beta=" in _complete(script, ["vaelab", "train", "x", "--set", "loss.be"], tmp_path)


def test_an_unknown_shell_is_named_with_exit_2():
    out = subprocess.run([sys.executable, "-m", "vaelab", "completion", "fish"], capture_output=True, text=True)
    assert out.returncode == 2 and not out.stdout
    assert "invalid choice: 'fish'" in out.stderr.strip().splitlines()[-1]
