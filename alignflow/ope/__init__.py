"""Off-policy evaluation and selection of token-level LLM policies (SCOPE-RL 0.2.1 underneath).

Pure numpy / scikit-learn / SCOPE-RL; SCOPE-RL itself is imported lazily on first use.
"""
from .encoding import LoggedTokens, encode_two_action
from .estimators import ESTIMATOR_CLASSES, MODEL_BASED, estimate, kish_ess
from .metrics import selection_metrics
from .selection import choose, decide, promotion_gate, sharpe_ratio_at_k
from .storage import load_inputs, save_inputs
from .value_model import fit_q_hat
from .vsdr import vsdr_report, vsdr_scores

__all__ = [
    "ESTIMATOR_CLASSES", "MODEL_BASED", "LoggedTokens", "choose", "decide", "encode_two_action", "estimate",
    "fit_q_hat", "kish_ess", "load_inputs", "promotion_gate", "save_inputs", "selection_metrics",
    "sharpe_ratio_at_k", "vsdr_report", "vsdr_scores",
]
