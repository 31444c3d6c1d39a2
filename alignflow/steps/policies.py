"""Steps that run policies over fixed data (no Prefect here; tasks/policies.py wraps them): logging the behaviour policy, teacher-forced scoring of logged
tokens under each candidate, OOD scores of the real split, and true values for `evaluate`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from alignflow import models
from alignflow.data.rows import TaskRows
from alignflow.evaluation import metric_summary, score
from alignflow.models import chat_prompt
from alignflow.rollout import Sampling, TransformersEngine, token_logprobs


def candidate_dirs(layout) -> dict[str, Path]:
    """SFT plus every RL candidate, in a stable order."""
    dirs = {"sft": layout.sft}
    dirs.update({p.name: p for p in sorted(layout.rl.iterdir()) if (p / "config.json").exists()})
    return dirs


def log_behaviour(policy_dir: Path, task: TaskRows, reward, n: int, max_new_tokens: int,
                  temperature: float, seed: int, device: str = "cpu", dtype: str = "fp32") -> tuple[pd.DataFrame, dict]:
    """Sample the behaviour policy once per logged prompt (cycling to n), keeping the per-token log-probs of
    the distribution actually sampled from (temperature as configured, top_k = 0, top_p = 1), and the
    pipeline's reward of each response. -> (logs, reward errors per function)"""
    torch.manual_seed(seed)
    model, tokenizer = models.load(policy_dir, device, dtype)
    reps = [i % len(task) for i in range(n)]
    engine, rows, errors = TransformersEngine(model, tokenizer), [], {}
    for start in range(0, n, 250):
        idx = reps[start:start + 250]
        chunk = task.take(idx)
        out = engine.generate([chat_prompt(tokenizer, m) for m in chunk.messages], 1, Sampling(max_new_tokens, temperature))
        result = reward(chunk.prompts, out.texts, chunk.columns)
        rewards = result.total
        for label, count in result.errors.items():
            errors[label] = errors.get(label, 0) + count
        T = out.completion_mask.shape[1]
        for row, i in enumerate(idx):
            length = int(out.completion_mask[row].sum())
            prompt_ids = out.input_ids[row, :-T][out.attention_mask[row, :-T].bool()].tolist()
            rows.append({"prompt": task.prompts[i], "prompt_ids": prompt_ids,
                         "completion_ids": out.completion_ids[row, :length].tolist(),
                         "behaviour_logprobs": out.logprobs[row, :length].double().tolist(),
                         "completion": out.texts[row], "reward": rewards[row]})
    return pd.DataFrame(rows), errors


def _padded(rows: pd.DataFrame, pad_id: int, start: int, stop: int):
    chunk = rows.iloc[start:stop]
    P = max(len(p) for p in chunk["prompt_ids"])
    T = max(len(c) for c in chunk["completion_ids"])
    ids = torch.full((len(chunk), P + T), pad_id)
    mask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(zip(chunk["prompt_ids"], chunk["completion_ids"])):
        ids[r, P - len(p):P], mask[r, P - len(p):P] = torch.tensor(p), 1          # left-padded prompt
        ids[r, P:P + len(c)], mask[r, P:P + len(c)] = torch.tensor(c), 1          # right-padded completion
    return chunk, ids, mask, T


@torch.no_grad()
def score_logged(policy_dir: Path, logged: pd.DataFrame, state_dim: int = 16, seed: int = 0,
                 device: str = "cpu", dtype: str = "fp32"):
    """Teacher-forced log-probs of the logged tokens under a candidate, and per-position state features for the
    DM/DR value model: the candidate's last hidden state before each token, reduced by a fixed random projection."""
    model, tokenizer = models.load(policy_dir, device, dtype)
    model.eval()
    proj = torch.randn(model.config.hidden_size, state_dim, generator=torch.Generator().manual_seed(seed))
    proj /= model.config.hidden_size ** 0.5
    logprobs, states = [], []
    for start in range(0, len(logged), 250):
        chunk, ids, mask, T = _padded(logged, tokenizer.pad_token_id, start, start + 250)
        ids, mask = ids.to(model.device), mask.to(model.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        logits = model.lm_head(hidden[:, -T - 1:-1]).float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, -T:, None]).squeeze(-1).cpu()
        feats = (hidden[:, -T - 1:].float() @ proj.to(model.device)).cpu()                                       # [b, T + 1, S]
        for r, c in enumerate(chunk["completion_ids"]):
            logprobs.append(lp[r, :len(c)].double().numpy())
            states.append(feats[r, :len(c) + 1].double().numpy())
    return logprobs, states


@torch.no_grad()
def ood_scores(policy_dir: Path, real_prompts: list, reference_prompts: list, max_new_tokens: int,
               device: str = "cpu", dtype: str = "fp32") -> dict:
    """How foreign the unlabelled real prompts are to a policy (VSDR's OOD side), from its own behaviour there:
    mean token entropy of its sampled responses, their negative mean log-likelihood, and the distance of the
    real prompts' mean final hidden state to that of in-distribution prompts (in units of their spread).
    Prompts are user texts or chat message lists."""
    model, tokenizer = models.load(policy_dir, device, dtype)
    model.eval()
    engine = TransformersEngine(model, tokenizer)
    out = engine.generate([chat_prompt(tokenizer, p) for p in real_prompts], 1, Sampling(max_new_tokens, 1.0))
    T = out.completion_mask.shape[1]
    logp, entropy = token_logprobs(model, out.input_ids, out.attention_mask, T, return_entropy=True)
    m = out.completion_mask.float()
    per_token = lambda x: float((x * m).sum() / m.sum().clamp(min=1))  # noqa: E731

    def prompt_states(prompts):
        enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False).to(model.device)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return model.model(**enc, position_ids=pos).last_hidden_state[:, -1]
    real, ref = prompt_states(real_prompts), prompt_states(reference_prompts)
    spread = ref.std(0).mean().clamp(min=1e-6)
    return {"entropy": per_token(entropy), "neg_loglik": -per_token(logp),
            "hidden_distance": float((real.mean(0) - ref.mean(0)).norm() / spread)}


EXAMPLES = 5   # greedy completions kept per split and policy (evaluate's report shows what the scores count)


def true_values(policy_dir: Path, splits: dict[str, TaskRows], reward, metrics, value_samples: int,
                max_new_tokens: int, batch_size: int, seed: int, device: str = "cpu",
                dtype: str = "fp32") -> tuple[dict, np.ndarray]:
    """The stand-in for an online test: per split the greedy mean of the reward (`<split>_score`) and of each
    metric; on the eval split also `value_samples` samples per prompt under the logging settings (T = 1, top_k 0):
    the sampled value whose per-sample returns OPS compares against, and each metric's mean@k / pass@k."""
    torch.manual_seed(seed)
    model, tokenizer = models.load(policy_dir, device, dtype)
    model.eval()
    out: dict = {"metrics": {}, "examples": {}}
    for name, rows in splits.items():
        s = score(model, tokenizer, rows, reward, metrics=metrics, max_new_tokens=max_new_tokens, batch_size=batch_size)
        out[f"{name}_score"] = s["value"]
        out["metrics"][name] = metric_summary(s["per_function"], 1, greedy=True)
        out["examples"][name] = [{"prompt": p, "completion": t, "reward": float(r)}
                                 for p, t, r in zip(rows.prompts[:EXAMPLES], s["texts"], s["rewards"])]
    sampled = score(model, tokenizer, splits["eval"], reward, metrics=metrics, max_new_tokens=max_new_tokens,
                    greedy=False, n=value_samples, batch_size=batch_size)
    out["sampled_value"] = sampled["value"]
    for label, figures in metric_summary(sampled["per_function"], value_samples, greedy=False).items():
        out["metrics"]["eval"][label].update(figures)
    return out, sampled["rewards"]


def changed_mask(reference: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Elements whose bf16 value differs from the reference's (changes below bf16 rounding do not count)."""
    return reference.to(torch.bfloat16) != new.to(torch.bfloat16)


@torch.no_grad()
def changed_share(reference_dir: Path, policy_dir: Path) -> float:
    """Share of parameter elements whose bf16 value differs from the reference's: how much of the model an update
    touched ("RL finetunes small subnetworks" compares in bf16, below which fp32 optimiser noise sits)."""
    from safetensors import safe_open
    changed = total = 0
    ref_files = sorted(Path(reference_dir).glob("*.safetensors"))
    for ref_file in ref_files:
        with safe_open(ref_file, "pt") as ref, safe_open(Path(policy_dir) / ref_file.name, "pt") as new:
            for name in ref.keys():
                a, b = ref.get_tensor(name), new.get_tensor(name)
                changed += int(changed_mask(a, b).sum())
                total += a.numel()
    return changed / total if total else 0.0
