"""Hugging Face tensor names of the one decoder's parameters (SPEC §2.1).

The one description of which HF tensors a `LlamaConfig` implies and where each lands in our
layer-stacked param tree: loading reads by it, GGUF conversion checks a file against it.
"""

from __future__ import annotations

from mcjax.config import LlamaConfig


def hf_to_params_layout(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], int | None,
                                                               bool]]:
    """HF tensor name → (our param path, layer index or None, transpose?)."""
    layout = {
        "model.embed_tokens.weight": (("embed", "embedding"), None, False),
        "model.norm.weight": (("final_norm", "scale"), None, False),
    }
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = (("lm_head", "kernel"), None, True)
    per_layer = {
        "input_layernorm.weight": ("input_norm", "scale", False),
        "post_attention_layernorm.weight": ("post_attn_norm", "scale", False),
        "self_attn.q_proj.weight": ("q_proj", "kernel", True),
        "self_attn.k_proj.weight": ("k_proj", "kernel", True),
        "self_attn.v_proj.weight": ("v_proj", "kernel", True),
        "self_attn.o_proj.weight": ("o_proj", "kernel", True),
        "mlp.gate_proj.weight": ("gate_proj", "kernel", True),
        "mlp.up_proj.weight": ("up_proj", "kernel", True),
        "mlp.down_proj.weight": ("down_proj", "kernel", True),
    }
    # the architecture switches' extra tensors (SPEC §2.1)
    if config.qkv_bias:
        per_layer.update({f"self_attn.{p}_proj.bias": (f"{p}_proj", "bias", False)
                          for p in "qkv"})
    if config.o_bias:
        per_layer["self_attn.o_proj.bias"] = ("o_proj", "bias", False)
    if config.mlp_bias:
        per_layer.update({f"mlp.{p}_proj.bias": (f"{p}_proj", "bias", False)
                          for p in ("gate", "up", "down")})
    if config.qk_norm:
        per_layer["self_attn.q_norm.weight"] = ("q_norm", "scale", False)
        per_layer["self_attn.k_norm.weight"] = ("k_norm", "scale", False)
    for i in range(config.num_layers):
        for hf, (mod, leaf, t) in per_layer.items():
            layout[f"model.layers.{i}.{hf}"] = (("layers", mod, leaf), i, t)
    return layout
