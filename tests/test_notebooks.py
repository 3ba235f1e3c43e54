"""Every notebook runs top to bottom (in smoke mode: tiny settings) so it cannot rot."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    # Each runs in test_notebook_runs below (smoke mode); a renamed or deleted notebook should be noticed.
    names = {os.path.basename(path) for path in NOTEBOOKS}
    assert {"quickstart.ipynb", "mae.ipynb", "maskgit.ipynb", "segmentation.ipynb"} <= names, sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", []))
