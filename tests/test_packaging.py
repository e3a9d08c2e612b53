"""The install files agree with each other, and the scripts a newcomer runs are sound."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which requires-python allows: the same parser from PyPI (the dev extra installs it)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

#: Public modules (miclip_nb/<name>.py) without a tests/test_<name>.py, with the test files that
#: exercise them instead, each with a string the file must contain (so an entry cannot silently
#: outlive the tests it points to).
TESTED_ELSEWHERE: dict[str, dict[str, str]] = {
    # the selectors, inside the delta-accuracy harness and the method registry
    "select": {"test_steer.py": "from miclip_nb.select import", "test_methods.py": "from miclip_nb.select import",
               "test_miclip_toy.py": "MiClipSelector("},
    # auroc / best_unit_auroc only through their callers (no test of ties or errors of their own)
    "metrics": {"test_toy_models.py": "concept_unit_aurocs(", "test_groundtruth.py": "topunit_aurocs("},
    # the Shapes world's generator (miclip_nb/shapes/world.py)
    "world": {"test_shapes.py": "render(CFG"},
    # the Shapes world as a NetDissect probe
    "probes": {"test_baselines.py": "shapes.ShapesMaskProbe(", "test_groundtruth.py": "ShapesMaskProbe("},
    # the Shapes world's registrations, through the names it registers
    "plugin": {"test_plugins.py": "toy_cnn"},
    # the Shapes world's toy profile
    "profile": {"test_profiles.py": 'profiles.get("toy")'},
    # image grids and histograms through the panels' PNGs; the other plots only in the browser
    # suite (-m browser, outside the default run), which executes every notebook
    "viz": {"test_widgets.py": "unit_inspector_panel(", "test_browser.py": "viz.intervention_panels("},
}
#: Public modules that no test runs at all: gaps, listed so that they stay visible.
UNTESTED: dict[str, str] = {
    "train": "one command that runs toy_models.main and toyclip.main with the shipped budgets (about 35 minutes)",
}


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


def test_dev_extra_brings_a_toml_parser_where_python_lacks_one(pyproject):
    """This file parses pyproject.toml with tomllib, which Python 3.10 (allowed by requires-python) lacks."""
    dev = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["dev"]]
    tomli = [r for r in dev if canonicalize_name(r.name) == "tomli"]
    assert len(tomli) == 1, "the dev extra needs tomli for Python < 3.11"
    assert tomli[0].marker is not None
    assert tomli[0].marker.evaluate({"python_version": "3.10"}) and not tomli[0].marker.evaluate({"python_version": "3.11"})
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains("3.10.0")


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
    assert command in readme.read_text(), f"the README's Quick start must give `{command}`"


def test_run_sh_rejects_unknown_commands_before_installing():
    result = subprocess.run(["bash", str(ROOT / "run.sh"), "bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "walkthrough" in result.stderr and "test" in result.stderr


def test_default_suite_is_found_from_the_repository_root(pyproject):
    """`python -m pytest` at the root collects tests/ and leaves slow tests out."""
    options = pyproject["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert "not slow" in options["addopts"]


def test_every_public_module_has_its_tests():
    """tests/test_<name>.py for every miclip_nb/<name>.py or miclip_nb/<subpackage>/<name>.py not
    starting with "_", or an entry in
    TESTED_ELSEWHERE (whose files must exist and still use the module) or UNTESTED; an entry for a
    module that has gained its own test file, or no longer exists, must go."""
    public = {p.stem for p in (ROOT / "miclip_nb").rglob("*.py") if not p.stem.startswith("_")}
    without = {name for name in public if not (ROOT / "tests" / f"test_{name}.py").is_file()}
    listed = set(TESTED_ELSEWHERE) | set(UNTESTED)
    assert not set(TESTED_ELSEWHERE) & set(UNTESTED)
    assert not without - listed, f"modules with no tests/test_<name>.py and no entry here: {sorted(without - listed)}"
    assert not listed - without, f"entries for modules that have a test file or are gone: {sorted(listed - without)}"
    for name, files in TESTED_ELSEWHERE.items():
        for file, evidence in files.items():
            path = ROOT / "tests" / file
            assert path.is_file(), f"{name}: {file} does not exist"
            assert evidence in path.read_text(), f"{name}: {file} no longer contains {evidence!r}"


def test_the_curated_api_resolves_and_the_version_is_the_installed_one(pyproject):
    """Every name of miclip_nb.__all__ resolves (imported lazily), and __version__ is pyproject's."""
    import importlib

    import miclip_nb

    assert miclip_nb.__version__ == pyproject["project"]["version"]
    for name in miclip_nb.__all__:
        assert getattr(miclip_nb, name) is not None, name
    assert miclip_nb.load_target is importlib.import_module("miclip_nb.zoo").load_target
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        miclip_nb.nope  # noqa: B018
