"""Fast training pieces (issue 7): sequence packing without cross-contamination, varlen attention, chunked
cross-entropy / log-probs over the vocabulary, fused AdamW, optional gradient checkpointing and torch.compile.

The layers themselves are the functional decoder (alignflow/decoder.py), shared with the static-cache engine.

Packed format: rows of `seq_len` tokens, each holding several documents back to back. `position_ids` restart at 0
for every document and attention is block-diagonal-causal: on CUDA through flash-attention varlen
(`torch.nn.attention.varlen.varlen_attn`, cu_seqlens over the flattened rows), elsewhere through SDPA with a
per-row block-diagonal mask. `targets[j]` is the label of token j+1 of the same document (IGNORE at every
document's last token), so no prediction crosses a document boundary.

Pure torch + transformers; no alignflow.config import (runs on machines without pydantic).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from alignflow.decoder import (DecoderSpec, RopeTable, attn_in, attn_in_weights, attn_out_mlp, attn_out_weights,
                               decoder_spec, fuse_in, fuse_out)

IGNORE = -100


# --------------------------------------------------------------------------------------------------------------
# varlen (block-diagonal causal) attention
# --------------------------------------------------------------------------------------------------------------

_VARLEN: dict = {"fn": None, "kw": {}, "gqa": True, "scale": False, "probed": False, "ok": False, "note": "not probed"}


def _varlen_setup() -> None:
    if _VARLEN["fn"] is not None or _VARLEN["note"] != "not probed":
        return
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # noqa: BLE001
        _VARLEN["note"] = f"torch.nn.attention.varlen unavailable: {exc!r}"
        return
    params = inspect.signature(varlen_attn).parameters
    _VARLEN.update(fn=varlen_attn, scale="scale" in params,
                   kw={"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True},
                   gqa_kw={"enable_gqa": True} if "enable_gqa" in params else {})
    _VARLEN["note"] = "torch varlen_attn(" + ", ".join(list(_VARLEN["kw"]) + list(_VARLEN["gqa_kw"])) + ")"


def varlen_attention(q, k, v, cu, max_len: int, scale: float):
    """Block-diagonal causal attention over packed segments. q [N, H, D], k/v [N, KV, D], cu int32 [S + 1]."""
    kw = dict(_VARLEN["kw"])
    if _VARLEN["scale"]:
        kw["scale"] = scale
    if q.shape[1] != k.shape[1]:
        if _VARLEN["gqa"]:
            kw.update(_VARLEN["gqa_kw"])
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return _VARLEN["fn"](q, k, v, cu, cu, max_len, max_len, **kw)


def varlen_available(device) -> bool:
    """True when flash varlen attention runs here (CUDA); decides once whether GQA goes natively."""
    if torch.device(device).type != "cuda":
        return False
    _varlen_setup()
    if _VARLEN["fn"] is None:
        return False
    if not _VARLEN["probed"]:
        _VARLEN["probed"] = True
        q = torch.randn(24, 4, 64, device=device, dtype=torch.bfloat16)
        k = torch.randn(24, 2, 64, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 10, 24], device=device, dtype=torch.int32)
        for gqa in (True, False):
            _VARLEN["gqa"] = gqa
            try:
                varlen_attention(q, k, k, cu, 14, 0.125)
                torch.cuda.synchronize(device)
                _VARLEN["ok"] = True
                _VARLEN["note"] += "; GQA native" if gqa else "; GQA by repeating k/v"
                break
            except Exception as exc:  # noqa: BLE001
                err = exc
        else:
            _VARLEN["note"] += f"; failed on this device: {err!r}"
    return _VARLEN["ok"]


def varlen_note() -> str:
    return _VARLEN["note"]


def _block_causal_attention(spec: DecoderSpec, q, k, v, doc_ids):
    """SDPA fallback. q [R, L, H, D], k/v [R, L, KV, D], doc_ids [R, L] -> [R, L, H, D]."""
    L = q.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal          # [R, L, L]
    rep = spec.groups
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=spec.scaling)
    return out.transpose(1, 2)


def train_layer(spec: DecoderSpec, x, cos, sin, cu, max_len: int, doc_ids, w_in: tuple, w_out: tuple,
                attn_dtype: torch.dtype | None = None, fuse: bool = False):
    """One decoder layer on packed rows. x [R, L, hidden]; cos/sin [R, L, D]; either cu (int32 cu_seqlens over
    the flattened rows, CUDA varlen path; q/k/v cast to `attn_dtype` if given) or doc_ids [R, L] (SDPA block
    mask path). fuse: concatenate q/k/v and gate/up weights inside the (compiled) layer: fewer, larger GEMMs."""
    R, L, _ = x.shape
    if fuse:
        w_in, w_out = fuse_in(w_in), fuse_out(w_out)
    q, k, v = attn_in(spec, x, cos, sin, *w_in)
    if cu is not None:
        dt = attn_dtype or q.dtype
        q, k, v = (t.reshape(R * L, t.shape[-2], spec.head_dim).to(dt) for t in (q, k, v))
        o = varlen_attention(q, k, v, cu, max_len, spec.scaling).view(R, L, spec.heads * spec.head_dim)
    else:
        o = _block_causal_attention(spec, q, k, v, doc_ids).reshape(R, L, spec.heads * spec.head_dim)
    return attn_out_mlp(spec, x, o, *w_out)


# --------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------

@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [R, L]
    position_ids: torch.Tensor   # [R, L] restart at 0 for every document (and for the padding tail)
    targets: torch.Tensor        # [R, L] next-token label inside the same document, IGNORE elsewhere
    doc_ids: torch.Tensor        # [R, L] segment index, unique across the batch (padding tails are segments too)
    cu_seqlens: torch.Tensor     # [S + 1] int32 offsets of the segments in the flattened [R * L] stream
    max_seqlen: int              # an upper bound on any segment's length (the row length)
    doc_lengths: list[int]       # lengths of the real documents (padding tails excluded), for FLOP counts
    n_targets: int               # labelled positions (a host int: no device sync in the step)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(mv(self.input_ids), mv(self.position_ids), mv(self.targets), mv(self.doc_ids),
                           mv(self.cu_seqlens), self.max_seqlen, self.doc_lengths, self.n_targets)


def pack_rows(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of at most `seq_len` tokens (examples longer
    than a row are truncated to it). Deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-min(len(examples[i][0]), seq_len), i))
    rows, room = [], []
    for i in order:
        n = min(len(examples[i][0]), seq_len)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def collate_packed(examples: Sequence[tuple[Sequence[int], Sequence[int]]], rows: Sequence[Sequence[int]],
                   seq_len: int, pad_id: int) -> PackedBatch:
    """Rows of (input ids, labels) examples -> PackedBatch. `labels` follow the transformers convention (aligned
    with the inputs, IGNORE on prompt tokens; the model shifts them): target[j] = labels[j + 1] of the same doc."""
    R = len(rows)
    ids = torch.full((R, seq_len), pad_id, dtype=torch.long)
    pos = torch.zeros((R, seq_len), dtype=torch.long)
    tgt = torch.full((R, seq_len), IGNORE, dtype=torch.long)
    doc = torch.zeros((R, seq_len), dtype=torch.long)
    lengths, docs, seg = [], [], 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]
            n = min(len(x), seq_len - at)
            if n <= 0:
                continue
            ids[r, at:at + n] = torch.as_tensor(list(x[:n]))
            pos[r, at:at + n] = torch.arange(n)
            if n > 1:
                tgt[r, at:at + n - 1] = torch.as_tensor(list(y[1:n]))
            doc[r, at:at + n] = seg
            lengths.append(n)
            docs.append(n)
            seg, at = seg + 1, at + n
        if at < seq_len:  # padding tail: its own segment, no targets
            pos[r, at:] = torch.arange(seq_len - at)
            doc[r, at:] = seg
            lengths.append(seq_len - at)
            seg += 1
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return PackedBatch(ids, pos, tgt, doc, cu, seq_len, docs, int((tgt != IGNORE).sum()))


def pack_examples(examples, seq_len: int, pad_id: int, rows_per_batch: int | None = None) -> list[PackedBatch]:
    """All examples packed; split into batches of `rows_per_batch` rows (all rows in one batch if None)."""
    rows = pack_rows(examples, seq_len)
    step = rows_per_batch or len(rows)
    return [collate_packed(examples, rows[i:i + step], seq_len, pad_id) for i in range(0, len(rows), step)]


# --------------------------------------------------------------------------------------------------------------
# chunked cross-entropy / log-probs over the vocabulary (never [tokens x vocab] in fp32 at once)
# --------------------------------------------------------------------------------------------------------------

def _acc(x):
    """Accumulation precision: at least fp32 (fp64 stays fp64)."""
    return x.float() if x.element_size() < 4 else x


def _ce_chunk(logits, targets, ignore_index: int):
    """-> (sum of CE over valid rows, d(sum CE)/d logits in the logits' dtype)."""
    lf = _acc(logits)
    lse = torch.logsumexp(lf, -1)
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    tgt_logit = lf.gather(-1, t[:, None]).squeeze(-1)
    loss = ((lse - tgt_logit) * valid).sum()
    onehot = torch.arange(lf.shape[-1], device=lf.device)[None, :] == t[:, None]
    grad = ((torch.exp(lf - lse[:, None]) - onehot.to(lf.dtype)) * valid[:, None]).to(logits.dtype)
    return loss, grad


def _logprob_chunk(logits, targets, inv_temp: float):
    z = _acc(logits) * inv_temp
    lse = torch.logsumexp(z, -1)
    return z.gather(-1, targets[:, None]).squeeze(-1) - lse, lse


def _logprob_grad_chunk(logits, targets, lse, g, inv_temp: float):
    """d(sum g_i * logp_i)/d logits = g_i * (onehot - softmax(z)) / T."""
    z = _acc(logits) * inv_temp
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]
    return ((onehot.to(z.dtype) - torch.exp(z - lse[:, None])) * (g * inv_temp)[:, None]).to(logits.dtype)


_CHUNK_FNS: dict = {}


def _chunk_fn(name: str, fn, device, dynamic: bool | None = False):
    """Compiled on CUDA (fuses cast/softmax/one-hot into one or two passes over the chunk's logits). `dynamic`
    None: one static compile, then one with a symbolic row count on the first other size (the RL update's token
    count changes every step; dynamic=False would recompile for each)."""
    if torch.device(device).type != "cuda":
        return fn
    if name not in _CHUNK_FNS:
        try:
            _CHUNK_FNS[name] = torch.compile(fn, dynamic=dynamic)
        except Exception:  # noqa: BLE001
            _CHUNK_FNS[name] = fn
    return _CHUNK_FNS[name]


def _compute_dtype(hidden, weight):
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); gradients computed chunk by chunk in the forward (the loss is a
    scalar, so the backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce = _chunk_fn("ce", _ce_chunk, hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            acc = torch.promote_types(dtype, torch.float32)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for s in range(0, h.shape[0], chunk):
                hc, tc = h[s:s + chunk], targets[s:s + chunk]
                loss, g = ce(hc @ w.t(), tc, ignore_index)
                total += loss
                if need_h:
                    torch.mm(g, w, out=grad_h[s:s + chunk])
                if need_w:
                    grad_w += (g.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_loss).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_cross_entropy(hidden, weight, targets, *, chunk: int = 4096, ignore_index: int = IGNORE,
                          reduction: str = "mean"):
    """Cross-entropy of `hidden @ weight.T` (an lm_head without bias) against `targets`, `chunk` rows at a time.
    hidden [N, d] (or [..., d]), targets [N] (or [...]). Peak extra memory: chunk x vocab (not N x vocab)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index, _compute_dtype(hidden, weight))
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T)[target] per row; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int, dtype):
        fwd = _chunk_fn("lp", _logprob_chunk, hidden.device, dynamic=None)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            acc = torch.promote_types(dtype, torch.float32)
            out = torch.empty(h.shape[0], dtype=acc, device=h.device)
            lse = torch.empty_like(out)
            for s in range(0, h.shape[0], chunk):
                out[s:s + chunk], lse[s:s + chunk] = fwd(h[s:s + chunk] @ w.t(), targets[s:s + chunk], 1.0 / temperature)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        bwd = _chunk_fn("lp_grad", _logprob_grad_chunk, hidden.device, dynamic=None)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
            acc = torch.promote_types(ctx.dtype, torch.float32)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for s in range(0, h.shape[0], ctx.chunk):
                hc = h[s:s + ctx.chunk]
                g = bwd(hc @ w.t(), targets[s:s + ctx.chunk], lse[s:s + ctx.chunk], grad_out[s:s + ctx.chunk].to(acc),
                        1.0 / ctx.temperature)
                if need_h:
                    torch.mm(g, w, out=grad_h[s:s + ctx.chunk])
                if need_w:
                    grad_w += (g.t() @ hc).to(acc)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None)


def chunked_token_logprobs(hidden, weight, targets, *, temperature: float = 1.0, chunk: int = 4096):
    """log-prob of `targets` under softmax(hidden @ weight.T / temperature); shape of `targets`, fp32 (fp64 for
    fp64 inputs)."""
    shape = targets.shape
    h2, t2 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    return _LinearLogprobs.apply(h2, weight, t2, float(temperature), chunk, _compute_dtype(h2, weight)).view(shape)


# --------------------------------------------------------------------------------------------------------------
# packed forward + trainer step
# --------------------------------------------------------------------------------------------------------------

def make_adamw(params, lr: float, weight_decay: float = 0.01, fused: bool | None = None, **kw) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for the whole update) when every parameter is on CUDA."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all((p["params"][0] if isinstance(p, dict) else p).is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, **kw)


class FastForward:
    """Packed forward of a Qwen2/Llama-family model through the functional decoder.

    attention: "auto" (varlen flash on CUDA when it runs, else SDPA block mask), "varlen" or "sdpa".
    compile: torch.compile each decoder layer (one compiled graph shared by all layers) — default on CUDA.
    gradient_checkpointing: recompute each layer in the backward (less memory, ~1/3 more layer FLOPs).
    fuse_projections: one [q;k;v] and one [gate;up] GEMM per layer (weights concatenated inside the layer).
    compile_mode: torch.compile mode, e.g. "max-autotune-no-cudagraphs" (autotuned GEMMs; long compile).
    """

    def __init__(self, model, *, attention: str = "auto", compile: bool | None = None,
                 gradient_checkpointing: bool = False, fuse_projections: bool = True, compile_mode: str | None = None):
        self.model, self.spec = model, decoder_spec(model)
        device = next(model.parameters()).device
        self.device = device
        if attention == "auto":
            attention = "varlen" if varlen_available(device) else "sdpa"
        elif attention == "varlen" and not varlen_available(device):
            raise RuntimeError(f"varlen attention does not run here: {varlen_note()}")
        self.attention = attention
        self.compile = (device.type == "cuda") if compile is None else compile
        self.gradient_checkpointing = gradient_checkpointing
        self.rope = RopeTable(model)
        spec = self.spec

        fuse = bool(fuse_projections)

        def layer(x, cos, sin, cu, max_len, doc_ids, w_in, w_out, attn_dtype):
            return train_layer(spec, x, cos, sin, cu, max_len, doc_ids, w_in, w_out, attn_dtype, fuse)

        self._layer = torch.compile(layer, dynamic=False, mode=compile_mode) if self.compile else layer

    def hidden(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states [R, L, hidden]."""
        m = self.model.model
        x = m.embed_tokens(batch.input_ids)
        cos_t, sin_t = self.rope.get(batch.max_seqlen, x.device, x.dtype)  # positions < max_seqlen: no sync
        cos, sin = cos_t[batch.position_ids], sin_t[batch.position_ids]
        amp = x.is_cuda and torch.is_autocast_enabled("cuda")
        attn_dtype = torch.get_autocast_dtype("cuda") if amp else None
        if self.attention == "varlen":
            cu, doc = batch.cu_seqlens, None
            if self.compile:
                torch._dynamo.maybe_mark_dynamic(cu, 0)
        else:
            cu, doc = None, batch.doc_ids
        for layer in m.layers:
            args = (x, cos, sin, cu, batch.max_seqlen, doc, attn_in_weights(layer), attn_out_weights(layer), attn_dtype)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._layer, *args, use_reentrant=False)
            else:
                x = self._layer(*args)
        return m.norm(x)

    def loss(self, batch: PackedBatch, *, chunk: int = 8192, reduction: str = "mean") -> torch.Tensor:
        h = self.hidden(batch)
        return chunked_cross_entropy(h, self.model.lm_head.weight, batch.targets, chunk=chunk, reduction=reduction)


class FastSFTTrainer:
    """One optimizer step over one or more packed micro-batches: loss = mean CE over all target tokens of the step.
    bf16 autocast on CUDA (fp32 master weights), fused AdamW, grad-norm clipping."""

    def __init__(self, model, *, lr: float, weight_decay: float = 0.01, grad_clip: float = 1.0,
                 attention: str = "auto", compile: bool | None = None, gradient_checkpointing: bool = False,
                 amp_dtype: torch.dtype | None = None, chunk: int = 8192, optimizer=None,
                 fuse_projections: bool = True, compile_mode: str | None = None):
        self.fwd = FastForward(model, attention=attention, compile=compile,
                               gradient_checkpointing=gradient_checkpointing, fuse_projections=fuse_projections,
                               compile_mode=compile_mode)
        self.model, self.grad_clip, self.chunk = model, grad_clip, chunk
        dev = self.fwd.device
        self.amp_dtype = amp_dtype if amp_dtype is not None else (torch.bfloat16 if dev.type == "cuda" else None)
        self.optimizer = optimizer or make_adamw(model.parameters(), lr=lr, weight_decay=weight_decay)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.fwd.device.type, dtype=self.amp_dtype)

    def step(self, micro_batches: Sequence[PackedBatch]) -> dict:
        self.model.train()
        total = sum(b.n_targets for b in micro_batches)
        loss_sum = torch.zeros((), device=self.fwd.device)
        for b in micro_batches:
            with self._autocast():
                loss = self.fwd.loss(b, chunk=self.chunk, reduction="sum") / max(total, 1)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "grad_norm": grad_norm, "tokens": total}



# --------------------------------------------------------------------------------------------------------------
# the SFT stage's trainer on CUDA (alignflow/steps/train.py: supervised_finetune, train_teacher)
# --------------------------------------------------------------------------------------------------------------

def sft_packed_applies(model, precision: str) -> bool:
    """Whether the SFT / teacher stages train through `train_sft_packed` here: the model on CUDA, precision bf16,
    a plain (not peft-wrapped) Qwen2/Llama-family decoder, flash varlen attention running on the device. Anywhere
    else (CPU, fp32, LoRA, other architectures) the stages keep supervised.train_lm, unchanged."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda" or precision != "bf16" or hasattr(model, "peft_config"):
        return False
    try:
        decoder_spec(model)
    except NotImplementedError:
        return False
    return varlen_available(param.device)


def packed_rows_of(examples, idx: Sequence[int], seq_len: int, rows_per_micro: int, pad_id: int) -> list[PackedBatch]:
    """The step's examples (`idx` into `examples`) packed first-fit-decreasing into rows of `seq_len`, grouped into
    micro-batches of exactly `rows_per_micro` rows (the last one topped up with padding rows: one compiled shape)."""
    chosen = [examples[i] for i in idx]
    rows = pack_rows(chosen, seq_len)
    rows += [[] for _ in range(-len(rows) % rows_per_micro)]
    return [collate_packed(chosen, rows[i:i + rows_per_micro], seq_len, pad_id)
            for i in range(0, len(rows), rows_per_micro)]


def train_sft_packed(model, examples, batch_size: int, pad_id: int, generator: torch.Generator, *, lr: float,
                     seq_len: int | None = None, rows_per_micro: int = 8, weight_decay: float = 0.01,
                     compile: bool | None = None, **loop):
    """supervised.train_lm (the one loop: same draws, schedule, checkpoints, validation, early stop, skipped
    non-finite updates; `loop` is its keyword arguments) with each step through the packed varlen path: the step
    draws `batch_size` (input ids, labels) examples with the same generator calls as supervised.sft_batches, packs
    them into rows of `seq_len` (default: the longest example rounded up to 64, at least 1,024) and takes one
    optimizer step over them: mean CE over every labelled token of the step, bf16 autocast on fp32 master weights,
    per-layer torch.compile, chunked lm_head + CE, fused AdamW. No out-of-memory retry (lower rows_per_micro).
    -> supervised.TrainResult"""
    import time

    from alignflow.train.supervised import train_lm
    longest = max(len(x) for x, _ in examples)
    seq_len = seq_len or max(1024, -(-longest // 64) * 64)
    optimizer = make_adamw(model.parameters(), lr=lr, weight_decay=weight_decay)
    trainer = FastSFTTrainer(model, lr=lr, compile=compile, optimizer=optimizer)
    device = trainer.fwd.device

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        started = time.perf_counter()
        idx = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        micro = [b.to(device, non_blocking=True) for b in packed_rows_of(examples, idx, seq_len, rows_per_micro, pad_id)]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total = max(1, sum(b.n_targets for b in micro))
        loss = torch.zeros((), device=device)
        for b in micro:
            with trainer._autocast():
                part = trainer.fwd.loss(b, chunk=trainer.chunk, reduction="sum") / total
            part.backward()
            loss += part.detach()
        return loss, {"micro_batches": len(micro), "packed_rows": len(micro) * rows_per_micro, "tokens": total,
                      "doc_tokens": sum(n for b in micro for n in b.doc_lengths),
                      "step_seconds": time.perf_counter() - started}

    return train_lm(model, None, generator, lr=lr, optimizer=optimizer, step_loss=step_loss, **loop)


def model_flops_per_token(model) -> tuple[int, int]:
    """(N, N_embedding): matmul parameters (decoder + lm_head, embedding lookup excluded) for the 6*N*tokens
    count, and the input-embedding size (excluded unless tied, where the lm_head counts it once)."""
    m = model.model
    emb = m.embed_tokens.weight.numel()
    decoder = sum(p.numel() for n, p in m.layers.named_parameters() if p.dim() == 2)
    return decoder + model.lm_head.weight.numel(), emb


def attention_flops(spec: DecoderSpec, doc_lengths: Sequence[int], backward: bool = True) -> float:
    """Causal attention matmul FLOPs (QK^T and PV over the causal pairs of each document), x3 with backward."""
    pairs = sum(n * (n + 1) / 2 for n in doc_lengths)
    fwd = 2 * 2 * spec.n_layers * spec.heads * spec.head_dim * pairs
    return fwd * (3 if backward else 1)


__all__ = ["IGNORE", "PackedBatch", "pack_rows", "collate_packed", "pack_examples",
           "chunked_cross_entropy", "chunked_token_logprobs", "make_adamw", "FastForward", "FastSFTTrainer",
           "model_flops_per_token", "attention_flops", "varlen_available", "varlen_note", "sft_packed_applies",
           "packed_rows_of", "train_sft_packed"]
