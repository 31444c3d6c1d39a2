"""StaticCacheEngine: fast batched rollouts from a transformers Qwen2/Llama-family model (issue 7).

Same interface as TransformersEngine (`generate`, `probe_logprobs`, `sync`), own decode loop over the HF model's
modules (alignflow/decoder.py, the functional decoder, reading the model's own parameters):

* prefill: one eager pass over the left-padded prompts, writing K/V into a preallocated static cache
  [B, KV, S, D] per layer;
* decode: one step = embedding, per layer [RMSNorm + qkv + rotary] -> cache write at the step's column -> SDPA
  over the live columns (rounded up to a bucket of 64) -> [o_proj + residual + RMSNorm + MLP + residual], final
  norm + lm_head + sampling, all on device tensors (token, position, column, step are device scalars that the step
  advances itself), so on CUDA each step is one CUDA-graph replay (one graph per live-length bucket) of code whose
  pointwise parts torch.compile fused. Sampling is the exponential race (Gumbel-max) on the temperature-scaled
  logits, i.e. exactly softmax(logits / T) (top_k = 0, top_p = 1); greedy is argmax. The returned log-prob of
  each token is log softmax(logits / T) at the token (temperature 1 for greedy, as TransformersEngine returns).
* CPU: the same step code, eagerly (no compile, no graphs) - slow, but what the unit tests check.

After EOS a row keeps stepping but emits pad with log-prob 0 (as `generate` does); the loop stops early once every
row has finished (checked every 32 steps).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from alignflow.rollout.engine import Completions, Sampling, token_logprobs
from alignflow.rollout.sync import SyncRecord
from alignflow import decoder

BUCKET = 64


def _set_recompile_limit(n: int = 64) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


class StaticCacheEngine:
    name = "static"

    def __init__(self, model, tokenizer=None, probe_text: str = "<|user|>12+34=?<|assistant|>2+4=6;1+3=4;A:46<|end|>",
                 tolerance: float | None = None, dtype: torch.dtype | None = None, compile: bool | None = None,
                 cuda_graphs: bool | None = None, eos_token_id: int | None = -1, pad_token_id: int | None = -1,
                 probe_ids: torch.Tensor | None = None, fuse_weights: bool = True):
        """`model` is used in place (weights shared: a sync from the same object only verifies) unless `dtype`
        differs from its dtype, in which case the engine keeps its own copy in `dtype` and `sync` copies into it.

        fuse_weights: keep [q;k;v] and [gate;up] copies of the projection weights (one GEMM each per layer instead
        of three and two; +2/3 of the MLP weights in memory). The copies are refreshed by `sync` and whenever an
        in-place update of the model's parameters is seen (their version counters), and the probe that `sync`
        verifies runs through them."""
        from alignflow import lora
        trainer = model
        model = lora.merged(model)  # a LoRA policy: sample from a merged copy, refreshed by every sync
        self.spec = decoder.decoder_spec(model)
        model_dtype = next(model.parameters()).dtype
        if dtype is not None and dtype != model_dtype:
            model = copy.deepcopy(model).to(dtype)
        self.model, self.tokenizer = model, tokenizer
        self.dtype = next(self.model.parameters()).dtype
        self.device = next(self.model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        # fp32 under TF32 (models.load turns it on for CUDA): compiled and eager kernels round differently, the probe
        # log-probs differing by ~2e-3 (seen on an H200, 75M model); 1e-4 only holds for true fp32
        tf32 = on_cuda and torch.backends.cuda.matmul.allow_tf32
        default = (1e-2 if tf32 else 1e-4) if self.dtype == torch.float32 else 5e-2
        self.tolerance = tolerance if tolerance is not None else default
        self._synced = SyncRecord(self.name, trainer, self.tolerance)   # the trainer as of the last sync
        gen = getattr(model, "generation_config", None)
        # stop set: every eos id (models.eos_ids: the tokenizer's and generation_config's), or the given id(s)
        from alignflow.models import eos_ids
        eos = eos_ids(model, tokenizer) if eos_token_id == -1 else eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])]
        self.eos = self.eos_ids[0] if self.eos_ids else None
        self._eos_t = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        pad = pad_token_id if pad_token_id != -1 else (tokenizer.pad_token_id if tokenizer is not None else
                                                      getattr(gen, "pad_token_id", None))
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        self.rope = decoder.RopeTable(self.model)
        self.probe = probe_ids.to(self.device) if probe_ids is not None else None
        if self.probe is None and tokenizer is not None and probe_text:
            self.probe = tokenizer(probe_text, return_tensors="pt")["input_ids"].to(self.device)
        spec = self.spec

        def f_in(x, cos, sin, w_in):
            return decoder.attn_in(spec, x, cos, sin, *w_in)

        def f_mid(x, o, cos, sin, w_out, w_in):
            x = decoder.attn_out_mlp(spec, x, o, *w_out)
            return (x, *decoder.attn_in(spec, x, cos, sin, *w_in))

        def f_out(x, o, w_out):
            return decoder.attn_out_mlp(spec, x, o, *w_out)

        self._f_head = self._head
        self._f_in, self._f_mid, self._f_out = f_in, f_mid, f_out
        if self.compile:
            _set_recompile_limit()
            self._f_in, self._f_mid, self._f_out, self._f_head = (
                torch.compile(f, dynamic=False) for f in (f_in, f_mid, f_out, self._head))
        self.fuse_weights = fuse_weights
        self._fused = None
        self._fused_version = None
        self._state = None
        self._graphs: dict = {}
        self._pool = None
        self._ptrs = None
        self.last_stats: dict = {}
        self.profile = False  # True: synchronise to time prefill and decode separately (benchmarks)

    # ---------------------------------------------------------------------------------------------- weights
    def _weights(self, refresh: bool = True):
        if self.fuse_weights and self._fused is not None and not refresh:
            return self._fused  # inside a captured step: no host-side version walk, no copies
        layers = self.model.model.layers
        w_in = [decoder.attn_in_weights(layer) for layer in layers]
        w_out = [decoder.attn_out_weights(layer) for layer in layers]
        if not self.fuse_weights:
            return w_in, w_out
        self._refresh_fused(w_in, w_out)
        return self._fused

    def _param_version(self) -> int:
        return sum(p._version for p in self.model.parameters())

    def _refresh_fused(self, w_in=None, w_out=None, force: bool = False) -> None:
        """(Re)build the fused projection copies when missing or when the parameters changed in place. The buffers
        are allocated once and refreshed in place (CUDA graphs keep their pointers)."""
        version = self._param_version()
        if self._fused is not None and not force and version == self._fused_version:
            return
        if w_in is None:
            layers = self.model.model.layers
            w_in = [decoder.attn_in_weights(layer) for layer in layers]
            w_out = [decoder.attn_out_weights(layer) for layer in layers]
        with torch.no_grad():
            if self._fused is None:
                self._fused = ([decoder.fuse_in(w) for w in w_in], [decoder.fuse_out(w) for w in w_out])
            else:
                for (dst_in, dst_out), src_in, src_out in zip(zip(*self._fused), w_in, w_out):
                    new_in, new_out = decoder.fuse_in(src_in), decoder.fuse_out(src_out)
                    for d, n in ((dst_in[1], new_in[1]), (dst_in[2], new_in[2]), (dst_out[3], new_out[3]),
                                 (dst_out[4], new_out[4])):
                        if d is not None:
                            d.copy_(n)
        self._fused_version = version

    def _weight_ptrs(self):
        return tuple(p.data_ptr() for p in self.model.parameters())

    # ---------------------------------------------------------------------------------------------- pieces
    def _head(self, x, norm_w, lm_w, temp, noise, greedy: bool):
        """final norm + lm_head + sample. -> (token [B], log-prob [B] fp32)."""
        h = decoder.rms_norm(x, norm_w, self.spec.eps)
        logits = F.linear(h, lm_w).float()
        if greedy:
            z = logits
            tok = z.argmax(-1)
        else:
            z = logits / temp
            tok = (z - noise.clamp_min(1e-30).log()).argmax(-1)
        lp = z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        return tok, lp

    def _sample(self, x, greedy: bool, temp):
        m = self.model
        V = m.lm_head.weight.shape[0]
        noise = None if greedy else torch.empty(x.shape[0], V, device=x.device, dtype=torch.float32).exponential_()
        return self._f_head(x, m.model.norm.weight, m.lm_head.weight, temp, noise, greedy)

    def _full_hidden(self, ids, mask, cache_k=None, cache_v=None):
        """Eager forward over left-padded ids [B, P] (prefill; probe). Writes K/V into the caches' first P columns
        when given. -> final-norm-free residual stream [B, P, hidden]."""
        spec, m = self.spec, self.model.model
        B, P = ids.shape
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cos_t, sin_t = self.rope.get(int(pos.max()) + 1, ids.device, self.dtype)
        cos, sin = cos_t[pos], sin_t[pos]
        valid = mask.bool()
        allowed = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()[None] & valid[:, None, :]
        allowed = allowed | torch.eye(P, dtype=torch.bool, device=ids.device)[None]   # pad queries see themselves
        bias = torch.zeros(B, 1, P, P, dtype=self.dtype, device=ids.device).masked_fill_(~allowed[:, None], float("-inf"))
        x = m.embed_tokens(ids)
        w_in, w_out = self._weights()
        for i in range(spec.n_layers):
            q, k, v = decoder.attn_in(spec, x, cos, sin, *w_in[i])        # [B, P, H|KV, D]
            k, v = k.transpose(1, 2), v.transpose(1, 2)                 # [B, KV, P, D]
            if cache_k is not None:
                cache_k[i][:, :, :P] = k
                cache_v[i][:, :, :P] = v
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(spec.groups, 1),
                                               v.repeat_interleave(spec.groups, 1), attn_mask=bias, scale=spec.scaling)
            x = decoder.attn_out_mlp(spec, x, o.transpose(1, 2).reshape(B, P, -1), *w_out[i])
        return x

    # ---------------------------------------------------------------------------------------------- state
    def _alloc(self, B: int, S: int, T: int):
        st = self._state
        if st is not None and st["B"] == B and st["S"] >= S and st["T"] >= T:
            return st
        self._graphs.clear()
        self._state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        S = max(S, st["S"] if st is not None and st["B"] == B else 0)
        T = max(T, st["T"] if st is not None and st["B"] == B else 0)
        spec, dev, dt = self.spec, self.device, self.dtype
        shape = (B, spec.kv_heads, S, spec.head_dim)
        st = {
            "B": B, "S": S, "T": T,
            "k": [torch.zeros(shape, device=dev, dtype=dt) for _ in range(spec.n_layers)],
            "v": [torch.zeros(shape, device=dev, dtype=dt) for _ in range(spec.n_layers)],
            "valid": torch.zeros(B, S, dtype=torch.bool, device=dev),
            "tok": torch.zeros(B, dtype=torch.long, device=dev),
            "pos": torch.zeros(B, dtype=torch.long, device=dev),
            "col": torch.zeros(1, dtype=torch.long, device=dev),
            "t": torch.zeros(1, dtype=torch.long, device=dev),
            "finished": torch.zeros(B, dtype=torch.bool, device=dev),
            "out_tok": torch.zeros(B, T, dtype=torch.long, device=dev),
            "out_lp": torch.zeros(B, T, dtype=torch.float32, device=dev),
            "temp": torch.ones(1, dtype=torch.float32, device=dev),
        }
        self.rope.get(S + 1, dev, dt)
        self._state = st
        return st

    def _step(self, Sb: int, greedy: bool):
        """One decode step on the static state (capturable: no host syncs, no allocation-dependent control flow)."""
        st, spec, m = self._state, self.spec, self.model
        B = st["B"]
        cos_t, sin_t = self.rope.get(st["S"] + 1, self.device, self.dtype)
        x = F.embedding(st["tok"], m.model.embed_tokens.weight)
        cos, sin = cos_t[st["pos"]], sin_t[st["pos"]]
        st["valid"].index_fill_(1, st["col"], True)
        bias = torch.zeros(B, 1, 1, Sb, dtype=self.dtype, device=self.device).masked_fill_(
            ~st["valid"][:, None, None, :Sb], float("-inf"))
        w_in, w_out = self._weights(refresh=False)
        q, k, v = self._f_in(x, cos, sin, w_in[0])
        for i in range(spec.n_layers):
            kc, vc = st["k"][i], st["v"][i]
            kc.index_copy_(2, st["col"], k.unsqueeze(2))
            vc.index_copy_(2, st["col"], v.unsqueeze(2))
            o = F.scaled_dot_product_attention(q.reshape(B, spec.kv_heads, spec.groups, spec.head_dim),
                                               kc[:, :, :Sb], vc[:, :, :Sb], attn_mask=bias, scale=spec.scaling)
            o = o.reshape(B, spec.heads * spec.head_dim)
            if i + 1 < spec.n_layers:
                x, q, k, v = self._f_mid(x, o, cos, sin, w_out[i], w_in[i + 1])
            else:
                x = self._f_out(x, o, w_out[i])
        tok, lp = self._sample(x, greedy, st["temp"])
        fin = st["finished"]
        tok = torch.where(fin, torch.full_like(tok, self.pad), tok)
        lp = lp.masked_fill(fin, 0.0)
        st["out_tok"].index_copy_(1, st["t"], tok[:, None])
        st["out_lp"].index_copy_(1, st["t"], lp[:, None])
        if self.eos is not None:
            fin.logical_or_((tok[:, None] == self._eos_t).any(-1))
        st["tok"].copy_(tok)
        st["pos"].add_(1)
        st["col"].add_(1)
        st["t"].add_(1)

    def _capture_all(self, greedy: bool):
        """One CUDA graph per live-length bucket (for this batch size / sampling mode)."""
        st = self._state
        buckets = list(range(BUCKET, st["S"] + 1, BUCKET))
        if st["S"] % BUCKET:
            buckets.append(st["S"])
        todo = [b for b in buckets if (greedy, b) not in self._graphs]
        if not todo:
            return
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for Sb in todo:
            for t in ("col", "t", "pos"):
                st[t].zero_()
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compiles, autotunes, initialises handles
                    self._step(Sb, greedy)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ("col", "t", "pos"):
                st[t].zero_()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._step(Sb, greedy)
            self._graphs[(greedy, Sb)] = g
        torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling) -> dict:
        """Left-padded prompt ids [B, P] -> {"completion" [B, T'], "completion_mask", "logprobs"} (T' <= T)."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device).long()
        B, P = ids.shape
        T = int(sampling.max_new_tokens)
        greedy = bool(sampling.greedy)
        S = math.ceil((P + T) / BUCKET) * BUCKET
        if self.cuda_graphs and self._ptrs is not None and self._ptrs != self._weight_ptrs():
            self._graphs.clear()  # parameters were re-allocated: captured pointers are stale
        st = self._alloc(B, S, T)
        if self.fuse_weights:
            self._refresh_fused()
        if self.cuda_graphs:
            self._capture_all(greedy)
            self._ptrs = self._weight_ptrs()
        # prefill (eager) and the first token
        t0 = self._clock()
        x = self._full_hidden(ids, mask, st["k"], st["v"])
        st["temp"].fill_(float(sampling.temperature))
        tok, lp = self._sample(x[:, -1].contiguous(), greedy, st["temp"])
        st["valid"].zero_()
        st["valid"][:, :P] = mask.bool()
        st["out_tok"].zero_()
        st["out_lp"].zero_()
        st["out_tok"][:, 0], st["out_lp"][:, 0] = tok, lp
        st["tok"].copy_(tok)
        st["pos"].copy_(mask.sum(-1))
        st["col"].fill_(P)
        st["t"].fill_(1)
        st["finished"].copy_((tok[:, None] == self._eos_t).any(-1))
        steps, t1 = 1, self._clock()
        for t in range(1, T):
            Sb = min(st["S"], math.ceil((P + t) / BUCKET) * BUCKET)
            if self.cuda_graphs:
                self._graphs[(greedy, Sb)].replay()
            else:
                self._step(Sb, greedy)
            steps += 1
            if self.eos is not None and t % 32 == 0 and bool(st["finished"].all()):
                break
        t2 = self._clock()
        completion = st["out_tok"][:, :steps].clone()
        logprobs = st["out_lp"][:, :steps].clone()
        from alignflow.models import after_stop
        after = after_stop(completion, self.eos_ids)   # after the first of ANY eos id
        cmask = (~after).long()
        T_out = int(cmask.sum(-1).max()) if B else 0
        self.last_stats = {"steps": steps, "graphs": len(self._graphs), "bucket": BUCKET, "S": st["S"]}
        if self.profile:
            self.last_stats.update(prefill_s=t1 - t0, decode_s=t2 - t1)
        return {"completion": completion[:, :T_out].masked_fill(after[:, :T_out], self.pad),
                "completion_mask": cmask[:, :T_out], "logprobs": logprobs[:, :T_out].masked_fill(after[:, :T_out], 0.0)}

    def _clock(self) -> float:
        if not self.profile:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> Completions:
        from alignflow.models import encode_prompts
        tok = self.tokenizer
        enc = encode_prompts(tok, prompts)   # rendered chat text: left padding, no added special tokens
        ids = enc["input_ids"].repeat_interleave(n, 0).to(self.device)
        mask = enc["attention_mask"].repeat_interleave(n, 0).to(self.device)
        out = self.generate_ids(ids, mask, sampling)
        completion, cmask = out["completion"], out["completion_mask"]
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        return Completions(input_ids=torch.cat([ids, completion], 1), attention_mask=torch.cat([mask, cmask], 1),
                           completion_mask=cmask, logprobs=out["logprobs"], texts=texts,
                           prompt_index=torch.arange(len(prompts)).repeat_interleave(n))

    # ---------------------------------------------------------------------------------------------- sync
    @torch.no_grad()
    def logprobs_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The engine's own (eager) log-probs of each token after the first, for one unpadded sequence [1, L]."""
        ids = input_ids.to(self.device)
        x = self._full_hidden(ids, torch.ones_like(ids))
        m = self.model
        logits = F.linear(decoder.rms_norm(x[:, :-1], m.model.norm.weight, self.spec.eps), m.lm_head.weight).float()
        return F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def probe_logprobs(self) -> torch.Tensor:
        return self.logprobs_of(self.probe)

    @torch.no_grad()
    def decode_probe(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The probe's first half continued greedily through the path that samples: prefill, then the decode
        steps (CUDA-graph replays on GPU, the captured graphs of the rollouts' batch size), fused weights and all.
        -> (ids [1, P + T'] of row 0, log-probs [B, T'] of every row at temperature 1, completion mask [1, T'])"""
        P = max(1, self.probe.shape[1] // 2)
        B = self._state["B"] if self._state is not None else 1   # the rollouts' batch size: no re-capture
        prompt = self.probe[:, :P].expand(B, -1)
        out = self.generate_ids(prompt, torch.ones_like(prompt), Sampling(self.probe.shape[1] - P, 1.0, greedy=True))
        return torch.cat([prompt[:1], out["completion"][:1]], 1), out["logprobs"], out["completion_mask"][:1]

    def sync(self, trainer_model) -> float:
        """Copy the trainer's weights in (in place: CUDA graphs keep their pointers), then verify them against the
        trainer (alignflow.rollout.sync): the probe through the engine's eager path, and a greedy continuation
        of it through the decode path that samples. Returns max |diff|."""
        from alignflow.rollout.sync import load_weights
        with torch.no_grad():
            if trainer_model is not self.model:
                load_weights(self.model, trainer_model)   # merged if LoRA, gathered if sharded (FSDP)
            if self.fuse_weights:
                self._refresh_fused(force=True)
            trainer_device = next(trainer_model.parameters()).device
            probe = self.probe.to(trainer_device)
            expected = token_logprobs(trainer_model, probe, torch.ones_like(probe), probe.shape[1] - 1)
            ids, decoded, mask = self.decode_probe()
            ids = ids.to(trainer_device)
            scored = token_logprobs(trainer_model, ids, torch.ones_like(ids), decoded.shape[1])   # [1, T']
        keep = mask.bool().expand_as(decoded).to(self.device)
        sampled = (decoded[keep], scored.to(self.device).expand_as(decoded)[keep])   # every row vs the trainer's
        diff = self._synced.verify(self.probe_logprobs(), expected, sampled)
        self._synced.record(trainer_model, expected)
        return diff

    def check_synced(self) -> None:
        """Before sampling: WeightSyncError if the trainer's weights changed since the last sync."""
        self._synced.check_unchanged()
