"""Infer, prove and draw the permutation graph of a torchvision model.

    python examples/inspect_any_model.py swin_t
"""
import sys

import torch
import torchvision

import mudsc_fx as mf
from mudsc_fx.viz import render_graph

name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
model = torchvision.models.get_model(name, weights=None).eval()
x = torch.randn(1, 3, 224, 224)
pg = mf.infer(model, x)
print(pg.summary())
print(mf.check(model, x, pg=pg))
print("tied head groups:", pg.ties())
print("wrote", render_graph(pg, f"{name}_permutation_graph.png"))
