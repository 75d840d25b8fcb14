"""A magnitude-pruned stand-in at a given sparsity (global over prunable weights, first conv kept dense)."""
import sys

import torch

from edgeguard.artifact import load_artifact, save_artifact
from edgeguard.masks import MaskSet

src, out, sp = sys.argv[1], sys.argv[2], float(sys.argv[3])
art = load_artifact(src)
mask = MaskSet.ones(art.model)
params = dict(art.model.named_parameters())
names = [n for n in mask.masks if n != next(iter(mask.masks))]
allw = torch.cat([params[n].detach().abs().flatten() for n in names])
k = int(sp * allw.numel() * 1.0)
thr = allw.kthvalue(k).values
for n in names:
    mask.masks[n] &= params[n].detach().abs() > thr
save_artifact(out, art.model, {**art.meta, "method": f"magnitude{sp}", "target_domains": ["usps"]}, mask)
print(out, 1 - sum(int(m.sum()) for m in mask.masks.values()) / sum(m.numel() for m in mask.masks.values()))
