"""Memory per chip of large configs on TPU slices, compiled here without a TPU
(lm/aot.py), as a table.

  python -m experiments.benchmark_memory      # Llama-3-8B's shape and a 1B hybrid
  python -m experiments.benchmark_memory --models=hybrid_1b --topologies=v5e-16

Each row compiles the config's full train step (AdamW, bf16 compute) for the slice with
every chip on the FSDP axis (or --tensor chips to a tensor-parallel group) and
--rows_per_chip rows of the config's sequence length per data-parallel chip, and reports
the compiler's bytes per chip against the chip's HBM.
"""

from absl import app, flags

from experiments.configs import hybrid, open_models
from lm import aot

MODELS = {
    'llama3_8b': lambda: open_models.get_config('llama3_8b'),
    'hybrid_1b': lambda: hybrid.get_config('1b'),
}

_MODELS = flags.DEFINE_list('models', list(MODELS), 'Rows: ' + ', '.join(MODELS))
_TOPOLOGIES = flags.DEFINE_list('topologies', ['v5e-16', 'v5e-64', 'v5e-256', 'v5p-128'],
                                'Slices.')
_REMAT = flags.DEFINE_string('remat', 'full', 'config.model.remat.')
_ROWS_PER_CHIP = flags.DEFINE_integer('rows_per_chip', 1, 'Sequences per chip per step.')
_ATTENTION = flags.DEFINE_string('attention', 'pallas', 'config.model.attention.')
_TENSOR = flags.DEFINE_integer('tensor', 1, 'config.mesh.tensor; fsdp takes the other chips.')


def main(argv):
  del argv
  print(f'remat={_REMAT.value}, attention={_ATTENTION.value}, mesh: tensor={_TENSOR.value},'
        f' fsdp over the other chips; {_ROWS_PER_CHIP.value} row(s) per chip')
  print('| model | slice | parameters | T | global batch | params + optimizer | activations'
        ' and temporaries | total per chip | HBM | fits | compile |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for model in _MODELS.value:
    for topology in _TOPOLOGIES.value:
      config = MODELS[model]()
      target = aot.target(topology)
      config.model.update(remat=_REMAT.value, attention=_ATTENTION.value)
      config.mesh.update(data=1, fsdp=-1, tensor=_TENSOR.value)
      # Rows split over the fsdp chips; each tensor-parallel group shares its rows.
      config.data.batch_size = _ROWS_PER_CHIP.value * len(target.devices) // _TENSOR.value
      plan = aot.plan(config, target)
      [train] = plan.programs
      state = train.parts['params'] + train.parts['optimizer state']
      print(f'| {model} | {topology} | {plan.parameters / 1e9:.2f}B | {config.data.seq_len} |'
            f' {config.data.batch_size} | {state / aot.GiB:.2f} GiB |'
            f' {train.temporaries / aot.GiB:.2f} GiB | {train.total / aot.GiB:.2f} GiB |'
            f' {target.hbm_bytes / aot.GiB:.2f} GiB | {"yes" if train.fits else "no"} |'
            f' {train.seconds:.0f} s |', flush=True)


if __name__ == '__main__':
  app.run(main)
