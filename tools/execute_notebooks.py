"""Bring the paired notebooks in step with their percent scripts and store fresh smoke-profile outputs.

The notebooks' source of truth is ``notebooks/0*.py`` (jupytext percent scripts, paired with the
``.ipynb`` files: edit either in JupyterLab with jupytext, or the ``.py`` in any editor). The ``.ipynb``
files carry the outputs nbval compares (cells marked ``# NBVAL_CHECK_OUTPUT``). After an edit:

    make notebooks            # = jupytext --sync, then this script with a scratch results folder

``--sync-only`` updates the ``.ipynb`` inputs without running anything. ``tests/test_notebooks_paired.py``
fails while a pair differs.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_data_prep", "02_icl_baselines", "03_context_distillation", "04_analysis")


def sync() -> None:
    """``jupytext --sync`` every pair (the newer file of each pair wins, as in JupyterLab)."""
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", "--quiet", *(str(ROOT / f"{n}.py") for n in NOTEBOOKS)],
                   check=True)


def execute_in_place(name: str) -> None:
    """Run a notebook with its own (smoke) parameters and store its outputs, as nbval will compare them."""
    from nbclient import NotebookClient

    path = ROOT / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nb.metadata.pop("widgets", None)  # progress-bar widget state: large and meaningless when stored
    for cell in nb.cells:  # smoke-run images are not worth their bytes; results/<profile>/executed keeps real ones
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if "image/png" not in o.get("data", {})]
            cell.metadata.pop("execution", None)  # run timestamps only churn the diff
    nbformat.write(nb, path)


def main() -> None:
    sync()
    if "--sync-only" in sys.argv:
        return
    for name in NOTEBOOKS:  # set LLMFT_RESULTS_DIR to a scratch folder first (make notebooks does)
        execute_in_place(name)
        print("executed", name, flush=True)
    sync()  # the .py pairs take the .ipynb's new timestamp: nothing changes in them


if __name__ == "__main__":
    main()
