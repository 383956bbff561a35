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
_ROWS = 2048


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
    get: Callable[..., torch.Tensor],
    *,
    fold_ln: bool,
    center_unembed: bool,
    layer_done: Callable[[int], None] | None = None,
) -> None:
    """Fill the HookedTransformer ``model`` in place from an HF Llama decoder, one tensor at a time.

    ``get(name, index=None)`` returns a tensor (or ``tensor[index]``) by its ``LlamaModel`` name
    (``"layers.3.mlp.up_proj.weight"``, ``"embed_tokens.weight"``, ``"norm.weight"``) or
    ``"lm_head.weight"``; it may read lazily from disk. Only one weight matrix (or a slice of the
    embeddings) is held beside the converted model at any time.
    """
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    gqa = "_" if cfg.n_key_value_heads is not None else ""
    for i in range(0, cfg.d_vocab, _ROWS):
        _copy(model.embed.W_E[i : i + _ROWS], get("embed_tokens.weight", slice(i, i + _ROWS)))
    for layer_idx in range(cfg.n_layers):
        params = dict(model.blocks[layer_idx].named_parameters())
        w1 = get(f"layers.{layer_idx}.input_layernorm.weight")
        w2 = get(f"layers.{layer_idx}.post_attention_layernorm.weight")
        s1 = w1[None, :] if fold_ln else 1.0
        s2 = w2[:, None] if fold_ln else 1.0
        qkv = (("q", "attn.W_Q", cfg.n_heads), ("k", f"attn.{gqa}W_K", n_kv), ("v", f"attn.{gqa}W_V", n_kv))
        for short, name, heads in qkv:
            weight = get(f"layers.{layer_idx}.self_attn.{short}_proj.weight") * s1
            _copy(params[name], einops.rearrange(weight, "(n h) m -> n m h", n=heads))
            del weight
        o_proj = get(f"layers.{layer_idx}.self_attn.o_proj.weight")
        _copy(params["attn.W_O"], einops.rearrange(o_proj, "m (n h) -> n h m", n=cfg.n_heads))
        del o_proj
        for name in ("attn.b_Q", f"attn.{gqa}b_K", f"attn.{gqa}b_V", "attn.b_O", "mlp.b_in", "mlp.b_out"):
            params[name].zero_()
        for hf_name, name, scale in (("up_proj", "mlp.W_in", s2), ("gate_proj", "mlp.W_gate", s2),
                                     ("down_proj", "mlp.W_out", 1.0)):
            weight = get(f"layers.{layer_idx}.mlp.{hf_name}.weight").T * scale
            _copy(params[name], weight)
            del weight
        if not fold_ln:
            _copy(params["ln1.w"], w1)
            _copy(params["ln2.w"], w2)
        if layer_done is not None:
            layer_done(layer_idx)
    wf = get("norm.weight")
    if not fold_ln:
        _copy(model.ln_final.w, wf)
    elif hasattr(model, "final_norm_weight"):
        _copy(model.final_norm_weight, wf)  # lets the logit lens unembed without the final norm
    W_U = model.unembed.W_U  # [d_model, d_vocab]
    scale = wf.float() if fold_ln else torch.ones(cfg.d_model)
    # lm_head is [d_vocab, d_model]: read it in blocks of vocabulary rows (contiguous on disk), twice
    # when centring, first for the per-dimension mean over the vocabulary, then to write.
    mean = torch.zeros(cfg.d_model)
    if center_unembed:
        for i in range(0, cfg.d_vocab, _ROWS):
            mean += get("lm_head.weight", slice(i, i + _ROWS)).float().sum(0)
        mean = mean * scale / cfg.d_vocab
    for i in range(0, cfg.d_vocab, _ROWS):
        block = get("lm_head.weight", slice(i, i + _ROWS)).float() * scale - mean  # [rows, d_model]
        _copy(W_U[:, i : i + _ROWS], block.T)
    model.unembed.b_U.zero_()
