"""Trace one passkey case's refocuses under retrieval focus."""
import sys, numpy as np
from mcjax.config import get_config
from mcjax.eval import pipeline, tasks, networks
from mcjax.train import data
from mcjax.runtime import Session
L, idx = int(sys.argv[1]), int(sys.argv[2]); ov = sys.argv[3:]
cfg = get_config("smollm2_135m_cpu", ["mc.w_max=512"] + ov)
frozen, decode = pipeline.load_base(cfg)
cfg = frozen.cfg
hay = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                            separator=frozen.separator, progress=False).tokens
c = tasks.passkey_cases(frozen.encode, L, 24, 0, haystack=hay)[idx]
print("needle", c.needle_span)
from mcjax import assets
gp, _ = assets.shipped_gist(cfg)
s = [None]
def ev(e):
    print(e.trigger, "acts", e.actions[0], "append", e.append_collapses, "head", e.headroom_collapses)
    print("   raw", [(a, z) for l, a, z, n in s[0].focus_runs(0) if l == 0], "lod2", [(a, z) for l, a, z, n in s[0].focus_runs(0) if l == 2])
sess = Session((cfg.base_config, frozen.params), gp, None, cfg, batch_size=1,
               max_tokens=8192, focus_policy="retrieval", on_event=ev)
s[0] = sess
for a, b in tasks.feed_schedule(L, 32, 2):
    sess.feed([c.tokens[a:b]]); sess.sync()
out = sess.generate(10)
print(decode(np.asarray(out)[0]))
