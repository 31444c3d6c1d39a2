"""Prefect tasks that run policies over fixed data: the core steps in alignflow/steps/policies.py."""
from prefect import task

from alignflow.steps import policies as steps
from alignflow.steps.policies import candidate_dirs  # noqa: F401  (a plain listing, not a task)

log_behaviour = task(steps.log_behaviour)
score_logged = task(steps.score_logged)
ood_scores = task(steps.ood_scores)
true_values = task(steps.true_values)
