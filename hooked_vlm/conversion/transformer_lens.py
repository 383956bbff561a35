"""The TransformerLens backend: HF Llama-family decoder -> ``HookedTransformer`` weights.

Everything that knows TransformerLens parameter names lives here, so another backend
can sit beside this module. Weights are read one layer at a time (lazily from the
checkpoint's safetensors when loading from disk), so two full decoders never coexist.
LayerNorm folding and unembedding centring follow ``HookedTransformer.process_weights_``
for RMSNorm models, but per layer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import einops
import torch
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

from hooked_vlm.errors import UnsupportedModelError

SUPPORTED_DECODERS = ("llama", "mistral")
_CHUNK = 512


@contextlib.contextmanager
def quiet_deprecation() -> Iterator[None]:
    """Silence TransformerLens 3.9's "HookedTransformer is deprecated" warning.

    hooked_vlm pins transformer-lens<4 on purpose (SAELens and most circuits code live on
    HookedTransformer), so the warning says nothing actionable to our users.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        yield


def _rope(text_config) -> tuple[float, dict]:
    params = dict(getattr(text_config, "rope_parameters", None) or {})
    legacy = getattr(text_config, "rope_scaling", None)
    if legacy:
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    return float(theta), params


def tl_config(text_config, *, dtype: torch.dtype, device: str, fold_ln: bool, n_ctx: int | None = None):
    """``HookedTransformerConfig`` equivalent to a transformers Llama/Mistral text config."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_DECODERS:
        raise UnsupportedModelError(
            f"Decoder type {model_type!r} is not supported; supported decoders: {', '.join(SUPPORTED_DECODERS)}."
        )
    if getattr(text_config, "sliding_window", None):
        raise UnsupportedModelError("Sliding-window attention decoders are not supported.")
    if getattr(text_config, "attention_bias", False) or getattr(text_config, "mlp_bias", False):
        raise UnsupportedModelError("Decoders with attention or MLP biases are not supported.")
    theta, rope = _rope(text_config)
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type not in ("default", "llama3"):
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (only default and llama3).")
    heads = text_config.num_attention_heads
    d_head = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    cfg = dict(
        d_model=text_config.hidden_size,
        d_head=d_head,
        n_heads=heads,
        d_mlp=text_config.intermediate_size,
        n_layers=text_config.num_hidden_layers,
        n_ctx=n_ctx or text_config.max_position_embeddings,
        eps=text_config.rms_norm_eps,
        d_vocab=text_config.vocab_size,
        act_fn=text_config.hidden_act,
        n_key_value_heads=kv if kv != heads else None,
        normalization_type="RMSPre" if fold_ln else "RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        dtype=dtype,
        device=device,
        default_prepend_bos=False,
        init_weights=False,
    )
    if rope_type == "llama3":
        cfg.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=rope.get("original_max_position_embeddings", text_config.max_position_embeddings),
            NTK_by_parts_low_freq_factor=rope.get("low_freq_factor", 1.0),
            NTK_by_parts_high_freq_factor=rope.get("high_freq_factor", 4.0),
            NTK_by_parts_factor=rope.get("factor", 1.0),
        )
    return HookedTransformerConfig(**cfg)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


@torch.no_grad()
def load_decoder_weights_(
    model,
    get: Callable[[str], torch.Tensor],
    *,
    fold_ln: bool,
    center_unembed: bool,
    layer_done: Callable[[int], None] | None = None,
) -> None:
    """Fill the HookedTransformer ``model`` in place from an HF Llama decoder, one layer at a time.

    ``get(name)`` returns a tensor by its ``LlamaModel`` name (``"layers.3.mlp.up_proj.weight"``,
    ``"embed_tokens.weight"``, ``"norm.weight"``) or ``"lm_head.weight"``; it may read lazily from disk,
    so only one layer's weights are ever held beside the converted model.
    """
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    gqa = "_" if cfg.n_key_value_heads is not None else ""
    _copy(model.embed.W_E, get("embed_tokens.weight"))
    for layer_idx in range(cfg.n_layers):
        w = {name: get(f"layers.{layer_idx}.{name}") for name in _LAYER_TENSORS}
        params = dict(model.blocks[layer_idx].named_parameters())
        s1 = w["input_layernorm.weight"][None, :] if fold_ln else 1.0
        s2 = w["post_attention_layernorm.weight"][:, None] if fold_ln else 1.0
        qkv = (("q", "attn.W_Q", cfg.n_heads), ("k", f"attn.{gqa}W_K", n_kv), ("v", f"attn.{gqa}W_V", n_kv))
        for short, name, heads in qkv:
            weight = w[f"self_attn.{short}_proj.weight"] * s1
            _copy(params[name], einops.rearrange(weight, "(n h) m -> n m h", n=heads))
        _copy(params["attn.W_O"], einops.rearrange(w["self_attn.o_proj.weight"], "m (n h) -> n h m", n=cfg.n_heads))
        for name in ("attn.b_Q", f"attn.{gqa}b_K", f"attn.{gqa}b_V", "attn.b_O", "mlp.b_in", "mlp.b_out"):
            params[name].zero_()
        _copy(params["mlp.W_in"], w["mlp.up_proj.weight"].T * s2)
        _copy(params["mlp.W_gate"], w["mlp.gate_proj.weight"].T * s2)
        _copy(params["mlp.W_out"], w["mlp.down_proj.weight"].T)
        if not fold_ln:
            _copy(params["ln1.w"], w["input_layernorm.weight"])
            _copy(params["ln2.w"], w["post_attention_layernorm.weight"])
        del w
        if layer_done is not None:
            layer_done(layer_idx)
    wf = get("norm.weight")
    if not fold_ln:
        _copy(model.ln_final.w, wf)
    elif hasattr(model, "final_norm_weight"):
        _copy(model.final_norm_weight, wf)  # lets the logit lens unembed without the final norm
    lm_head = get("lm_head.weight")  # [d_vocab, d_model]
    W_U = model.unembed.W_U  # [d_model, d_vocab]
    for i in range(0, cfg.d_model, _CHUNK):
        rows = lm_head[:, i : i + _CHUNK].T.float()
        if fold_ln:
            rows = rows * wf[i : i + _CHUNK, None].float()
        if center_unembed:
            rows = rows - rows.mean(-1, keepdim=True)
        _copy(W_U[i : i + _CHUNK], rows)
    model.unembed.b_U.zero_()


_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)
