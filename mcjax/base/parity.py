"""Parity of our decoder with transformers' torch implementation of each family (SPEC §2.1).

torch and transformers' models are imported lazily: they are test/benchmark dependencies,
never needed to run mcjax. Used by `tests/test_architectures.py` and
`experiments/parity.py`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mcjax.config import LlamaConfig


def torch_reference(config: LlamaConfig, save_dir: str | os.PathLike, seed: int = 0) -> Any:
    """transformers' causal LM of `config`'s family (`AutoConfig.for_model` of its HF dict),
    randomised — norm scales and biases too, so a misplaced one shows — in eval mode with
    eager attention, and saved as an HF directory at `save_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(**config.to_hf_dict())
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(save_dir)
    return hf


def torch_logits(hf, tokens, position_ids=None, attention_mask=None) -> np.ndarray:
    """fp32 logits [B, T, V] of transformers' model `hf` on token ids [B, T]."""
    import torch

    with torch.no_grad():
        kw = {}
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids, np.int64))
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(attention_mask, np.int64))
        return hf(torch.tensor(np.asarray(tokens, np.int64)), **kw).logits.float().numpy()
