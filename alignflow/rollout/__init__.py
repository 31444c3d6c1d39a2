from alignflow.rollout.engine import Completions, Sampling, TransformersEngine, make_engine, token_logprobs  # noqa: F401
