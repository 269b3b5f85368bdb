"""JupyterLab in a real browser: notebook 04 on the committed reference results, driven by headless Chromium.

Runs when JupyterLab, selenium, Debian's chromium and chromedriver are installed (``make test-browser``
installs them; no browser is downloaded by pip tools); skipped otherwise. It opens Lab at the repository
root (autosave off), checks that each notebook opens as saved (not marked as modified once its kernel is up),
runs every cell of 04 on a copy of ``results/reference/`` (so nothing tracked is written), and checks that the figures and the explorer render, that the kernel ran without errors, and that every option
of every explorer dropdown (evaluation set, method, metric) redraws the chart as a non-blank image with readable
labels (no tuple text), its caption naming the interval kind, and for accuracies the majority-class line.
Screenshots of the explorer go to the test's tmp folder, and to $LLMFT_SCREENSHOTS when it is set.
"""
import base64
import hashlib
import io
import json
import os
import re
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
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "docmanager-extension"  # never save the notebook
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    port, token = _free_port(), "llmft-test"
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([str(JUPYTER), "lab", "--no-browser", "--allow-root", f"--port={port}",
                             f"--ServerApp.token={token}", f"--ServerApp.root_dir={ROOT}", "--LabApp.news_url=",
                             "--ServerApp.disable_check_xsrf=True"],
                            env={**os.environ, "LLMFT_RESULTS_DIR": str(res), "JUPYTERLAB_SETTINGS_DIR": str(settings)},
                            stdout=log, stderr=subprocess.STDOUT)
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


def _tracked_state() -> tuple:
    """What this test must not change: git's view of results/reference and the bytes of notebook 04's pair
    (other work in the same tree may have changed them before; the test compares before with after)."""
    st = subprocess.run(["git", "status", "--porcelain", "results/reference"], cwd=ROOT, capture_output=True, text=True)
    pair = [hashlib.sha1((ROOT / "notebooks" / f"04_analysis{ext}").read_bytes()).hexdigest() for ext in (".ipynb", ".py")]
    return st.stdout, pair


def _shot_dirs(tmp_path) -> list:
    dirs = [tmp_path / "screenshots"] + ([Path(os.environ["LLMFT_SCREENSHOTS"])] if os.environ.get("LLMFT_SCREENSHOTS") else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


ACCURACIES = ("score_acc", "score_acc_batch", "score_acc_contextual", "top1_acc")  # tables.WHOLE_SET_ACCURACIES
INTERVALS = ("95% t-interval over seeds", "Wilson 95% over examples")  # tables.T_INTERVAL, tables.WILSON_INTERVAL


def _check_explorer(view: dict, selected: dict):
    """One drawn state of the explorer: a non-blank chart, readable labels, the caption naming the metric and
    the interval kind, and the majority-class line exactly for the accuracies."""
    metric, what = selected["metric"], f"{selected}"
    assert _image_std(view["img"]) > 5, f"blank chart for {what}"
    assert "('" not in view["text"] and "')" not in view["text"], f"tuple labels for {what}: {view['text'][:300]}"
    cap = view["caption"]
    assert cap.startswith(metric + " "), (what, cap)
    assert any(k in cap for k in INTERVALS) or "no whisker" in cap, (what, cap)
    if metric in ACCURACIES:
        assert "dashed: majority class 0." in cap, (what, cap)
    else:
        assert "majority" not in cap, (what, cap)
    labels = view["labels"]
    assert labels and all(lab == "zero-shot" or re.search(r" \(from [a-z]+\)", lab) for lab in labels), (what, labels)
    if selected["method"] != "all":
        assert all(lab.startswith(selected["method"]) for lab in labels), (what, labels)


def test_analysis_notebook_renders_figures_and_a_live_explorer(lab, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, token, res = lab
    tracked = _tracked_state()
    shots = _shot_dirs(tmp_path)
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        for name in ("01_data_prep", "02_icl_baselines", "03_context_distillation", "04_analysis"):
            d.get(f"{url}/lab/tree/notebooks/{name}.ipynb?reset&token={token}")  # reset: this notebook alone
            _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, f"{name} to open")
            _wait(lambda: "Idle" in d.find_element(By.CSS_SELECTOR, ".jp-StatusBar-Widget, #jp-main-statusbar").text,
                  90, "the kernel")
            time.sleep(2)  # Lab writes the connected kernel's spec into the notebook once it is idle
            tab = d.find_element(By.CSS_SELECTOR, ".lm-TabBar-tab.jp-mod-current")
            assert "jp-mod-dirty" not in tab.get_attribute("class"), f"{name}.ipynb opens marked as modified"
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
        assert len(images) >= 6, len(images)  # the figures + the explorer's chart
        assert all(_image_std(src) > 5 for src in images), [round(_image_std(s), 1) for s in images]
        selects = lambda: d.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
        assert len(selects()) == 3  # eval_set, method, metric: a live widget, not a static rendering
        cell = selects()[0].find_element(By.XPATH, './ancestor::div[contains(@class, "jp-Cell")]')

        def view():
            """The explorer's output now: its one chart, its caption line, its table's labels and all its text."""
            imgs = [i.get_attribute("src") for i in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")]
            texts = [t.text for t in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .jp-RenderedText")]
            caps = [line for t in texts for line in t.splitlines() if " — bars: " in line]
            rows = cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output table tbody tr")
            labels = [r.find_elements(By.CSS_SELECTOR, "td")[0].text for r in rows]
            if len(imgs) != 1 or len(caps) != 1 or not labels:
                return None
            return {"img": imgs[0], "caption": caps[0], "labels": labels,
                    "text": "\n".join(o.text for o in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))}

        names = ("eval_set", "method", "metric")
        selected = {n: Select(s).first_selected_option.text for n, s in zip(names, selects())}
        now = _wait(view, 30, "the explorer's first drawing")
        _check_explorer(now, selected)
        seen = 0

        def choose(name: str, option: str):
            nonlocal now, seen
            if selected[name] == option:
                return
            Select(selects()[names.index(name)]).select_by_visible_text(option)
            selected[name] = option
            before = now["img"]
            now = _wait(lambda: (v := view()) and v["img"] != before and v["caption"].startswith(selected["metric"] + " ")
                        and v, 30, f"the explorer to redraw for {selected}")
            _check_explorer(now, selected)
            seen += 1
            if seen % 4 == 1 or name == "metric" and option in ("s_per_query", "balanced_acc"):
                d.execute_script("arguments[0].scrollIntoView(true);", cell)
                for folder in shots:
                    d.save_screenshot(str(folder / f"explorer_{seen:02d}_{name}_{re.sub(r'[^a-z0-9]+', '_', option.lower())}.png"))

        options = lambda name: [o.text for o in Select(selects()[names.index(name)]).options]
        sets = options("eval_set")
        home = next((s for s in sets if s.startswith("mnli")), sets[0])  # the set with every method
        for s in [s for s in sets if s != home] + [home]:
            choose("eval_set", s)
        for m in [m for m in options("method") if m != "all"] + ["all"]:
            choose("method", m)
        metrics = options("metric")
        assert "peak_mem_mb" not in metrics and "mem_tensors_peak_mb" in metrics, metrics
        for m in [m for m in metrics if m != "score_acc"] + ["score_acc"]:
            choose("metric", m)
        assert seen >= len(sets) + len(metrics) + 2, seen
    finally:
        d.quit()
    # nothing tracked was written: 04 wrote into the copy, and the notebook was never saved
    assert (res / "summary.csv").is_file()
    assert _tracked_state() == tracked
