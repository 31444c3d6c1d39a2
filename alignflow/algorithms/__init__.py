"""On-policy methods as presets over four registries (see core.py). Importing this package registers them."""
from alignflow.algorithms.core import (ADVANTAGES, ALGORITHMS, LOSS_AGGS, NEEDS, POLICY_LOSSES, ROLLOUTS,  # noqa: F401
                                       Algorithm, RewardHistory, RolloutBatch, RolloutSource)
from alignflow.algorithms import (grpo, dr_grpo, dapo, srppo, dcpo, gopd, opsd, chord, opmd, asymre,  # noqa: F401
                                  empg, pope)  # (registers)
