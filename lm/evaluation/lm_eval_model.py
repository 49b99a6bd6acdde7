"""lm as a model of lm-evaluation-harness, so any of its tasks whose data are on disk runs
on an lm checkpoint:

  python -m experiments.lm_eval --model lm --model_args workdir=W[,step=N,batch_size=16] \
      --tasks arc_easy --include_path DIR_OF_TASK_YAMLS

Log-likelihoods, rolling log-likelihoods and generations come from lm.evaluation.scoring,
the scorer experiments.evaluate uses, which computes them as the harness's Hugging Face
backend does, in the model's own context (`max_length` lowers it). Requires the `eval`
extra (lm_eval).
"""

from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
# The harness fills its model registry with its own models (hf, vllm, ...) only while the
# registry is empty: registering lm first would hide them from the same process.
import lm_eval.models  # noqa: F401  pylint: disable=unused-import
from tqdm import tqdm

from lm import sharding
from lm.errors import ConfigError
from lm.evaluation import scoring
from lm.training import checkpointing


MODEL_ARGS = ('workdir', 'step', 'batch_size', 'max_length')  # What --model_args may set.


@register_model('lm')
class LmEvalModel(LM):

  # --model_args, checked whichever way the harness passes them: a misspelt argument would
  # otherwise be dropped unread. (The harness's own settings, such as --batch_size and
  # --device, come as additional_config.)
  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config=None):
    check_model_args(utils.simple_parse_args_string(arg_string or ''))
    return super().create_from_arg_string(arg_string, additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    check_model_args(arg_dict or {})
    return super().create_from_arg_obj(arg_dict, additional_config)

  def __init__(self, workdir: str, step=None, batch_size=16, max_length=None, **_):
    super().__init__()
    self.run = checkpointing.restore_for_inference(workdir, None if step is None else int(step))
    self.scorer = scoring.Scorer.for_run(
        self.run, max_length=None if max_length is None else int(max_length),
        batch_size=int(batch_size))
    self.max_length = self.scorer.max_length

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    """Requests that share a context (a multiple-choice question's choices) are scored
    from one pass over it."""
    by_context = {}
    for index, request in enumerate(requests):
      context, continuation = request.args
      by_context.setdefault(context, []).append((index, continuation))
    with sharding.activate(self.run.mesh):
      scored = self.scorer.choice_log_likelihoods(
          [(context, [c for _, c in members]) for context, members in by_context.items()])
    results = [None] * len(requests)
    for members, scores in zip(by_context.values(), scored):
      for (index, _), score in zip(members, scores):
        results[index] = (score.log_likelihood, score.greedy)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    with sharding.activate(self.run.mesh):
      return [self.scorer.document_log_likelihood(request.args[0])[0]
              for request in tqdm(requests, disable=disable_tqdm)]

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Requests grouped by their generation settings, each group sampled in batches."""
    groups = {}
    for index, request in enumerate(requests):
      context, settings = request.args
      until = settings.get('until', [])
      until = (until,) if isinstance(until, str) else tuple(until)
      temperature = (float(settings.get('temperature', 1.0)) if settings.get('do_sample')
                     else 0.0)
      key = (until, int(settings.get('max_gen_toks', 256)), temperature)
      groups.setdefault(key, []).append((index, context))
    completions = [None] * len(requests)
    with sharding.activate(self.run.mesh):
      for (until, max_new_tokens, temperature), members in groups.items():
        texts = self.scorer.complete([context for _, context in members],
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     seed=0, stops=until)
        for (index, _), completion in zip(members, texts):
          completions[index] = completion.text
    return completions


def check_model_args(args: dict) -> None:
  """Raises ConfigError naming an argument `lm` does not take, or a missing workdir."""
  unknown = sorted(set(args) - set(MODEL_ARGS))
  if unknown:
    raise ConfigError(f'--model_args: {unknown[0]!r} is not an argument of lm (it takes'
                      f' {", ".join(MODEL_ARGS)})')
  if 'workdir' not in args:
    raise ConfigError('--model_args needs workdir=<the run directory>')
