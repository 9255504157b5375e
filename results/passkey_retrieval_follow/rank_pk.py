"""Rank of the needle's blocks under retrieval relevance, per passkey case (4k)."""
import sys, numpy as np, jax, jax.numpy as jnp
from mcjax.config import get_config
from mcjax.eval import pipeline, tasks
from mcjax.train import data
from mcjax import retrieval

L = int(sys.argv[1])
cfg = get_config("smollm2_135m_cpu", ["mc.w_max=512"])
frozen, decode = pipeline.load_base(cfg)
llama, mc, rc = frozen.cfg.base_config, frozen.cfg.mc, frozen.cfg.retrieval
hay = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                            separator=frozen.separator, progress=False).tokens
cases = tasks.passkey_cases(frozen.encode, L, 24, 0, haystack=hay)
reader = retrieval.BlockKeyReader.from_base(rc, frozen.params, llama, mc.block_size)
for c in cases:
    T = len(c.tokens); nb = T // 32
    keys = reader(c.tokens[: nb * 32])
    q, v = retrieval.query_vectors(frozen.params, llama, rc, jnp.asarray(c.tokens), jnp.int32(T))
    rel, ok = retrieval.block_relevance(jnp.asarray(keys), jnp.int32(T), q, v, rc, mc, llama)
    rel = np.asarray(rel); order = np.argsort(-rel)
    s, e = c.needle_span
    nbk = sorted({t // 32 for t in range(s, e)})
    ranks = [int(np.where(order == b)[0][0]) + 1 for b in nbk]
    print(s, e, nbk, "ranks", ranks, "top6", order[:6].tolist(), flush=True)
