"""The install files agree with each other, and the scripts a newcomer runs are sound."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def normalized(requirement: str) -> tuple:
    req = Requirement(requirement)
    return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)), str(req.marker or "")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pip_section(environment: dict) -> list[str]:
    sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip: section"
    return sections[0]


def test_environment_yml_is_a_conda_environment(environment):
    assert environment["name"] == "miclip-nb"
    assert environment["channels"]
    conda_deps = [d for d in environment["dependencies"] if isinstance(d, str)]
    assert "pip" in conda_deps
    assert any(re.fullmatch(r"python(=|>=)3\.\d+", d) for d in conda_deps)


def test_environment_pip_section_matches_pyproject(pyproject, environment):
    in_pyproject = sorted(normalized(r) for r in pyproject["project"]["dependencies"])
    in_environment = sorted(normalized(r) for r in pip_section(environment))
    missing = set(in_pyproject) - set(in_environment)
    extra = set(in_environment) - set(in_pyproject)
    assert not missing and not extra, f"environment.yml lacks {sorted(missing)}; has extra {sorted(extra)}"
    assert len(in_environment) == len(set(in_environment)), "duplicate entries in environment.yml"


def test_environment_python_satisfies_requires_python(pyproject, environment):
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python"))
    version = re.split(r"=|>=", python)[-1]
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(version + ".0")


def test_pyproject_declares_what_the_issue_asks_for(pyproject):
    names = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    for needed in ["torch", "torchvision", "open-clip-torch", "timm", "captum", "ipywidgets", "jupyterlab",
                   "seaborn", "matplotlib", "tqdm", "safetensors"]:
        assert needed in names, needed
    dev = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "nbval"} <= dev


def test_installed_package_is_this_checkout():
    import miclip_nb

    assert Path(miclip_nb.__file__).resolve().parent == ROOT / "miclip_nb"
    from importlib.metadata import version

    assert version("miclip-nb") == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("script", ["run.sh", ".ci/run"])
def test_scripts_parse(script):
    path = ROOT / script
    assert path.is_file()
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.X_OK), ".ci/run must be executable"
    assert "set -euo pipefail" in ci
    command = "bash run.sh test"
    assert re.search(rf"^\s*(exec\s+)?{re.escape(command)}\s*$", ci, re.M), f".ci/run must call `{command}`"
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    assert command in readme.read_text(), f"the README's Quick start must give `{command}`"


def test_run_sh_rejects_unknown_commands_before_installing():
    result = subprocess.run(["bash", str(ROOT / "run.sh"), "bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "walkthrough" in result.stderr and "test" in result.stderr


def test_default_suite_is_found_from_the_repository_root(pyproject):
    """`python -m pytest` at the root collects tests/ (pytest's exit code 5 would mean none) and
    leaves slow tests out."""
    options = pyproject["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert "not slow" in options["addopts"]
    assert len(list((ROOT / "tests").glob("test_*.py"))) >= 5
