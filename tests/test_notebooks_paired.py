"""Each study notebook has one source of truth: its jupytext percent script ``notebooks/0*.py``, paired with
the ``.ipynb`` that carries the stored outputs. The pair must hold the same cells (type, source, tags);
``make notebooks`` (or ``python tools/execute_notebooks.py --sync-only``) brings them in step."""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("0*.ipynb"))


def cells(nb) -> list[tuple]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def first_difference(x: tuple, y: tuple) -> str:
    """The first line (or the type or tags) in which two cells differ, as ``.py`` vs ``.ipynb``."""
    if x[0] != y[0] or x[2] != y[2]:
        return f"{x[0]}{list(x[2])} in .py vs {y[0]}{list(y[2])} in .ipynb"
    lx, ly = x[1].splitlines(), y[1].splitlines()
    i = next((i for i, (p, q) in enumerate(zip(lx, ly)) if p != q), min(len(lx), len(ly)))
    return f"line {i + 1}: {(lx[i] if i < len(lx) else '<end>')!r} in .py vs {(ly[i] if i < len(ly) else '<end>')!r} in .ipynb"


def differences(name: str, folder: Path = NOTEBOOKS) -> list[str]:
    py = jupytext.read(folder / f"{name}.py")
    ipynb = nbformat.read(folder / f"{name}.ipynb", as_version=4)
    a, b = cells(py), cells(ipynb)
    out = [f"cell {i}: {first_difference(x, y)}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b):
        out.append(f"{len(a)} cells in .py, {len(b)} in .ipynb")
    if ipynb.metadata.get("jupytext", {}).get("formats") != "ipynb,py:percent":
        out.append(".ipynb is not paired (metadata jupytext.formats)")
    return out


def test_every_notebook_has_a_percent_script():
    assert NAMES == ["01_data_prep", "02_icl_baselines", "03_context_distillation", "04_analysis"]
    assert sorted(p.stem for p in NOTEBOOKS.glob("0*.py")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_pair_holds_the_same_cells(name):
    diff = differences(name)
    assert not diff, (f"notebooks/{name}.py and .ipynb differ (run `make notebooks`, or "
                      f"`python tools/execute_notebooks.py --sync-only`): " + "; ".join(diff[:5]))
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert sum("parameters" in c.metadata.get("tags", ()) for c in nb.cells) == 1  # papermill's cell survives


def test_an_edit_on_one_side_is_caught(tmp_path):
    """The check itself: a changed line in a copy of a script is reported."""
    for suffix in (".py", ".ipynb"):
        (tmp_path / f"01_data_prep{suffix}").write_bytes((NOTEBOOKS / f"01_data_prep{suffix}").read_bytes())
    assert differences("01_data_prep", tmp_path) == []
    path = tmp_path / "01_data_prep.py"
    path.write_text(path.read_text().replace("eval_seed: int = 0", "eval_seed: int = 1"))
    assert any("eval_seed" in d for d in differences("01_data_prep", tmp_path))
