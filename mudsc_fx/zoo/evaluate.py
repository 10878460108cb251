"""MuDSC/ZipIt evaluation protocol for models that share a :class:`ClassHead`.

Metrics (all in percent), for ``tasks`` = a list of disjoint class-id sequences:

* ``joint``: over every test image whose label is in the union of the tasks'
  classes, argmax over the logits of **that union** (equal to "all classes"
  whenever the tasks cover the whole data set, the usual case).
* ``task_accs``: per task, accuracy on that task's test images with the
  argmax restricted to the task's own classes.
* ``task_a`` / ``task_b``: ``task_accs[0]`` / ``task_accs[1]`` when there
  are exactly two tasks.
* ``avg``: mean of ``task_accs``.

``backbone`` may be one model or a list/tuple of models; a list is scored
with :func:`ensemble_logits` (the ensemble reference of the paper). A model
whose output is a tuple of embeddings (a partially zipped model: one per
tail) is scored like the ensemble, by the sum of the tails' probabilities.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["evaluate", "ensemble_logits", "embed", "logits", "eval_mode"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Put modules in eval mode and restore each module's (and submodule's) own mode afterwards."""
    saved = [[(m, m.training) for m in mod.modules()] for mod in modules]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for lst in saved:
            for m, flag in lst:
                m.training = flag


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model(x)`` in eval mode under no_grad, batched; restores the model's mode. A model
    returning a tuple of embeddings gives a tuple of them."""
    with eval_mode(model):
        outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if outs and isinstance(outs[0], (tuple, list)):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs) if outs else x.new_zeros((0, getattr(model, "out_dim", 0)))


@torch.no_grad()
def logits(model: nn.Module, head: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits over all ``head.num_classes`` classes, ``[N, num_classes]``; for a model with
    several outputs (a partially zipped model's tails), the sum of their probabilities."""
    with eval_mode(head):
        e = embed(model, x, batch_size)
        if isinstance(e, tuple):
            return sum(head(t).softmax(-1) for t in e)
        return head(e)


@torch.no_grad()
def ensemble_logits(models: Sequence[nn.Module], head: nn.Module, x: torch.Tensor,
                    mode: str = "prob", batch_size: int = 512) -> torch.Tensor:
    """Scores ``[N, num_classes]`` of an ensemble of backbones sharing ``head``.

    ``mode``:

    * ``"prob"`` (default): sum over models of ``softmax(head(model(x)))``
      over all classes -- averaging the models' predictions.  A task model
      is confident on its own images and spread out on the others', so the
      sum mostly follows the model that "knows" the image.
    * ``"emb"``: ``head(mean_m normalize(model_m(x)))`` -- average of the
      unit-normalised embeddings, scored by the head once.
    * ``"logit"``: sum of the models' logits.

    The result is only meant for argmax (it is not a log-probability).
    """
    if mode not in ("prob", "emb", "logit"):
        raise ValueError(f"mode must be 'prob', 'emb' or 'logit', not {mode!r}")
    with eval_mode(head):
        if mode == "emb":
            e = sum(F.normalize(embed(m, x, batch_size), dim=-1) for m in models) / len(models)
            return head(e)
        out = None
        for m in models:
            lg = head(embed(m, x, batch_size))
            s = lg.softmax(-1) if mode == "prob" else lg
            out = s if out is None else out + s
        return out


def _acc(pred: torch.Tensor, target: torch.Tensor) -> float:
    return 100.0 * float((pred == target).float().mean()) if len(target) else float("nan")


@torch.no_grad()
def evaluate(backbone, head: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
             tasks: Sequence[Sequence[int]], batch_size: int = 512, ensemble: str = "prob") -> dict:
    """Joint / per-task / average accuracy (percent) -- see the module docstring.

    ``backbone``: an ``nn.Module`` returning embeddings, or a list/tuple of
    them (scored with :func:`ensemble_logits` in mode ``ensemble``).  Models
    are run in eval mode under no_grad and their modes are restored.
    Returns ``{"joint", "task_accs", "avg", "n_test", "task_a", "task_b"}``
    (the last two only for two tasks).
    """
    tasks = [tuple(int(c) for c in t) for t in tasks]
    if not tasks:
        raise ValueError("need at least one task")
    union = sorted({c for t in tasks for c in t})
    if len(union) != sum(len(t) for t in tasks):
        raise ValueError(f"tasks must be disjoint: {tasks}")
    keep = torch.isin(y_test, torch.tensor(union, dtype=y_test.dtype))
    x, y = x_test[keep], y_test[keep]
    if isinstance(backbone, (list, tuple)):
        scores = ensemble_logits(backbone, head, x, ensemble, batch_size)
    else:
        scores = logits(backbone, head, x, batch_size)

    def restricted_pred(cols, s):
        cols_t = torch.tensor(cols, dtype=torch.long)
        return cols_t[s[:, cols_t].argmax(1)]

    res = {"joint": _acc(restricted_pred(union, scores), y), "n_test": int(len(y))}
    accs = []
    for t in tasks:
        m = torch.isin(y, torch.tensor(t, dtype=y.dtype))
        accs.append(_acc(restricted_pred(list(t), scores[m]), y[m]))
    res["task_accs"] = accs
    res["avg"] = sum(accs) / len(accs)
    if len(tasks) == 2:
        res["task_a"], res["task_b"] = accs
    return res
