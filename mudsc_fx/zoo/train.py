"""Training of task models for the merging experiments (CPU friendly, deterministic).

* :func:`train` -- train a backbone through the shared frozen
  :class:`~mudsc_fx.zoo.models.ClassHead`, with cross-entropy over *only the
  task's classes* (the logits of the other classes are not computed).
* :func:`finetune` -- the same on a deep copy of a pretrained model (the
  "same pretrained" regime: pre-train on all classes, fine-tune per task).
* :func:`train_cached` -- store trained state dicts on disk keyed by a hash
  of a config dict, so reruns only load.

Determinism: a run is a pure function of (initial weights, data, arguments,
``seed``, number of torch threads).  The whole run happens inside
``torch.random.fork_rng`` seeded with ``seed``, so the caller's global RNG
state is untouched.  ``torch.set_num_threads`` is left to the caller (results
can differ in the last bits between thread counts).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["train", "finetune", "recipe", "RECIPES", "train_cached", "cache_path", "default_cache_dir", "last_run", "run_count",
           "skip_training"]

#: Statistics of the most recent real (not skipped) :func:`train` call:
#: ``seconds``, ``images``, ``images_per_s``, ``final_loss``, ``train_acc``, ``steps``.
last_run: dict = {}
_RUNS = [0]


def run_count() -> int:
    """Number of real (not skipped) training runs since import; tests use it to check caching."""
    return _RUNS[0]

_SKIP = False
_CACHE_VERSION = 1


@contextlib.contextmanager
def skip_training(flag: bool = True):
    """Inside this context :func:`train`/:func:`finetune` return their model untouched.

    :func:`train_cached` uses it on a cache hit to rebuild the model skeleton
    from the user's builder without paying for training.
    """
    global _SKIP
    old, _SKIP = _SKIP, flag
    try:
        yield
    finally:
        _SKIP = old


#: Tuned (epochs, lr, batch_size) for ``train`` with AdamW + onecycle, per (arch, dataset), for one
#: task model trained on half the classes.  Measured on a 2-core CPU (see ``recipe``).
RECIPES = {
    ("mlp", "digits"): (20, 3e-3, 64),
    ("mlp", "mnist"): (20, 3e-3, 64),
    ("mlp", "mnist1d"): (30, 3e-3, 64),
    ("resnet20", "digits"): (10, 3e-3, 64),
    ("resnet20", "mnist"): (3, 3e-3, 128),
    ("resnet20", "mnist1d"): (10, 3e-3, 128),
    ("resnet20_gn", "digits"): (10, 3e-3, 64),
    ("resnet20_gn", "mnist"): (4, 3e-3, 64),
    ("resnet20_gn", "mnist1d"): (10, 3e-3, 64),
    ("vit", "digits"): (30, 3e-3, 64),
    ("vit", "mnist"): (20, 2e-3, 64),
    ("vit", "mnist1d"): (30, 3e-3, 128),
}


def recipe(arch: str, dataset) -> dict:
    """Tuned ``{"epochs", "lr", "batch_size"}`` for :func:`train` (see :data:`RECIPES`).

    ``dataset`` is a name or anything with a ``.name`` (a ``task_subset``
    name like ``"digits[0, 3]"`` maps to ``"digits"``).  Unknown pairs get
    ``(10, 3e-3, 64)``.  GroupNorm ResNets need more optimizer steps than
    BatchNorm ones to leave the collapsed start (hence batch 64).
    """
    name = getattr(dataset, "name", dataset).split("[")[0]
    epochs, lr, bs = RECIPES.get((arch, name), (10, 3e-3, 64))
    return {"epochs": epochs, "lr": lr, "batch_size": bs}


def _select(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]):
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    keep = torch.isin(y, cls)
    lut = torch.full((int(max(int(cls.max()), int(y.max())) + 1),), -1, dtype=torch.long)
    lut[cls] = torch.arange(len(cls))
    return x[keep], lut[y[keep]]


def train(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor,
          classes: Sequence[int] | None = None, epochs: int = 10, lr: float = 3e-3,
          batch_size: int = 128, seed: int = 0, optimizer: str = "adamw",
          weight_decay: float = 5e-4, schedule: str = "onecycle", label_smoothing: float = 0.0,
          verbose: bool = False, on_epoch: Callable[[int, int, float, float], None] | None = None) -> nn.Module:
    """Train ``model`` in place on the samples of ``x, y`` whose label is in ``classes``.

    ``y`` holds global class ids; samples of other classes are dropped, so
    passing the full training set with a task's ``classes`` is fine.  The loss
    is cross-entropy over ``head(model(x), classes)`` -- only the task's
    logits.  ``classes=None`` means all ``head.num_classes`` classes.

    ``optimizer``: ``"adamw"`` (default) or ``"sgd"`` (momentum 0.9,
    Nesterov).  ``schedule``: ``"onecycle"`` (default; peak ``lr`` after 20%
    of the steps), ``"cosine"`` (cosine decay to 0 from ``lr``) or
    ``"constant"``.  Batches are reshuffled each epoch by a generator seeded
    from ``seed``; a trailing batch of a single sample is dropped (BatchNorm).

    ``verbose`` logs every epoch (logger ``mudsc_fx.zoo.train``); ``on_epoch(epoch, epochs, loss,
    accuracy)`` is called after every epoch (progress reports).

    Returns ``model`` (the same object) in **eval** mode.  Timing and final
    loss/accuracy are left in :data:`last_run`.
    """
    if _SKIP:
        return model.eval()
    if classes is None:
        classes = list(range(head.num_classes))
    classes = [int(c) for c in classes]
    xs, ts = _select(x, y, classes)
    n = len(ts)
    if n == 0:
        raise ValueError(f"no training samples with labels in {classes}")
    steps_per_epoch = max(1, n // batch_size + (1 if n % batch_size > 1 else 0))
    total = max(1, epochs * steps_per_epoch)
    _RUNS[0] += 1
    model.train()
    head.eval()
    t0 = time.perf_counter()
    seen = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {optimizer!r}")
        if schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2,
                                                        anneal_strategy="cos", cycle_momentum=False)
        elif schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        elif schedule == "constant":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        else:
            raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'constant', not {schedule!r}")
        loss_sum = correct = count = 0.0
        for ep in range(epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum = correct = count = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                if len(idx) < 2 and n > 1:
                    continue
                xb, tb = xs[idx], ts[idx]
                logits = head(model(xb), classes)
                loss = F.cross_entropy(logits, tb, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(idx)
                loss_sum += loss.item() * len(idx)
                correct += float((logits.argmax(1) == tb).sum())
                count += len(idx)
            if verbose:
                log.info("epoch %d/%d: loss %.4f acc %.1f%% (%.1fs)", ep + 1, epochs, loss_sum / max(count, 1),
                         100 * correct / max(count, 1), time.perf_counter() - t0)
            if on_epoch is not None:
                on_epoch(ep + 1, epochs, loss_sum / max(count, 1), 100 * correct / max(count, 1))
    dt = time.perf_counter() - t0
    last_run.clear()
    last_run.update(seconds=dt, images=seen, images_per_s=seen / max(dt, 1e-9), steps=total,
                    final_loss=loss_sum / max(count, 1), train_acc=100 * correct / max(count, 1))
    return model.eval()


def finetune(pretrained: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor,
             classes: Sequence[int] | None = None, epochs: int = 3, lr: float = 5e-4, **kw) -> nn.Module:
    """Fine-tune a **deep copy** of ``pretrained`` on ``classes`` (see :func:`train`).

    ``pretrained`` itself is not modified.  Defaults are gentler than
    :func:`train` (3 epochs, ``lr=5e-4``, onecycle) so that fine-tuned copies
    stay in the pretrained basin.
    """
    model = copy.deepcopy(pretrained)
    return train(model, head, x, y, classes, epochs=epochs, lr=lr, **kw)


# --------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$MUDSC_FX_CACHE`` if set, else ``~/.cache/mudsc_fx``; models go in its ``zoo/`` subfolder."""
    root = os.environ.get("MUDSC_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mudsc_fx")
    return Path(root)


def _key_json(key_dict: dict) -> str:
    return json.dumps({"_zoo_cache_version": _CACHE_VERSION, **key_dict}, sort_keys=True, default=str)


def cache_path(key_dict: dict, cache_dir: str | os.PathLike | None = None) -> Path:
    """File that :func:`train_cached` uses for ``key_dict``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(_key_json(key_dict).encode()).hexdigest()[:20]
    return root / "zoo" / f"{digest}.pt"


def train_cached(key_dict: dict, builder: Callable[[], nn.Module],
                 cache_dir: str | os.PathLike | None = None,
                 fit: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Return a trained model, training it only if its state dict is not cached.

    ``key_dict`` must describe everything that determines the weights (data
    set, classes, arch and kwargs, seeds, epochs, lr...); it is serialised
    with ``json.dumps(sort_keys=True, default=str)`` and hashed.  Two calling
    conventions:

    * ``fit`` given: ``builder()`` only constructs the (untrained) model and
      ``fit(model) -> model`` trains it.  On a hit ``fit`` is not called.
    * ``fit`` omitted: ``builder()`` constructs *and* trains, e.g.
      ``lambda: train(build("mlp", ds, seed=0), head, ...)``.  On a hit the
      builder is still called, but inside :func:`skip_training`, so
      :func:`train`/:func:`finetune` calls return immediately and only the
      skeleton is built (a builder with its own training loop would still
      run it -- correct, just slow).  Nested ``train_cached`` calls inside a
      builder (pretrained -> fine-tune) work: each has its own cache entry.

    The loaded/trained model is returned in eval mode.  Files are written
    atomically; the stored key is checked on load.
    """
    path = cache_path(key_dict, cache_dir)
    key_json = _key_json(key_dict)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") == key_json:
            with skip_training(True):
                model = builder()
            model.load_state_dict(blob["state_dict"])
            return model.eval()
    with skip_training(False):
        model = builder()
        if fit is not None:
            model = fit(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"key": key_json, "state_dict": state}, tmp)
    os.replace(tmp, path)
    return model.eval()
