"""``miclip-nb``: every field settable, help that lists them, one-line errors, a written table."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pandas as pd
import pytest
import torch

from miclip_nb import cli, pipeline


def test_help_lists_every_configuration_field():
    out = subprocess.run([sys.executable, "-m", "miclip_nb.cli", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for f in fields(pipeline.PipelineConfig):
        assert f"  {f.name} " in out.stdout, f.name
    assert "weights_path" in out.stdout and "[default: required]" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--set", "model=no_such_model", "--set", "train_data=x", "--set", "eval_data=x"], "unknown model 'no_such_model'"),
    (["run", "--set", "methods=[miclip,lime]", "--set", "model=m", "--set", "train_data=x"], "unknown method 'lime'"),
    (["run", "--set", "train_data=x"], "needs model="),
    (["run", "--set", "colour=red"], "unknown config keys: ['colour']"),
    (["run", "--set", "model=timm:resnet18", "--set", "weights_path=/nowhere/r18.safetensors", "--set", "train_data=x",
      "--set", "eval_data=x"],
     "/nowhere/r18.safetensors"),
    (["run", "--profile", "nope"], "no profile named 'nope'"),
])
def test_a_users_error_is_one_line_without_a_traceback(args, message):
    out = subprocess.run([sys.executable, "-m", "miclip_nb.cli", *args], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_weights_path_reaches_the_model(tmp_path, capsys):
    """--set weights_path=... is a field (it was refused as an unknown key): a file of other weights
    than the architecture's is reported as a mismatch, which shows the file was read."""
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    code = cli.main(["run", "--set", "model=timm:resnet18", "--set", f"weights_path={tmp_path / 'wrong.pth'}",
                     "--set", "train_data=x", "--set", "eval_data=x", "--set", "clip=toyclip"])
    assert code == 2 and "missing" in capsys.readouterr().err


def test_listing_commands(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "netdissect" in out and "units: neuron " in out and "units: neuron, sae" in out
    assert cli.main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "real " in out and "toy " in out


def test_run_writes_csv_and_markdown_one_row_per_method(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--quiet", "--profile", "toy", "--set", "train_data=shapes:train:240", "--set", "eval_data=shapes:test:60",
            "--set", "seeds=[0,1]", "--set", "n_random=2", "--set", "methods=[miclip,act_values,random]",
            "--set", "n_other=16", "--set", "align.epochs=2", "--set", f"out_dir={out}"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "delta_md:" in printed and "[specific" in printed
    table = pd.read_csv(out / "delta_accuracy.csv", index_col="method")
    assert list(table.index) == ["MiClip", "Act-Values", "Random"]
    assert {"enhance_mean", "enhance_std", "enhance_wrong", "remove_mean", "remove_specific", "n"} <= set(table.columns)
    assert table.loc["MiClip", "n"] == 2 and table.loc["Random", "n"] == 2
    md = (out / "delta_accuracy.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["MiClip", "Act-Values", "Random"]
    long = pd.read_csv(out / "delta_accuracy_long.csv")
    assert len(long) == (2 + 2 + 2) * 2
    loc = pd.read_csv(out / "localization.csv")
    assert {"class", "seed", "rank", "unit", "scoring", "score", "cosine"} <= set(loc.columns)
    assert set(loc["scoring"]) == {"posterior"} and (loc["score"] <= 0).all()  # log-probabilities
    assert (loc.groupby(["class", "seed"])["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
