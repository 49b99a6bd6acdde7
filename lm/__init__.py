"""lm: a JAX/Flax research codebase for language models.

Dimension letters, used in names (`x_btd`), einsum strings and shape comments across
the library, the kernels and the tests; each letter means one thing everywhere:

  B batch (rows)                T sequence / query length     S key / cache length
  D model width                 V vocabulary                  F MLP hidden width
  N query heads                 K key-value heads             H head dimension
  G query heads per kv head     E Mamba inner channels        P selective-scan state size
  R Mamba step-size rank        W convolution width           M new tokens (sampling)
  C choices (evaluation)
"""
