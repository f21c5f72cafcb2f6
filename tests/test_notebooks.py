"""The notebooks in `notebooks/` run headless, top to bottom, with tiny settings injected into their parameters cell."""

from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
TINY = {
    "quickstart.ipynb": (
        "CALIBRATION_SAMPLES = 4; DISTILL_STEPS = 2; SEQ_LENGTH = 32; EVAL_SAMPLES = 2; BATCH_SIZE = 2\n"
        "LEARNING_RATE = 1e-4\n"
        'TARGET = {"hidden_size": 456, "intermediate_size": 1024, "num_attention_heads": 6}\n'
        'OUTPUT_DIR = "outputs/quickstart"\n'
    ),
    "importance_analysis.ipynb": (
        "CALIBRATION_SAMPLES = 2; SEQ_LENGTH = 16; DEPTH_SAMPLES = 1; BLOCK_LENGTHS = [24]; BATCH_SIZE = 2\n"
    ),
}


def _outputs(notebook, output_type=None):
    return [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if output_type is None or o.output_type == output_type
    ]


def _text(notebook) -> str:
    return "".join(o.get("text", "") for o in _outputs(notebook, "stream"))


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert code[0].source.startswith("# Parameters")
    assert "2407.14679" in notebook.cells[0].source and "2408.11796" in notebook.cells[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameters = next(cell for cell in notebook.cells if cell.cell_type == "code")
    parameters.source = TINY[name]
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any error
    assert not _outputs(notebook, "error")
    figures = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
    text = _text(notebook)
    if name == "quickstart.ipynb":
        assert len(figures) >= 3
        assert "final kd_loss:" in text and "distilled: loss" in text
        assert (tmp_path / "outputs" / "quickstart" / "student" / "config.json").is_file()
    else:
        assert len(figures) >= 4
        assert "n=24: drop layers" in text and "full model loss:" in text
