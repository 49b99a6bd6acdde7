"""Training objectives by name (`config.train.objective`).

An objective (lm/objectives/base.py) says what its data are, how they become rows, what
its loss is and whether it needs a reference model or rollouts; the loop, the step, the
config checks and the pipeline are the same for all. Adding one is a module here and a
line below.
"""

from lm.objectives import base, dpo, grpo, pretrain, sft

Objective = base.Objective

OBJECTIVES: dict[str, Objective] = {
    'pretrain': pretrain.Pretrain(),
    'sft': sft.SFT(),
    'dpo': dpo.DPO(),
    'grpo': grpo.GRPO(),
}
