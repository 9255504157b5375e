"""Paired ΔNLL difference of run B vs run A on the same windows: python paired.py A B."""
import sys
import numpy as np
a, b = (np.load(f"{p}/per_window_nll.npz") for p in sys.argv[1:3])
assert (a["window/offset"] == b["window/offset"]).all(), "different windows"
for key in sorted(k for k in a.files if k.startswith("nll/") and k.endswith("/gistnet")):
    lay = key.split("/")[1]
    if key not in b.files:
        continue
    d = b[key] - a[key]
    trunc = a[f"nll/{lay}/truncation"] - a[f"nll/{lay}/full"]
    ga = 1 - (a[key] - a[f"nll/{lay}/full"]).mean() / trunc.mean()
    gb = 1 - (b[key] - b[f"nll/{lay}/full"]).mean() / trunc.mean()
    print(f"{lay:18s} B-A {d.mean():+.4f} ± {d.std(ddof=1)/np.sqrt(len(d)):.4f}  "
          f"gap A {ga:.3f} B {gb:.3f}  n={len(d)}")
