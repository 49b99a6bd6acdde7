"""Every notebook in colab/ runs top to bottom on CPU with its small settings."""

import glob
import json
import os
import subprocess
import sys

import pytest

from helpers import cpu_subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'colab', '*.ipynb')))


def notebook_script(path: str) -> str:
  """The code cells as one script; Colab's shell and magic lines (! and %) are dropped."""
  with open(path) as f:
    cells = json.load(f)['cells']
  code = [''.join(cell['source']) for cell in cells if cell['cell_type'] == 'code']
  return '\n\n'.join(
      f'# --- code cell {index}\n' + '\n'.join(
          line for line in source.splitlines() if not line.lstrip().startswith(('!', '%')))
      for index, source in enumerate(code, 1))


def test_there_is_a_notebook():
  assert NOTEBOOKS, 'colab/ holds no notebook'


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_with_small_settings(path, tmp_path):
  script = tmp_path / 'notebook.py'
  script.write_text(notebook_script(path))
  env = cpu_subprocess_env(LM_NOTEBOOK_SMALL='1', LM_NOTEBOOK_WORKDIR=str(tmp_path / 'workdir'),
                           PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  if os.path.basename(path) == 'quickstart.ipynb':
    from lm.evaluation import builtin
    assert 'step 20' in result.stdout, result.stdout[-2000:]
    for name in builtin.BUILTIN_TASKS:
      assert name in result.stdout
  if os.path.basename(path) == 'post_training.ipynb':  # Every stage ran to its end.
    for stage, step in (('pretrain', 20), ('sft', 4), ('dpo', 4), ('grpo', 4)):
      assert f'--- {stage}, step {step}' in result.stdout, result.stdout[-2000:]
