"""The vLLM side of VLLMEngine: runs in .venv-vllm (`scripts/vllm_env.sh`), never in alignflow's own environment.

    .venv-vllm/bin/python alignflow/rollout/vllm_worker.py '{"model": DIR, "dtype": "float32", ...}'

It imports only vLLM and vllm_ext.py (its own folder is on the path; nothing of alignflow, whose dependencies this
environment does not have). Protocol: one JSON object per line, requests on stdin, replies on the ORIGINAL stdout;
fd 1 itself is pointed at stderr first, so vLLM's logs (and its engine-core process, which inherits fd 1) cannot
corrupt the channel. Every reply is {"ok": true, ...} or {"ok": false, "error": traceback}. Token ids in, token ids
out: the tokenizer lives on the trainer's side only.

    ready     (sent once the engine is up)   -> {"ok", "init_s", "vllm"}
    generate  {prompt_ids, n, temperature, greedy, max_tokens, eos (an id or a list: every stop id)}
              -> {"token_ids": [[...]] * len(prompt_ids) * n, prompt-major, "logprobs": same shape}
    score     {ids: [[...]]}   -> {"logprobs": [[log p(ids[i][t] | ids[i][:t]) for t >= 1]]}  (temperature 1)
    load      {path}           -> {"tensors", "load_s"}   reload weights from a checkpoint dir, then reset prefix cache
    shutdown
"""
import json
import os
import sys
import time
import traceback


def _protocol_channel():
    """A private copy of stdout for replies; fd 1 becomes stderr for everything else (and for child processes)."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", buffering=1)   # os.dup: not inherited by vLLM's processes
    os.dup2(2, 1)
    return channel


def _generate(llm, req):
    from vllm import SamplingParams
    # logprobs=0: only the sampled token's log-prob; with logprobs_mode="processed_logprobs" (set at start-up) that
    # is log softmax(logits / temperature), the distribution actually sampled from (temperature 1 when greedy).
    n, prompt_ids = req["n"], req["prompt_ids"]
    if req["greedy"]:   # vLLM refuses n > 1 with greedy sampling: n copies of each prompt instead (same result)
        n, prompt_ids = 1, [ids for ids in prompt_ids for _ in range(n)]
    params = SamplingParams(n=n, temperature=0.0 if req["greedy"] else req["temperature"], top_k=-1, top_p=1.0,
                            max_tokens=req["max_tokens"], logprobs=0, detokenize=False,
                            stop_token_ids=list(req["eos"]) if isinstance(req["eos"], list) else [req["eos"]])
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    token_ids, logprobs = [], []
    for out in outs:                                               # prompt order
        for o in sorted(out.outputs, key=lambda o: o.index):       # its n samples
            token_ids.append(list(o.token_ids))
            logprobs.append([d[t].logprob for d, t in zip(o.logprobs, o.token_ids)])
    return {"token_ids": token_ids, "logprobs": logprobs}


def _score(llm, req):
    from vllm import SamplingParams
    # prompt log-probs are computed from the raw logits (temperature 1) and skip reading the prefix cache
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in req["ids"]], params, use_tqdm=False)
    return {"logprobs": [[d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
                         for out, ids in zip(outs, req["ids"])]}


def _load(llm, req):
    start = time.perf_counter()
    counts = llm.collective_rpc("load_from_dir", args=(os.path.abspath(req["path"]),))
    if not llm.reset_prefix_cache():   # cached KV blocks were computed with the old weights
        raise RuntimeError("reset_prefix_cache() refused (requests still running)")
    return {"tensors": counts[0], "load_s": time.perf_counter() - start}


def main() -> None:
    channel = _protocol_channel()
    cfg = json.loads(sys.argv[1])
    start = time.perf_counter()
    from vllm import LLM, __version__
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"], seed=cfg["seed"],
              gpu_memory_utilization=cfg.get("gpu_memory_utilization", 0.2),  # on CPU: share of the node's RAM
              enforce_eager=True, skip_tokenizer_init=True, generation_config="vllm",
              logprobs_mode="processed_logprobs", worker_extension_cls="vllm_ext.WeightSync",
              distributed_executor_backend="uni")
    channel.write(json.dumps({"ok": True, "init_s": time.perf_counter() - start, "vllm": __version__}) + "\n")
    handlers = {"generate": _generate, "score": _score, "load": _load}
    for line in sys.stdin:                       # EOF (the trainer went away) ends the worker too
        req = json.loads(line)
        if req["cmd"] == "shutdown":
            break
        try:
            reply = {"ok": True, **handlers[req["cmd"]](llm, req)}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        channel.write(json.dumps(reply) + "\n")
    channel.write(json.dumps({"ok": True, "bye": True}) + "\n")
    channel.flush()
    # leaving lets LLM's finalizer stop the engine-core process


if __name__ == "__main__":   # required: vLLM starts its engine core with multiprocessing (spawn)
    main()
