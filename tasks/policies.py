"""Prefect tasks that run policies over fixed data: the core steps in alignflow/steps/policies.py."""
from tasks.retry import stage_task

from alignflow.steps import policies as steps
from alignflow.steps.policies import candidate_dirs  # noqa: F401  (a plain listing, not a task)

log_behaviour = stage_task(steps.log_behaviour)
score_logged = stage_task(steps.score_logged)
ood_scores = stage_task(steps.ood_scores)
true_values = stage_task(steps.true_values)
changed_share = stage_task(steps.changed_share)
