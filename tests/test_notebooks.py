"""The notebooks run top to bottom offline, with small settings, and reach their results.

Each notebook has one cell tagged ``parameters`` (the papermill convention); the test runs a
copy with a cell after it that shrinks the settings, and a last cell that checks the
notebook's point on its own variables."""

import os

import nbclient
import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")

CASES = {
    # Newton-type PSGD at its unit step reaches 1e-10 on a rotated, badly conditioned
    # least-squares problem before Adam does at any rate of its sweep.
    "quickstart": ("",  # its 500 steps take seconds
                   'newton = steps_to(curves["psgd.dense newton (lr 1)"])\n'
                   'assert newton is not None\n'
                   'for lr in (0.01, 0.1, 1.0):\n'
                   '    adam = steps_to(curves[f"adam (lr {lr:g})"])\n'
                   '    assert adam is None or adam > newton, (lr, adam, newton)'),
    # The dense group represents H⁻¹ (eig(PH) → 1); the diagonal group cannot.
    "preconditioner_gallery": ("UPDATES = 2000",
                               'assert abs(results["dense"][-1] - 1).max() < 0.05\n'
                               'assert results["diag"][-1].max() / results["diag"][-1].min() > 10'),
    # Newton type → H⁻¹; Newton PSGD solves Rosenbrock; whitening at least moves towards C^(-1/2).
    "newton_vs_whitening": ("UPDATES = 1000\nSTEPS = 300",
                            'assert newton_errors[-1] < 1e-3\n'
                            'assert whitening_errors[-1] < 0.5 * whitening_errors[0]\n'
                            'assert runs["psgd.dense newton (lr 1)"][-1] < 1e-10'),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_offline_and_reaches_its_result(name, monkeypatch):
  settings, checks = CASES[name]
  book = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  tagged = [i for i, cell in enumerate(book.cells)
            if "parameters" in cell.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, "one cell must be tagged 'parameters'"
  book.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(settings))
  book.cells.append(nbformat.v4.new_code_cell(checks))
  # Plots go to a non-interactive backend; the kernel is this interpreter's ipykernel.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()
