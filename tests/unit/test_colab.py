"""Every notebook in colab/ is committed without outputs and opens the same way: its
Colab badge, the set-up cell, the device cell. Running them is
tests/integration/test_colab_runs.py."""

import glob
import os

import pytest

from helpers import ROOT

nbformat = pytest.importorskip('nbformat')

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'colab', '*.ipynb')))
NAMES = [os.path.basename(path) for path in NOTEBOOKS]


def read(path):
  return nbformat.read(path, as_version=4)


def test_the_notebooks_are_there():
  assert NAMES == ['finetune_open_model.ipynb', 'kernels.ipynb', 'post_training.ipynb',
                   'quickstart.ipynb']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_a_notebook_is_committed_without_outputs_and_opens_with_its_colab_badge(path):
  notebook = read(path)
  first = notebook.cells[0]
  name = os.path.basename(path)
  assert first.cell_type == 'markdown' and 'colab-badge.svg' in first.source
  assert f'/blob/main/colab/{name})' in first.source
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None
  # The same set-up and device cells everywhere.
  reference = read(NOTEBOOKS[0])
  assert notebook.cells[1].source == reference.cells[1].source
  assert notebook.cells[2].source == reference.cells[2].source
  assert 'pip' in notebook.cells[1].source and 'jax.devices()' in notebook.cells[2].source
