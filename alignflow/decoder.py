"""The functional decoder: a Qwen2 / Llama-family model's modules called one by one, shared by the packed trainer
(alignflow/train/fast.py) and the static-cache rollout engine (alignflow/rollout/static_engine.py), below both.
It reads the HF model's own parameters, so training it trains the model; numerics follow transformers' Qwen2 code
op for op (RMSNorm in fp32, rotary tables from the model's own `rotary_emb`), and the unit tests check it against
`model(...)` on CPU. Pure torch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scaling: float
    n_layers: int
    act: Callable
    qk_norm: bool
    qk_eps: float

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def decoder_spec(model) -> DecoderSpec:
    """Shape of a Qwen2/Llama-family causal LM (q/k/v/o projections, RMSNorm, gated MLP, rotary). Raises
    NotImplementedError for anything else, so callers can fall back to the model's own forward."""
    cfg = model.config
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or not hasattr(base, "rotary_emb") or not hasattr(model, "lm_head"):
        raise NotImplementedError(f"{type(model).__name__}: not a Qwen2/Llama-family causal LM")
    layer = layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attn, name):
            raise NotImplementedError(f"attention without {name}")
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(mlp, name):
            raise NotImplementedError(f"MLP without {name}")
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise NotImplementedError("sliding-window attention")
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        raise NotImplementedError("non-full attention layers")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    act = F.silu if getattr(cfg, "hidden_act", "silu") == "silu" else mlp.act_fn
    qk_norm = hasattr(attn, "q_norm")
    return DecoderSpec(hidden=cfg.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       eps=float(_eps(layer.input_layernorm, cfg)), scaling=float(getattr(attn, "scaling", head_dim ** -0.5)),
                       n_layers=len(layers), act=act, qk_norm=qk_norm,
                       qk_eps=float(_eps(attn.q_norm, cfg)) if qk_norm else 0.0)


def _eps(norm, cfg) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", getattr(cfg, "rms_norm_eps", 1e-6)))


def _bias(lin):
    return getattr(lin, "bias", None)


def attn_in_weights(layer) -> tuple:
    a = layer.self_attn
    return (layer.input_layernorm.weight, a.q_proj.weight, _bias(a.q_proj), a.k_proj.weight, _bias(a.k_proj),
            a.v_proj.weight, _bias(a.v_proj), getattr(getattr(a, "q_norm", None), "weight", None),
            getattr(getattr(a, "k_norm", None), "weight", None))


def attn_out_weights(layer) -> tuple:
    a, m = layer.self_attn, layer.mlp
    return (a.o_proj.weight, _bias(a.o_proj), layer.post_attention_layernorm.weight, m.gate_proj.weight,
            _bias(m.gate_proj), m.up_proj.weight, _bias(m.up_proj), m.down_proj.weight, _bias(m.down_proj))


def rms_norm(x, weight, eps: float):
    """transformers' Qwen2RMSNorm, op for op (fp32 statistics, weight applied in the input dtype)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x [..., heads, D]; cos/sin [..., D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + _rotate_half(x) * sin


def fuse_in(w_in: tuple) -> tuple:
    """attn_in weights with q/k/v concatenated: one GEMM instead of three (wk = wv = None marks the fused form)."""
    ln_w, wq, bq, wk, bk, wv, bv, qn_w, kn_w = w_in
    b = torch.cat([bq, bk, bv]) if bq is not None else None
    return (ln_w, torch.cat([wq, wk, wv]), b, None, None, None, None, qn_w, kn_w)


def fuse_out(w_out: tuple) -> tuple:
    """attn_out_mlp weights with gate/up concatenated (wu = None marks the fused form)."""
    wo, bo, ln_w, wg, bg, wu, bu, wd, bd = w_out
    b = torch.cat([bg, bu]) if bg is not None else None
    return (wo, bo, ln_w, torch.cat([wg, wu]), b, None, None, wd, bd)


def attn_in(spec: DecoderSpec, x, cos, sin, ln_w, wq, bq, wk, bk, wv, bv, qn_w, kn_w):
    """input RMSNorm + q/k/v projections + rotary. x [..., hidden] -> q [..., H, D], k/v [..., KV, D].
    wk None: wq/bq are the fused [q; k; v] weight/bias (see fuse_in)."""
    h = rms_norm(x, ln_w, spec.eps)
    qd, kd = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    if wk is None:
        q, k, v = F.linear(h, wq, bq).split([qd, kd, kd], -1)
    else:
        q, k, v = F.linear(h, wq, bq), F.linear(h, wk, bk), F.linear(h, wv, bv)
    q = q.unflatten(-1, (spec.heads, spec.head_dim))
    k = k.unflatten(-1, (spec.kv_heads, spec.head_dim))
    v = v.unflatten(-1, (spec.kv_heads, spec.head_dim))
    if qn_w is not None:
        q, k = rms_norm(q, qn_w, spec.qk_eps), rms_norm(k, kn_w, spec.qk_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attn_out_mlp(spec: DecoderSpec, x, o, wo, bo, ln_w, wg, bg, wu, bu, wd, bd):
    """o_proj + residual + post-attention RMSNorm + gated MLP + residual. o [..., H*D].
    wu None: wg/bg are the fused [gate; up] weight/bias (see fuse_out)."""
    x = x + F.linear(o, wo, bo)
    h = rms_norm(x, ln_w, spec.eps)
    if wu is None:
        g, u = F.linear(h, wg, bg).chunk(2, -1)
    else:
        g, u = F.linear(h, wg, bg), F.linear(h, wu, bu)
    return x + F.linear(spec.act(g) * u, wd, bd)


class RopeTable:
    """cos/sin for positions 0..n-1, computed once by the model's own rotary module (fp32), indexed per token."""

    def __init__(self, model):
        self.rotary = model.model.rotary_emb
        self._tab: dict = {}

    def get(self, n: int, device, dtype):
        key = (str(device), dtype)
        tab = self._tab.get(key)
        if tab is None or tab[0].shape[0] < n:
            size = max(n, 1024, 2 * (tab[0].shape[0] if tab is not None else 0))
            pos = torch.arange(size, device=device)[None]
            with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, enabled=False):
                cos, sin = self.rotary(torch.zeros(1, device=device, dtype=torch.float32), pos)
            tab = (cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous())
            self._tab[key] = tab
        return tab
