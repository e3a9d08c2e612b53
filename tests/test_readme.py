"""The README's Python API block runs as written on real photos (tests/conftest.py's imagenet-sample
folder), with one substitution: the real CLIP download becomes a random-weight open_clip model of
the same API (the tests have no network), so the figures it prints are meaningless; that it runs
from a weights file and a folder of unlabelled photos to a table is what is checked."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torchvision

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_block_runs_on_your_own_model_and_photos(imagenet_sample_dir, tiny_clip_name, tmp_path, capsys):
    code = _api_block()
    download = 'embed.load_clip("ViT-B-16", "openai")'
    assert download in code and "weights_path=" in code and "intervention_table" in code
    files = sorted(imagenet_sample_dir.glob("*.jpg"))
    (tmp_path / "my_photos").mkdir()
    for i, f in enumerate(files[:12]):  # unlabelled: plain names, no class folders
        shutil.copy(f, tmp_path / "my_photos" / f"photo_{i:02d}.jpg")
    (tmp_path / "my_labelled_photos").mkdir()
    for f in files[12:18]:  # the sample layout: labels from the file names
        shutil.copy(f, tmp_path / "my_labelled_photos" / f.name)
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mobilenet_v2.pth")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code.replace(download, f'embed.load_clip("{tiny_clip_name}", None)'), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "| MiClip |" in printed and "| Random |" in printed and "[specific" in printed
