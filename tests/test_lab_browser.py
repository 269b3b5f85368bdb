"""JupyterLab in a real browser: notebook 04 on the committed reference results, driven by headless Chromium.

Runs when JupyterLab, selenium, Debian's chromium and chromedriver are installed (``make test-browser``
installs them; no browser is downloaded by pip tools); skipped otherwise. It opens Lab at the repository
root, runs every cell of 04 on a copy of ``results/reference/`` (so nothing tracked is written), and checks
that the five figures and the explorer render, that changing a dropdown redraws the explorer's chart as
a non-blank image, and that the kernel ran without errors.
"""
import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
JUPYTER = Path(sys.executable).with_name("jupyter")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and JUPYTER.is_file() and shutil.which("jupyter-lab", path=str(JUPYTER.parent))),
    reason="JupyterLab/chromium/chromedriver not installed (make test-browser installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_std(src: str) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L")).std())


def _wait(pred, timeout: float, what: str):
    from selenium.common.exceptions import StaleElementReferenceException

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            got = pred()
        except StaleElementReferenceException:  # Lab re-rendered what was being read: look again
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture()
def lab(tmp_path):
    pytest.importorskip("selenium")
    res = tmp_path / "reference"
    shutil.copytree(ROOT / "results" / "reference", res)
    port, token = _free_port(), "llmft-test"
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([str(JUPYTER), "lab", "--no-browser", "--allow-root", f"--port={port}",
                             f"--ServerApp.token={token}", f"--ServerApp.root_dir={ROOT}", "--LabApp.news_url=",
                             "--ServerApp.disable_check_xsrf=True"],
                            env={**os.environ, "LLMFT_RESULTS_DIR": str(res)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _connects(port), 60, "JupyterLab to listen")
        yield f"http://127.0.0.1:{port}", token, res
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def test_analysis_notebook_renders_figures_and_a_live_explorer(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, token, res = lab
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        d.get(f"{url}/lab/tree/notebooks/04_analysis.ipynb?token={token}")
        _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, "the notebook to open")
        _wait(lambda: "Idle" in d.find_element(By.CSS_SELECTOR, ".jp-StatusBar-Widget, #jp-main-statusbar").text,
              90, "the kernel")
        def menu(top: str, item: str):
            next(m for m in d.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if m.text == top).click()
            _wait(lambda: [i for i in d.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel") if i.text == item],
                  10, f"{top} > {item}")[0].click()

        menu("Edit", "Clear Outputs of All Cells")  # the stored outputs must not pass for this run's
        _wait(lambda: not d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"), 30, "the outputs to clear")
        menu("Run", "Run All Cells")

        def finished():
            prompts = [p.text for p in d.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]
            outs = [o.text.strip() for o in d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]
            return prompts and all("*" not in p and p.strip("[]: ") for p in prompts) and "ok" in outs
        _wait(finished, 180, "every cell to run (the last check cell prints ok)")
        errors = d.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"] .jp-RenderedText, .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')
        assert not [e.text for e in errors if "Traceback" in e.text], [e.text[:500] for e in errors]
        images = [i.get_attribute("src") for i in d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")]
        assert len(images) >= 6, len(images)  # five figures + the explorer's chart
        assert all(_image_std(src) > 5 for src in images), [round(_image_std(s), 1) for s in images]
        selects = d.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
        assert len(selects) == 3  # eval_set, method, metric: a live widget, not a static rendering
        cell = selects[0].find_element(By.XPATH, './ancestor::div[contains(@class, "jp-Cell")]')
        chart = lambda: [i.get_attribute("src") for i in cell.find_elements(By.CSS_SELECTOR, "img")]
        before = chart()
        assert len(before) == 1 and _image_std(before[0]) > 5
        Select(selects[2]).select_by_visible_text("s_per_query")
        after = _wait(lambda: [s for s in chart() if s != before[0]] or None, 30, "the explorer to redraw")
        assert _image_std(after[0]) > 5, "the explorer's chart came back blank after a dropdown change"
    finally:
        d.quit()
    # nothing tracked was written: 04 wrote into the copy
    assert (res / "summary.csv").is_file()
    st = subprocess.run(["git", "status", "--porcelain", "results/reference"], cwd=ROOT, capture_output=True, text=True)
    assert st.stdout.strip() == "", st.stdout
