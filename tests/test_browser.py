"""End to end in a real browser: every notebook runs in JupyterLab, and its panels answer clicks.

One headless JupyterLab (127.0.0.1, a free port, a random token, a temporary copy of notebooks/,
its own MICLIP_CACHE_DIR and Jupyter config/runtime/settings folders) serves all notebooks; Debian's
Chromium, driven by Playwright (no browser download), opens each one, clears its stored outputs,
runs all cells, checks that no cell raised and that every widget rendered, then performs the
notebook's steps in :data:`PANEL_STEPS` (type a concept and press Search, pick a unit, pick a
failure, move a slider) and checks that the rendered output changes as it should.

Artifacts (gitignored, rewritten on each run): ``outputs/browser/<notebook>/NN-<step>.png`` (the
notebook after running, then the panel after each step; ``FAILED.png`` when a step fails) and
``outputs/browser/timings.json`` (seconds to run all cells of each notebook in the browser).

Marked ``browser``: not in the default suite (it runs every notebook again, for minutes);
``.ci/run`` runs it as its own step, and ``pytest -m browser`` runs it here. While writing steps,
``-k 01_train`` picks one notebook and ``MICLIP_BROWSER_CACHE_DIR=/some/dir`` keeps activation
stores between runs. Skips, with the reason, when Python's playwright or a Chromium binary
($MICLIP_CHROMIUM, ``chromium`` on PATH, /usr/bin/chromium) is missing; fails instead when
$MICLIP_REQUIRE_BROWSER=1 (CI).

A new notebook in notebooks/ is picked up automatically; it fails until :data:`PANEL_STEPS` has an
entry for it (an empty list when it shows no panel), so that no panel goes untested by oversight.
``test_panel_steps_name_one_cell_of_each_notebook`` checks the table against the notebooks in the
default suite, without a browser.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
ARTIFACTS_DIR = ROOT / "outputs" / "browser"

#: Generous limits: the machine running CI has 2 busy cores.
RUN_ALL_TIMEOUT_S = 1800  # one notebook's cells, all together (04 took 650 s on 2 shared cores)
STEP_TIMEOUT_S = 120  # one panel reaction (a kernel round trip that draws figures)
LOAD_TIMEOUT_S = 120  # JupyterLab's page and the kernel's start
SERVER_START_TIMEOUT_S = 90

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


# ---------------------------------------------------------------------------------------------
# What to do with each notebook's panels.
#
# A step acts on the output of one cell (named by a piece of its source, which must occur in exactly
# one cell), then waits until every expectation holds. Selectors are CSS inside that cell's output
# area; ipywidgets 8 renders Text/BoundedIntText as `.widget-text` with a `label` and an `input`,
# Button as `button.widget-button`, IntSlider as `.widget-slider` (noUiSlider: `.noUi-handle`),
# Dropdown as `.widget-dropdown select`, HTML as `.widget-html-content`, Image as `img.widget-image`.
# ---------------------------------------------------------------------------------------------


def _text_input(label: str) -> str:
    return f".widget-text:has(> label:text-is('{label}')) input"


@dataclass(frozen=True)
class Fill:
    """Type ``value`` into the input at ``selector`` and press Enter."""

    selector: str
    value: str


@dataclass(frozen=True)
class Click:
    """Click the element at ``selector`` (e.g. ``button.widget-button:text-is('Search')``)."""

    selector: str


@dataclass(frozen=True)
class Pick:
    """Choose an option of the ``select`` at ``selector``: by position (int) or by its label (str)."""

    selector: str
    option: int | str


@dataclass(frozen=True)
class Slide:
    """Focus the slider handle at ``selector`` and press ``key`` ``times`` times (one step each)."""

    selector: str
    key: str = "ArrowRight"
    times: int = 1


@dataclass(frozen=True)
class Changed:
    """The text (or an image's ``src``) at ``selector`` differs from what it was before the step."""

    selector: str


@dataclass(frozen=True)
class Contains:
    """The text at ``selector`` contains ``text``."""

    selector: str
    text: str


@dataclass(frozen=True)
class ImageShown:
    """The image at ``selector`` has loaded and has a non-zero size."""

    selector: str


@dataclass(frozen=True)
class Count:
    """``selector`` matches exactly ``n`` elements."""

    selector: str
    n: int


@dataclass(frozen=True)
class Step:
    name: str  # used in the screenshot's file name
    cell: str  # a piece of the source of the cell whose output the step drives
    actions: tuple = ()  # Fill / Click / Pick / Slide, in order; none = only check the output
    expect: tuple = ()  # Changed / Contains / ImageShown / Count, all must hold
    panel: str = ".jp-OutputArea"  # what to screenshot, inside the cell
    notes: str = field(default="", compare=False)


def _select(label: str) -> str:
    return f".widget-dropdown:has(> label:text-is('{label}')) select"


SEARCH_STATUS = ".widget-html-content >> nth=0"
SEARCH_TABLE = ".widget-html-content >> nth=1"
SEARCH_IMAGES = "img.widget-image >> nth=0"
SAE_TABLE = ".widget-html-content >> nth=0"  # the table sits above the status line in this panel
SAE_STATUS = ".widget-html-content >> nth=1"
SAE_HEATMAPS = "img.widget-image"

#: Steps per notebook stem. Every notebook in notebooks/ needs an entry ([] = no panel). ``TODO``
#: marks a notebook whose steps are not written yet: its cells are run and checked, then it xfails.
TODO = None
PANEL_STEPS: dict[str, list[Step] | None] = {
    "00_tour": [
        Step("dataset-grid", "viz.dataset_grid(", expect=(ImageShown(".jp-RenderedImage img"),)),
    ],
    "01_train_alignment": [
        # The notebook sets the concept to queries[0] ("red") before displaying the panel.
        Step("concept-search-initial", "concept_search_panel(",
             expect=(Contains(SEARCH_STATUS, "red"), Count(f"{SEARCH_TABLE} >> tr", 6), ImageShown(SEARCH_IMAGES))),
        Step("concept-search-dots", "concept_search_panel(",
             actions=(Fill(_text_input("concept"), "dots"), Click("button.widget-button:text-is('Search')")),
             expect=(Contains(SEARCH_STATUS, "dots"), Changed(SEARCH_TABLE), Changed(SEARCH_IMAGES),
                     ImageShown(SEARCH_IMAGES))),
        Step("concept-search-slider", "concept_search_panel(",
             actions=(Slide(".widget-slider .noUi-handle"),),
             expect=(Contains(".widget-slider .widget-readout", "6"), Count(f"{SEARCH_TABLE} >> tr", 7),
                     Changed(SEARCH_IMAGES))),
        Step("concept-search-cosine", "concept_search_panel(",
             actions=(Pick(_select("rank by"), "cosine"),),
             expect=(Contains(SEARCH_TABLE, "cosine"), Changed(SEARCH_TABLE))),
        Step("unit-inspector-initial", "unit_inspector_panel(",
             expect=(Contains(".widget-html-content >> nth=0", "neuron 0"), ImageShown("img.widget-image >> nth=0"),
                     ImageShown("img.widget-image >> nth=1"))),
        Step("unit-inspector-unit-25", "unit_inspector_panel(",
             actions=(Fill("input[type=number]", "25"),),
             expect=(Contains(".widget-html-content >> nth=0", "neuron 25"), Changed(".widget-html-content >> nth=1"),
                     Changed("img.widget-image >> nth=0"), Changed("img.widget-image >> nth=1"),
                     ImageShown("img.widget-image >> nth=1"))),
    ],
    # The SAE feature panel (widgets.sae_feature_panel): concept and feature menus, a top-features
    # slider, the table of top features, a status line and the heatmaps image. Written against the
    # notebook's first draft; revisit if the panel's layout changes.
    "02_sae_features": [
        Step("sae-initial", "sae_feature_panel(",
             expect=(Contains(SAE_STATUS, "SAE feature"), Count(f"{SAE_TABLE} >> tr", 6), ImageShown(SAE_HEATMAPS))),
        Step("sae-concept-star", "sae_feature_panel(",
             actions=(Pick(_select("concept"), "star"),),
             expect=(Changed(SAE_TABLE), ImageShown(SAE_HEATMAPS))),
        Step("sae-browse-features", "sae_feature_panel(",
             actions=(Pick(_select("SAE feature"), 1),),
             expect=(Changed(SAE_STATUS), Changed(SAE_HEATMAPS), ImageShown(SAE_HEATMAPS))),
        Step("sae-top-features-slider", "sae_feature_panel(",
             actions=(Slide(".widget-slider .noUi-handle"),),
             expect=(Count(f"{SAE_TABLE} >> tr", 7),)),
    ],
    # No widget panel: its cells run and are checked for errors, and its figure is drawn.
    "03_intervention_tables": [
        Step("intervention-panels", "viz.intervention_panels(", expect=(ImageShown(".jp-RenderedImage img"),)),
    ],
    "04_failure_diagnosis": [
        Step("failure-initial", "failure_panel(",
             expect=(Contains(".widget-dropdown select", "#0"), ImageShown("img.widget-image >> nth=0"),
                     ImageShown("img.widget-image >> nth=1"), Contains(".widget-html-content", "stages.3"))),
        Step("failure-pick-1", "failure_panel(",
             actions=(Pick(".widget-dropdown select", 1),),
             expect=(Changed(".widget-html-content"), Changed("img.widget-image >> nth=0"),
                     Changed("img.widget-image >> nth=1"), ImageShown("img.widget-image >> nth=0"))),
    ],
}


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


# ---------------------------------------------------------------------------------------------
# JupyterLab and the browser
# ---------------------------------------------------------------------------------------------


def _chromium_path() -> str | None:
    for candidate in (os.environ.get("MICLIP_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    notebook_dir: Path
    log_path: Path

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary; skips without it or without playwright ($MICLIP_REQUIRE_BROWSER=1, as
    in CI, makes that a failure instead)."""
    missing = pytest.fail if os.environ.get("MICLIP_REQUIRE_BROWSER") == "1" else pytest.skip
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("python playwright is not installed (pip install -e '.[dev]')")
    path = _chromium_path()
    if path is None:
        missing("no Chromium binary: apt-get install chromium, or set $MICLIP_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def lab(chromium, tmp_path_factory) -> Lab:
    """A headless JupyterLab serving a temporary copy of notebooks/; shut down at the end."""
    base = tmp_path_factory.mktemp("jupyterlab")
    notebook_dir = base / "notebooks"
    shutil.copytree(NOTEBOOKS_DIR, notebook_dir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings_dir = base / "settings"
    # All cells stay in the DOM (no windowing), so a cell is found by its index.
    tracker = settings_dir / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    # No "get notified about Jupyter news?" toast over the screenshots.
    notification = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false"}))
    env = dict(os.environ)
    env.update({
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        # $MICLIP_BROWSER_CACHE_DIR keeps activation stores between runs while writing steps.
        "MICLIP_CACHE_DIR": os.environ.get("MICLIP_BROWSER_CACHE_DIR") or str(base / "miclip_cache"),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    token = secrets.token_hex(16)
    port = _free_port()
    log_path = base / "jupyterlab.log"
    log = open(log_path, "wb")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebook_dir}", "--ServerApp.port_retries=0",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               # window.jupyterapp: the tests run JupyterLab's own commands and read its kernel state.
               "--LabApp.expose_app_in_browser=True"]
    server = subprocess.Popen(command, cwd=notebook_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    instance = Lab(f"http://127.0.0.1:{port}", token, notebook_dir, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{instance.log_tail()}")
            try:
                instance.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in {SERVER_START_TIMEOUT_S} s:\n{instance.log_tail()}")
                time.sleep(0.25)  # polling the server's readiness, not waiting on the page
        yield instance
    finally:
        _stop_server(instance, server)
        log.close()


def _stop_server(lab: Lab, server: subprocess.Popen) -> None:
    """Shut down every kernel and the server: politely, then by signal."""
    if server.poll() is None:
        try:
            lab.api("POST", "/api/shutdown")
            server.wait(timeout=30)
        except Exception:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if server.poll() is not None:
            break
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """A Chromium context (fresh profile) driven by Playwright; closed at the end."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=chromium, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1600, "height": 1100})
        context.set_default_timeout(STEP_TIMEOUT_S * 1000)
        try:
            yield context
        finally:
            context.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def timings():
    """Seconds to run all cells, per notebook; written to outputs/browser/timings.json at the end."""
    seconds: dict[str, float] = {}
    yield seconds
    if seconds:
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS_DIR / "timings.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**previous, **seconds}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# JavaScript run in the page (window.jupyterapp is JupyterLab's application object)
# ---------------------------------------------------------------------------------------------

def _panel_js(body: str) -> str:
    """A JS function of the notebook's path; ``body`` sees ``panel``, that notebook's NotebookPanel."""
    return ("(path) => { const panel = [...window.jupyterapp.shell.widgets('main')]"
            ".find(w => w.context && w.context.path === path && w.content && w.content.model);\n" + body + "\n}")


#: The notebook is open and its kernel is idle.
_KERNEL_IDLE_JS = _panel_js("""
  if (!panel || !panel.context.isReady) return false;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle' && kernel.connectionStatus === 'connected';""")

#: The kernel has been idle for half a second: the replies to a panel's last change have all come
#: in (a step with two actions may see the kernel idle between them; a short idle spell rules out that).
_KERNEL_SETTLED_JS = _panel_js("""
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const now = performance.now();
  if (!kernel || kernel.status !== 'idle') { window.__miclipIdleSince = null; return false; }
  if (!window.__miclipIdleSince) window.__miclipIdleSince = now;
  return now - window.__miclipIdleSince >= 500;""")

#: Clear the stored outputs, then start running every cell (not awaited: Python waits on the DOM).
_RUN_ALL_JS = _panel_js("""
  window.jupyterapp.shell.activateById(panel.id);
  window.jupyterapp.shell.collapseLeft();  // wider cells in the screenshots
  return window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs').then(() => {
    window.jupyterapp.commands.execute('notebook:run-all-cells');
    return true;
  });""")

#: Running is over: the kernel and the toolbar's execution indicator are idle, no prompt shows
#: [*], and every code cell has an execution count, or a cell failed (the rest are then skipped).
_RUN_FINISHED_JS = _panel_js("""
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (!kernel || kernel.status !== 'idle') return false;
  const indicator = panel.toolbar.node.querySelector('.jp-Notebook-ExecutionIndicator');
  if (indicator && indicator.dataset.status !== 'idle') return false;
  if ([...panel.content.node.querySelectorAll('.jp-InputPrompt')].some(e => e.textContent.includes('*'))) return false;
  const cells = panel.content.model.toJSON().cells.filter(c => c.cell_type === 'code');
  const failed = cells.some(c => (c.outputs || []).some(o => o.output_type === 'error'));
  const source = c => Array.isArray(c.source) ? c.source.join('') : c.source;
  return failed || cells.every(c => c.execution_count !== null || !source(c).trim());""")

#: [{index, execution_count, source, errors: [text], widget_views: n}], one per code cell.
_CELL_REPORT_JS = _panel_js("""
  return panel.content.model.toJSON().cells.map((c, index) => ({
    index, type: c.cell_type, execution_count: c.execution_count === undefined ? null : c.execution_count,
    source: Array.isArray(c.source) ? c.source.join('') : c.source,
    errors: (c.outputs || []).filter(o => o.output_type === 'error')
        .map(o => `${o.ename}: ${o.evalue}\\n${(o.traceback || []).join('\\n')}`),
    widget_views: (c.outputs || []).filter(o => o.data && o.data['application/vnd.jupyter.widget-view+json']).length,
  })).filter(c => c.type === 'code');""")

#: Widget views not (yet) drawn, or drawn as an error: [] when every one shows a widget.
_WIDGET_PROBLEMS_JS = _panel_js("""
  const views = [...panel.content.node.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.widget-view+json"]')];
  return views.map((v, i) => {
    if (/Error displaying widget|model not found/i.test(v.textContent)) return `view ${i}: ${v.textContent.slice(0, 200)}`;
    if (!v.querySelector('.jupyter-widgets')) return `view ${i}: not drawn`;
    return null;
  }).filter(x => x);""")
_WIDGETS_DRAWN_JS = _WIDGET_PROBLEMS_JS.replace("}).filter(x => x);", "}).filter(x => x).length === 0;")

_IMAGE_LOADED_JS = "img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0"


def _snapshot(locator) -> str:
    """What Changed compares: an image's src, or an element's text."""
    return locator.evaluate("e => e.tagName === 'IMG' ? (e.getAttribute('src') || '') : e.textContent")


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _wait(page, js: str, arg, timeout_s: float, what: str, lab: Lab) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=250)
    except PlaywrightTimeout:
        pytest.fail(f"{what}: not done after {timeout_s} s\nJupyterLab log:\n{lab.log_tail()}")


def _settle(page, path: str) -> None:
    page.evaluate("() => { window.__miclipIdleSince = null; }")
    page.wait_for_function(_KERNEL_SETTLED_JS, arg=path, timeout=STEP_TIMEOUT_S * 1000, polling=100)


def _expect_all(page, cell, expectations, before: dict[str, str]) -> None:
    from playwright.sync_api import expect

    timeout_ms = STEP_TIMEOUT_S * 1000
    for e in expectations:
        target = cell.locator(e.selector)
        if isinstance(e, Changed):
            page.wait_for_function(
                "([el, old]) => (el.tagName === 'IMG' ? (el.getAttribute('src') || '') : el.textContent) !== old",
                arg=[target.element_handle(timeout=timeout_ms), before[e.selector]], timeout=timeout_ms, polling=250)
        elif isinstance(e, Contains):
            expect(target).to_contain_text(e.text, timeout=timeout_ms)
        elif isinstance(e, ImageShown):
            page.wait_for_function(_IMAGE_LOADED_JS, arg=target.element_handle(timeout=timeout_ms), timeout=timeout_ms,
                                   polling=250)
        elif isinstance(e, Count):
            expect(target).to_have_count(e.n, timeout=timeout_ms)
        else:
            raise TypeError(f"unknown expectation {e!r}")


def _run_step(page, path: str, cell, step: Step, shot_path: Path) -> None:
    _settle(page, path)  # the previous step's updates have all landed before "before" is read
    before = {e.selector: _snapshot(cell.locator(e.selector)) for e in step.expect if isinstance(e, Changed)}
    for action in step.actions:
        target = cell.locator(action.selector)
        if isinstance(action, Fill):
            target.fill(action.value)
            target.press("Enter")
        elif isinstance(action, Click):
            target.click()
        elif isinstance(action, Pick):
            if isinstance(action.option, int):
                target.select_option(index=action.option)
            else:
                target.select_option(label=action.option)
        elif isinstance(action, Slide):
            target.focus()
            for _ in range(action.times):
                target.press(action.key)
        else:
            raise TypeError(f"unknown action {action!r}")
    _expect_all(page, cell, step.expect, before)
    _settle(page, path)  # the whole reaction has landed, not just the part checked first ...
    _expect_all(page, cell, step.expect, before)  # ... and its final state still meets them all
    cell.locator(step.panel).first.screenshot(path=str(shot_path))


@pytest.mark.parametrize("notebook", _notebooks(), ids=lambda p: p.stem)
def test_panel_steps_name_one_cell_of_each_notebook(notebook: Path):
    """Without a browser (default suite): each notebook has an entry in PANEL_STEPS, and each step
    names exactly one of its cells, so the browser test cannot fail on a stale table."""
    assert notebook.stem in PANEL_STEPS, f"add {notebook.stem!r} to PANEL_STEPS in tests/test_browser.py"
    sources = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    for step in PANEL_STEPS[notebook.stem] or []:
        n = sum(step.cell in src for src in sources)
        assert n == 1, f"{notebook.name}: step {step.name!r}: {step.cell!r} occurs in {n} code cells, not 1"


@pytest.mark.browser
@pytest.mark.parametrize("notebook", _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_and_panels_respond(notebook: Path, lab: Lab, browser, timings):
    if notebook.stem not in PANEL_STEPS:
        pytest.fail(f"{notebook.name} has no entry in PANEL_STEPS (tests/test_browser.py): add the steps that "
                    "drive its panels, or [] if it shows none")
    steps = PANEL_STEPS[notebook.stem]
    shots_dir = ARTIFACTS_DIR / notebook.stem
    shutil.rmtree(shots_dir, ignore_errors=True)
    shots_dir.mkdir(parents=True)
    page = browser.new_page()
    console_errors: list[str] = []
    page.on("pageerror", lambda err: console_errors.append(str(err)))
    try:
        page.goto(f"{lab.url}/lab/workspaces/{notebook.stem}/tree/{notebook.name}?token={lab.token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=LOAD_TIMEOUT_S * 1000)
        _wait(page, _KERNEL_IDLE_JS, notebook.name, LOAD_TIMEOUT_S, f"{notebook.name}: kernel start", lab)

        started = time.monotonic()
        page.evaluate(_RUN_ALL_JS, notebook.name)
        _wait(page, _RUN_FINISHED_JS, notebook.name, RUN_ALL_TIMEOUT_S, f"{notebook.name}: run all cells", lab)
        timings[notebook.stem] = round(time.monotonic() - started, 1)

        report = page.evaluate(_CELL_REPORT_JS, notebook.name)
        page.screenshot(path=str(shots_dir / "00-after-run.png"))
        errors = [f"cell {c['index']}:\n{_strip_ansi(e)}" for c in report for e in c["errors"]]
        assert not errors, f"{notebook.name} raised:\n" + "\n\n".join(errors)
        unrun = [c["index"] for c in report if c["execution_count"] is None and c["source"].strip()]
        assert not unrun, f"{notebook.name}: cells {unrun} did not run"
        n_views = sum(c["widget_views"] for c in report)
        if n_views:
            from playwright.sync_api import TimeoutError as PlaywrightTimeout

            try:
                page.wait_for_function(_WIDGETS_DRAWN_JS, arg=notebook.name, timeout=STEP_TIMEOUT_S * 1000, polling=250)
            except PlaywrightTimeout:
                pytest.fail(f"{notebook.name}: widgets not drawn: {page.evaluate(_WIDGET_PROBLEMS_JS, notebook.name)}")

        if steps is None:
            pytest.xfail(f"{notebook.name} ran cleanly in the browser, but its panel steps are not written yet "
                         "(PANEL_STEPS in tests/test_browser.py)")
        if n_views and not steps:
            pytest.fail(f"{notebook.name} shows {n_views} widget panel(s) but PANEL_STEPS has no steps for it")

        cells = page.locator(".jp-Notebook .jp-Cell")
        for number, step in enumerate(steps, start=1):
            matches = [c["index"] for c in report if step.cell in c["source"]]
            assert len(matches) == 1, f"{notebook.name}: step {step.name!r}: {step.cell!r} is in cells {matches}, not one"
            cell = cells.nth(matches[0])
            try:
                _run_step(page, notebook.name, cell, step, shots_dir / f"{number:02d}-{step.name}.png")
            except Exception as err:
                page.screenshot(path=str(shots_dir / "FAILED.png"))
                raise AssertionError(f"{notebook.name}: step {step.name!r} failed: {err}\n"
                                     f"page errors: {console_errors}") from err
    finally:
        for session in lab.api("GET", "/api/sessions") or []:
            if session.get("path") == notebook.name:
                lab.api("DELETE", f"/api/sessions/{session['id']}")
        page.close()
