"""On-policy methods as presets over three registries (see core.py). Importing this package registers them."""
from alignflow.algorithms.core import (ADVANTAGES, ALGORITHMS, LOSS_AGGS, POLICY_LOSSES, Algorithm,  # noqa: F401
                                       RolloutBatch)
from alignflow.algorithms import grpo  # noqa: F401  (registers)
