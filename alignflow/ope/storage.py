"""Save / load the OPE inputs for the evaluate stage: one .npz, no pickle.

Ragged per-response arrays are stored flattened with their lengths (offsets = cumsum of lengths).
Candidates are stored under their index (names may hold any character); names go in a unicode array.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .encoding import LoggedTokens, check_candidate
from .value_model import check_states


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1])


def save_inputs(path: str | Path, logged: LoggedTokens,
                candidate_logprobs: dict[str, list[np.ndarray]],
                candidate_states: dict[str, list[np.ndarray]] | None = None) -> Path:
    """Write logs, candidates' log-probs and (optional) state features to `path` (exact name)."""
    states = candidate_states or {}
    names = sorted(candidate_logprobs)
    arrays = {
        "lengths": logged.lengths,
        "rewards": logged.rewards,
        "behaviour_logprobs": np.concatenate(logged.behaviour_logprobs),
        "candidate_names": np.array(names, dtype=np.str_),
        "has_states": np.array([n in states for n in names], dtype=bool),
    }
    for i, name in enumerate(names):
        arrays[f"logprobs_{i}"] = np.concatenate(check_candidate(logged, name, candidate_logprobs[name]))
        if name in states:
            arrays[f"states_{i}"] = np.concatenate(check_states(logged, name, states[name]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # a file object stops np.savez from appending ".npz"
        np.savez(fh, **arrays)
    return path


def load_inputs(path: str | Path) -> tuple[LoggedTokens, dict[str, list[np.ndarray]],
                                           dict[str, list[np.ndarray]]]:
    """Inverse of `save_inputs`: (logged, candidate_logprobs, candidate_states).

    candidate_states holds only the candidates that had features (empty dict if none).
    """
    with np.load(Path(path), allow_pickle=False) as z:
        lengths = z["lengths"]
        logged = LoggedTokens(_split(z["behaviour_logprobs"], lengths), z["rewards"])
        names = [str(n) for n in z["candidate_names"]]
        logprobs, states = {}, {}
        for i, name in enumerate(names):
            logprobs[name] = _split(z[f"logprobs_{i}"], lengths)
            if z["has_states"][i]:
                states[name] = _split(z[f"states_{i}"], lengths + 1)
    return logged, logprobs, states
