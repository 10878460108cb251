"""Merge two MLPs trained on disjoint halves of sklearn's digits, with every preset.

    python examples/merge_two_mlps.py
"""
import warnings

import mudsc_fx as mf
from mudsc_fx import zoo

ds = zoo.load_dataset("digits")
task_a, task_b = zoo.split_classes(ds.num_classes, 2, seed=0)
head = zoo.ClassHead(ds.num_classes)
models = [zoo.train(zoo.build("mlp", ds, seed=s), head, ds.x_train, ds.y_train, cls, epochs=20, seed=s)
          for s, cls in ((1, task_a), (2, task_b))]

pg = mf.infer(models[0], ds.x_train[:2])
print(pg.summary())
print("proof:", mf.check(models[0], ds.x_train[:2]))

calib = zoo.calibration_batches(ds.x_train, batch_size=256, max_batches=4, shuffle=True)
for method in mf.PRESETS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = mf.merge(models, calib, method=method)
    r = zoo.evaluate(merged, head, ds.x_test, ds.y_test, [task_a, task_b])
    print(f"{method:12s} joint {r['joint']:5.1f}  avg {r['avg']:5.1f}")
