"""Diagnose passkey failures: per case, the LOD of the blocks holding the needle at answer time."""
import json, sys
import numpy as np
from mcjax.eval import pipeline, baselines
from mcjax.runtime import Session

rec = []
orig_generate = Session.generate
def generate(self, *a, **k):
    B = self.num_tokens.shape[0]
    rec.append([self.focus_runs(b) for b in range(B)])
    return orig_generate(self, *a, **k)
Session.generate = generate

L = int(sys.argv[1]); out = sys.argv[2]; extra = tuple(sys.argv[3:])
opts = pipeline.EvalOptions(sections=("passkey",), lengths=(L,), w_max=512, cases=24,
                            haystack="held_out", methods=("megacontext_retrieval",),
                            overrides=extra)
res = pipeline.run_evaluation(opts)
row = res["passkey"]["methods"]["megacontext_retrieval"][str(L)]
runs = rec[0]
diag = []
for ex, r in zip(row["examples"], runs):
    s, e = ex["needle_span"]
    blocks = sorted({t // 32 for t in range(s, e)})
    lods = []
    for b in blocks:
        lod = [l for (l, a, z, n) in r if a <= b * 32 < z][0]
        lods.append(lod)
    diag.append({"found": ex["found"], "span": [s, e], "blocks": blocks, "lods": lods,
                 "cont": ex["continuation"], "runs": r})
    print(ex["found"], s, e, blocks, lods, repr(ex["continuation"][:30]))
print("correct", row["correct"], "/", row["n"])
json.dump({"row": row, "diag": diag}, open(out, "w"))
