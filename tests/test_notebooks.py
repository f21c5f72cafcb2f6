"""The notebooks in `notebooks/` run headless, top to bottom, with tiny settings injected into their parameters cell
(as `jupyter execute` runs them: nbclient, from the `notebooks` extra)."""

import importlib.util
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


def _rendered(text: str) -> list[str]:
    """Lines as Jupyter shows a stream: a carriage return redraws the line (tqdm's text bars)."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def _check_progress_bars(notebook) -> None:
    """Progress bars show as bars: widgets with ipywidgets (the `notebooks` extra), else one redrawn line each."""
    streams = _text(notebook)
    widgets = [o for o in _outputs(notebook) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    bars = [line for line in _rendered(streams) if "Importance estimation" in line]
    if importlib.util.find_spec("ipywidgets") is not None:  # installed by the `notebooks` extra
        assert "IProgress not found" not in streams
        assert widgets and not bars  # rendered by Jupyter as progress widgets
    else:  # tqdm falls back to text (and says so once): one line per bar, redrawn in place
        assert len(bars) == 1 and "100%" in bars[0] and "█" in bars[0], bars


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
    _check_progress_bars(notebook)
    figures = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
    text = _text(notebook)
    if name == "quickstart.ipynb":
        assert len(figures) >= 3
        assert "final kd_loss:" in text and "distilled: loss" in text
        assert (tmp_path / "outputs" / "quickstart" / "student" / "config.json").is_file()
    else:
        assert len(figures) >= 4
        assert "n=24: drop layers" in text and "full model loss:" in text
