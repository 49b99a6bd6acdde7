"""GRPO's data: prompts -> sampled completions -> rewards -> training rows.

The current policy completes each prompt `group_size` times (one sampling call for the
whole batch, with the KV cache); each completion's reward is computed on the host from
its text; its advantage is its reward against its own group's (GRPO, Shao et al. 2024,
sec. 4.1.2), so how hard a prompt is cancels out. The rows are prompt + completion, with
`loss_mask` on the completion (eos included), as SFT's, plus the advantage on every
token.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from lm import sampling
from lm.training import rewards

# Keeps the advantages of a group whose rewards are all equal at 0, not 0/0.
_STD_EPSILON = 1e-6


def group_advantages(rewards_n: np.ndarray, group_size: int) -> np.ndarray:
  """(reward - its group's mean) / the group's standard deviation; rows are grouped
  consecutively, `group_size` to a prompt."""
  groups = np.asarray(rewards_n, np.float32).reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  return (centred / (groups.std(axis=1, keepdims=True) + _STD_EPSILON)).reshape(-1)


class Rollouts:
  """Turns a batch of prompts (the 'grpo' pipeline's) into a GRPO training batch."""

  def __init__(self, model, tokenizer, grpo_config, seq_len: int):
    self.model, self.tokenizer, self.seq_len = model, tokenizer, seq_len
    self.reward = rewards.REWARDS[grpo_config.reward]
    self.group_size = grpo_config.group_size
    self.max_new_tokens = grpo_config.max_new_tokens
    self.temperature = grpo_config.temperature

  def __call__(self, params, prompts: dict, rng) -> tuple[dict, dict]:
    """`prompts`: 'example' [B] (each example as JSON text), 'prompt_tokens' [B, P] (bos +
    prompt, right-padded) and 'prompt_length' [B]. Returns the batch, [B * group_size,
    seq_len] arrays with each prompt's group in consecutive rows, and the rollout's
    metrics (means over rows)."""
    prompt_tokens_np = np.repeat(prompts['prompt_tokens'], self.group_size, axis=0)
    prompt_lengths_n = np.repeat(prompts['prompt_length'], self.group_size)
    new_nm, num_new_n = sampling.generate(
        params, jnp.asarray(prompt_tokens_np), jnp.asarray(prompt_lengths_n), rng,
        jnp.asarray([self.tokenizer.eos_id], jnp.int32), model=self.model,
        max_new_tokens=self.max_new_tokens, cache_length=self.seq_len,
        temperature=self.temperature, pad_id=self.tokenizer.pad_id)
    new_nm, num_new_n = np.asarray(new_nm), np.asarray(num_new_n)

    examples = [json.loads(str(text)) for text in prompts['example']]
    num_rows = len(prompt_lengths_n)
    batch = {name: np.zeros((num_rows, self.seq_len), np.int32)
             for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    rewards_n, finished_n = np.zeros(num_rows, np.float32), np.zeros(num_rows, bool)
    for row in range(num_rows):
      prompt_length, num_new = prompt_lengths_n[row], num_new_n[row]
      completion = new_nm[row, :num_new]
      finished_n[row] = num_new > 0 and completion[-1] == self.tokenizer.eos_id
      text = self.tokenizer.decode(completion[:-1] if finished_n[row] else completion)
      rewards_n[row] = self.reward(examples[row // self.group_size], text,
                                   bool(finished_n[row]))
      length = prompt_length + num_new
      batch['tokens'][row, :prompt_length] = prompt_tokens_np[row, :prompt_length]
      batch['tokens'][row, prompt_length:length] = completion
      batch['segment_ids'][row, :length] = 1
      batch['positions'][row, :length] = np.arange(length)
      batch['loss_mask'][row, prompt_length:length] = 1
    advantages_n = group_advantages(rewards_n, self.group_size)
    batch['advantages'] = np.repeat(advantages_n[:, None], self.seq_len, axis=1)
    metrics = {'reward': float(rewards_n.mean()), 'finished': float(finished_n.mean()),
               'completion_length': float(num_new_n.mean())}
    return batch, metrics


def rollout_key(seed: int, step: int, *, train: bool):
  """The sampling key of a training step, or of an evaluation batch: fixed by the seed,
  so a resumed run samples what the uninterrupted one would have."""
  return jax.random.fold_in(jax.random.key(seed), 2 * step + (0 if train else 1))
