"""Model zoo for the merging demo and benchmark: offline data sets, small
fx-traceable backbones with a shared frozen class head, training, caching and
the MuDSC evaluation protocol.

    from mudsc_fx.zoo import load_dataset, split_classes, build, ClassHead, train, evaluate
    ds = load_dataset("digits")
    task_a, task_b = split_classes(ds.num_classes, 2, seed=0)
    head = ClassHead(ds.num_classes)
    a = train(build("mlp", ds, seed=1), head, ds.x_train, ds.y_train, task_a, **recipe("mlp", ds))
    evaluate(a, head, ds.x_test, ds.y_test, [task_a, task_b])

Note: the package attributes ``train`` and ``evaluate`` are the *functions*
(they shadow the submodules of the same name).  Reach module-level objects
with ``from mudsc_fx.zoo.train import last_run`` (works), not with
``import mudsc_fx.zoo.train as m`` (gives the function).
"""
from .data import (DATASETS, CalibrationBatches, Dataset, calibration_batches, load_dataset,
                   split_classes, task_subset)
from .evaluate import embed, ensemble_logits, evaluate, logits
from .models import ARCHS, MLP, ClassHead, ResNet20, SmallViT, build, default_kwargs
from .train import (RECIPES, cache_path, default_cache_dir, finetune, last_run, recipe, run_count, skip_training,
                    train, train_cached)

__all__ = [
    "DATASETS", "Dataset", "load_dataset", "split_classes", "task_subset", "calibration_batches",
    "CalibrationBatches", "ARCHS", "ClassHead", "MLP", "ResNet20", "SmallViT", "build", "default_kwargs",
    "train", "finetune", "train_cached", "cache_path", "default_cache_dir", "skip_training",
    "last_run", "run_count", "recipe", "RECIPES",
    "evaluate", "ensemble_logits", "embed", "logits",
]
