"""Every notebook in colab/ runs as a notebook, in a Jupyter kernel, top to bottom with its
small settings on the CPU: the set-up cell included (it installs lm from this checkout).
How they are committed is checked in tests/unit/test_colab.py."""

import os

import pytest

from helpers import ROOT, cpu_subprocess_env
from test_colab import NAMES, NOTEBOOKS, read

nbclient = pytest.importorskip('nbclient')


def jax_packages() -> dict:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  return {dist.metadata['Name']: dist.version for dist in importlib.metadata.distributions()
          if dist.metadata['Name'] and dist.metadata['Name'].startswith(('jax', 'libtpu'))}


def execute(path, workdir, monkeypatch):
  """The notebook, run in a Python kernel with the small settings; raises at the first
  cell that fails, naming it."""
  environment = cpu_subprocess_env(LM_NOTEBOOK_SMALL='1', LM_NOTEBOOK_WORKDIR=str(workdir),
                                   LM_SOURCE=ROOT)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)  # The kernel inherits this process's environment.
  notebook = read(path)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': str(workdir.parent)}}).execute()
  return notebook


def text_of(cell) -> str:
  parts = []
  for output in cell.outputs:
    parts.append(output.get('text', ''))
    parts.append(output.get('data', {}).get('text/markdown', ''))
    parts.append(output.get('data', {}).get('text/plain', ''))
  return ''.join(parts)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_a_notebook_runs_top_to_bottom_and_draws_its_figures(path, tmp_path, monkeypatch):
  before = jax_packages()
  notebook = execute(path, tmp_path / 'workdir', monkeypatch)
  assert jax_packages() == before  # The set-up cell's install swapped no jax package.
  figures = [cell for cell in notebook.cells if 'figure' in cell.metadata.get('tags', [])]
  assert figures
  for cell in figures:
    assert any('image/png' in output.get('data', {}) for output in cell.outputs), cell.source
  text = ''.join(text_of(cell) for cell in notebook.cells if cell.cell_type == 'code')
  assert 'lm from ' + ROOT in text  # The set-up cell installed this checkout.
  assert 'No TPU or GPU in this runtime' in text
  name = os.path.basename(path)
  if name == 'quickstart.ipynb':
    from lm.evaluation import builtin  # pylint: disable=import-outside-toplevel
    assert 'step 20' in text
    for task in builtin.BUILTIN_TASKS:
      assert f'| {task} |' in text
  if name == 'post_training.ipynb':  # Every stage ran to its end.
    for stage, step in (('pretrain', 20), ('sft', 4), ('dpo', 4), ('grpo', 4), ('ppo', 8)):
      assert f'--- {stage}, step {step}' in text
  if name == 'finetune_open_model.ipynb':
    assert 'imported ' in text and 'adapter parameters (rank 16)' in text
    assert '| task | imported | after LoRA |' in text
  if name == 'kernels.ipynb':
    assert '| flash attention | output' in text and '| selective scan | output' in text
