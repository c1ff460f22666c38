"""A mistyped key, in `--set` or in the YAML file, gets "did you mean"; a list given without
brackets gets the form that works (quoted for the shell on the command line). Each is one line,
exit code 2 through the CLI."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from vaelab.cli import main
from vaelab.errors import SpecError
from vaelab.spec import apply_overrides, load_spec, parse_spec


def spec_file(tmp_path: Path, base: dict) -> Path:
    path = tmp_path / "hints.yaml"
    path.write_text(yaml.safe_dump({"name": "hints", "base": base}))
    return path


@pytest.mark.parametrize(("item", "meant"), [
    ("train.epoch=3", "train.epochs"), ("trian.epochs=3", "train.epochs"), ("model.zdim=4", "model.z_dim"),
    ("loss.bta=2", "loss.beta"), ("train.batchsize=64", "train.batch_size"),
])
def test_a_mistyped_set_path_gets_did_you_mean(tmp_path: Path, item: str, meant: str):
    spec = load_spec(spec_file(tmp_path, {}))
    with pytest.raises(SpecError) as err:
        apply_overrides(spec, [item])
    assert f"did you mean {meant}?" in str(err.value) and "\n" not in str(err.value)


def test_a_path_like_nothing_gets_no_guess(tmp_path: Path):
    with pytest.raises(SpecError) as err:
        apply_overrides(load_spec(spec_file(tmp_path, {})), ["foo.bar=1"])
    assert "did you mean" not in str(err.value) and "vaelab keys" in str(err.value)


@pytest.mark.parametrize(("item", "right"), [
    ("model.hidden=512,256", "--set 'model.hidden=[512,256]'"),
    ("model.hidden=512", "--set 'model.hidden=[512]'"),
    ("model.channels=32,64", "--set 'model.channels=[32,64]'"),
])
def test_a_list_without_brackets_on_the_command_line_gets_the_quoted_form(tmp_path: Path, item: str, right: str):
    with pytest.raises(SpecError) as err:
        apply_overrides(load_spec(spec_file(tmp_path, {})), [item])
    assert right in str(err.value)
    assert str(err.value).startswith(f"--set {item.split('=')[0]}: expected a list")


def test_the_right_list_form_works(tmp_path: Path):
    spec = apply_overrides(load_spec(spec_file(tmp_path, {})), ["model.hidden=[512,256]", "model.channels=[32]"])
    assert spec.base.model.hidden == (512, 256) and spec.base.model.channels == (32,)


@pytest.mark.parametrize(("base", "said"), [
    ({"train": {"epoch": 3}}, "base.train.epoch: unknown key; allowed: "),
    ({"trian": {"epochs": 3}}, "base.trian: unknown section; allowed: "),
    ({"model": {"hiden": [64]}}, "base.model.hiden: unknown key; allowed: "),
])
def test_a_mistyped_key_in_the_file_gets_did_you_mean(tmp_path: Path, base: dict, said: str):
    with pytest.raises(SpecError) as err:
        load_spec(spec_file(tmp_path, base))
    meant = {"epoch": "epochs", "trian": "train", "hiden": "hidden"}
    wrong = next(k for section in [base, *base.values()] for k in section if k in meant)
    assert str(err.value).startswith(said) and str(err.value).endswith(f"; did you mean {meant[wrong]}?")


def test_a_list_without_brackets_in_the_file_gets_the_bracketed_form():
    raw = yaml.safe_load("name: hints\nbase:\n  model:\n    hidden: 512,256\n")
    with pytest.raises(SpecError, match=r"base\.model\.hidden: .*a list is written in brackets: \[512,256\]$"):
        parse_spec(raw)


def test_the_cli_says_it_in_one_line_with_exit_code_2(tmp_path: Path, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() installs its own
    try:
        code = main(["train", str(spec_file(tmp_path, {})), "--set", "train.epoch=3", "--dry-run"])
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean train.epochs?" in err
