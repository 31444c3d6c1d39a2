"""VLLMEngine: rollouts from vLLM running in its own process and environment (`rl.engine: vllm`, docs/vllm.md).

Same interface as TransformersEngine (`generate`, `probe_logprobs`, `sync`, plus `close`). vLLM pins its own torch
and transformers, so it lives in `.venv-vllm` (built by `alignflow vllm-env` / scripts/vllm_env.sh) and runs
alignflow/rollout/vllm_worker.py as a subprocess; the two talk JSON lines over its stdin/stdout, and weights travel
as checkpoints on disk (vLLM's RPC cannot carry tensors, RECIPES.md §8):

* start: `models.save` of the trainer's model into a private temp dir; the worker loads it (fp32 stays fp32).
* generate: prompts are tokenized HERE (the same left-padded ids as TransformersEngine), only token ids cross the
  pipe, completions come back as token ids + the log-prob of each under the distribution actually sampled
  (logprobs_mode="processed_logprobs": log softmax(logits / T), top_k off; temperature 1 for greedy), and the
  Completions tensors are built exactly as TransformersEngine builds them (pad after EOS, mask up to and including it).
* sync(model): the trainer's weights -> a fresh checkpoint dir -> the worker's `reload_weights` (vllm_ext.WeightSync)
  -> prefix cache reset; then VERIFIED: vLLM's log-probs of the fixed probe sequence (prompt_logprobs) must match the
  trainer's `token_logprobs` within `tolerance`, else WeightSyncError.

Departures from TransformersEngine: sampling uses vLLM's RNG (seeded once from torch's global RNG at start-up, so a
run is reproducible given its seed, but its draws differ from transformers'); vLLM's CPU attention supports only
head sizes 32, 64, 80, ... (a model with head_dim 16, e.g. the smoke pipeline's, is refused at start-up).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch

from alignflow.rollout.engine import Completions, Sampling, WeightSyncError, token_logprobs  # noqa: F401
from alignflow.rollout.sync import SyncRecord

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_worker.py")
STAMP = ".alignflow-vllm-installed"               # written by scripts/vllm_env.sh when the build succeeded
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)   # vLLM 0.32 CPU attention backend
PROBE_TEXT = "<|user|>12+34=?<|assistant|>2+4=6;1+3=4;A:46<|end|>"     # the same probe as TransformersEngine


class VLLMError(RuntimeError):
    """The vLLM environment is missing, or its worker failed to start, to answer or to serve a request."""


def vllm_venv() -> Path:
    """$ALIGNFLOW_VLLM_VENV (relative to the checkout) or <checkout>/.venv-vllm: one per alignflow checkout."""
    return REPO / os.environ.get("ALIGNFLOW_VLLM_VENV", ".venv-vllm")


def vllm_python() -> Path:
    venv = vllm_venv()
    if not (venv / STAMP).exists() or not (venv / "bin" / "python").exists():
        raise VLLMError(f"no vLLM environment at {venv}: build it once with `alignflow vllm-env` "
                              f"(scripts/vllm_env.sh, a few minutes, ~3.4 GB)")
    return venv / "bin" / "python"


class _Worker:
    """The worker subprocess and its JSON-lines channel (one request, one reply)."""

    def __init__(self, python: Path, cfg: dict, log_path: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        env["PYTHONPATH"] = str(WORKER.parent)          # vllm_ext only; alignflow's dependencies are not there
        for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on CPU
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in the worker: one vLLM import, not 3
                           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
            env.setdefault(key, value)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([str(python), str(WORKER), json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=str(log_path.parent),
                                     text=True, bufsize=1, start_new_session=True)  # own group: close() ends it all
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="vllm-worker-reader").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)                         # EOF: the worker exited

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def reply(self, timeout: float) -> dict:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise VLLMError(f"vLLM worker did not answer within {timeout:.0f} s; its log:\n{self.log_tail()}")
        if line is None:
            raise VLLMError(f"vLLM worker exited (code {self.proc.wait()}); its log ({self.log_path}):\n"
                                  f"{self.log_tail()}")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise VLLMError(f"vLLM worker failed:\n{msg.get('error')}")
        return msg

    def request(self, cmd: str, timeout: float = 600.0, **payload) -> dict:
        if self.proc.poll() is not None:
            raise VLLMError(f"vLLM worker is not running (code {self.proc.returncode}):\n{self.log_tail()}")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **payload}) + "\n")
        self.proc.stdin.flush()
        return self.reply(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "shutdown"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:                     # did not leave in time: end its process group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()


def _shutdown(worker: _Worker, tmp: Path) -> None:
    worker.close()
    shutil.rmtree(tmp, ignore_errors=True)


class VLLMEngine:
    name = "vllm"

    def __init__(self, model, tokenizer, probe_text: str = PROBE_TEXT, tolerance: float | None = None,
                 seed: int | None = None, gpu_memory_utilization: float = 0.2, startup_timeout: float = 900.0):
        """`tolerance`: max |log-prob difference| on the probe that `sync` accepts (default 1e-3 in fp32, 5e-2 in
        16-bit). `seed`: vLLM's sampling seed (default: drawn from torch's global RNG, so torch.manual_seed fixes it).
        `gpu_memory_utilization`: on CPU, the share of the NUMA node's RAM vLLM may claim (its default 0.92 fails)."""
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim not in CPU_HEAD_SIZES and not torch.cuda.is_available():
            raise ValueError(f"vLLM's CPU attention supports head sizes {CPU_HEAD_SIZES}; this model has "
                             f"{head_dim} (hidden_size {config.hidden_size} / {config.num_attention_heads} heads): "
                             f"use rl.engine: transformers, or a model shape with a supported head size")
        python = vllm_python()                           # fails early (no temp files) when the env is missing
        dtype = next(model.parameters()).dtype
        self.tokenizer, self.device = tokenizer, next(model.parameters()).device
        from alignflow.models import eos_ids
        self.eos_ids = eos_ids(model, tokenizer)         # vLLM's stop_token_ids: every eos id, not only the tokenizer's
        self.tolerance = tolerance if tolerance is not None else (1e-3 if dtype == torch.float32 else 5e-2)
        self.max_model_len = int(config.max_position_embeddings)
        self.probe = tokenizer(probe_text, return_tensors="pt")["input_ids"].to(self.device)   # [1, L]
        self._synced = SyncRecord(self.name, model, self.tolerance)   # the trainer as of the last sync
        self._tmp = Path(tempfile.mkdtemp(prefix="alignflow-vllm-"))
        self._weights_dir: Path | None = None
        self._version = 0
        start = time.perf_counter()
        from alignflow import models
        first = self._tmp / "weights-0"
        models.save(model, tokenizer, first)             # config + tokenizer + weights: what vLLM starts from
        self._weights_dir = first
        seed = int(torch.randint(2**31 - 1, ()).item()) if seed is None else seed
        cfg = dict(model=str(first), dtype=str(dtype).removeprefix("torch."), max_model_len=self.max_model_len,
                   seed=seed, gpu_memory_utilization=gpu_memory_utilization)
        self._worker = _Worker(python, cfg, self._tmp / "worker.log")
        self._finalizer = weakref.finalize(self, _shutdown, self._worker, self._tmp)   # also at interpreter exit
        try:
            ready = self._worker.reply(startup_timeout)
        except BaseException:
            self._finalizer()
            raise
        self.startup_s = time.perf_counter() - start
        print(f"vllm engine: up in {self.startup_s:.1f} s (vLLM {ready['vllm']}, engine init {ready['init_s']:.1f} s,"
              f" dtype {cfg['dtype']}, seed {seed}); worker log {self._worker.log_path}", file=sys.stderr, flush=True)

    # ---- rollouts
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> Completions:
        from alignflow.models import encode_prompts
        tok = self.tokenizer
        enc = encode_prompts(tok, prompts)               # rendered chat text: no added special tokens (one BOS)
        if enc["input_ids"].shape[1] + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt ({enc['input_ids'].shape[1]} tokens) + max_new_tokens "
                             f"({sampling.max_new_tokens}) exceed the model's {self.max_model_len} positions")
        prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        out = self._worker.request("generate", prompt_ids=prompt_ids, n=n, temperature=sampling.temperature,
                                   greedy=sampling.greedy, max_tokens=sampling.max_new_tokens, eos=self.eos_ids)
        B, T = len(prompts) * n, max(len(t) for t in out["token_ids"])
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        completion = torch.full((B, T), pad, dtype=torch.long)                   # [B, T] pad after EOS
        logprobs = torch.zeros(B, T)                                              # [B, T] 0 on padding
        for i, (ids, lps) in enumerate(zip(out["token_ids"], out["logprobs"])):
            completion[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, :len(lps)] = torch.tensor(lps)
        # vLLM stops at EOS (kept as the last token), so the generated tokens are exactly the non-padding ones
        completion_mask = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids in out["token_ids"]])
        ids = enc["input_ids"].repeat_interleave(n, 0)
        mask = enc["attention_mask"].repeat_interleave(n, 0)
        return Completions(input_ids=torch.cat([ids, completion], 1).to(self.device),
                           attention_mask=torch.cat([mask, completion_mask], 1).to(self.device),
                           completion_mask=completion_mask.to(self.device), logprobs=logprobs.to(self.device),
                           texts=tok.batch_decode(completion, skip_special_tokens=True),
                           prompt_index=torch.arange(len(prompts)).repeat_interleave(n).to(self.device))

    def score(self, ids: list[list[int]]) -> list[list[float]]:
        """vLLM's log p(ids[t] | ids[:t]) for t >= 1 (temperature 1), through prompt_logprobs."""
        return self._worker.request("score", ids=ids)["logprobs"]

    def probe_logprobs(self) -> torch.Tensor:
        return torch.tensor(self.score(self.probe.tolist()), device=self.device)   # [1, L - 1]

    # ---- weights
    def decode_probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe's first half continued greedily by vLLM's sampler (decode steps, not prompt_logprobs' prefill).
        -> (ids [1, P + T'], vLLM's temperature-1 log-probs [1, T'])"""
        P = max(1, self.probe.shape[1] // 2)
        prefix = self.probe[0, :P].tolist()
        out = self._worker.request("generate", prompt_ids=[prefix], n=1, temperature=1.0, greedy=True,
                                   max_tokens=self.probe.shape[1] - P, eos=self.eos_ids)
        ids = torch.tensor([prefix + out["token_ids"][0]], device=self.device)
        return ids, torch.tensor([out["logprobs"][0]], device=self.device)

    def sync(self, trainer_model) -> float:
        """Push the trainer's weights into vLLM, then verify them (alignflow.rollout.sync): the probe's
        prompt_logprobs, and a greedy continuation through vLLM's decode, against the trainer's log-probs, plus
        "moved with the trainer since the last sync". Returns max |diff|."""
        self._push_weights(trainer_model)
        ids, decoded = self.decode_probe()
        with torch.no_grad():
            mask = torch.ones_like(self.probe)
            expected = token_logprobs(trainer_model, self.probe, mask, self.probe.shape[1] - 1).float()
            scored = token_logprobs(trainer_model, ids, torch.ones_like(ids), decoded.shape[1]).float()
        diff = self._synced.verify(self.probe_logprobs(), expected, (decoded, scored))
        self._synced.record(trainer_model, expected)
        return diff

    def check_synced(self) -> None:
        """Before sampling: WeightSyncError if the trainer's weights changed since the last sync."""
        self._synced.check_unchanged()

    def _push_weights(self, model) -> None:
        self._version += 1
        path = self._tmp / f"weights-{self._version}"
        model.save_pretrained(path, safe_serialization=True)
        self._worker.request("load", path=str(path))     # reload_weights + reset_prefix_cache
        previous, self._weights_dir = self._weights_dir, path
        if previous is not None and self._version > 1:   # weights-0 holds the config vLLM was started from
            shutil.rmtree(previous, ignore_errors=True)

    # ---- lifetime
    def close(self) -> None:
        """Stop the worker (and vLLM with it) and delete the temp checkpoints. Also runs when the engine is
        garbage-collected or the interpreter exits."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
