"""Serving a run over HTTP: `runner.py` drives the generation engine (lm/engine) from one
thread, `openai_api.py` is the OpenAI-compatible FastAPI app over it, `logprobs.py` the
prompt log-probabilities that `echo` and `logprobs` report. experiments/serve.py starts
it; docs/serving.md is the guide."""
