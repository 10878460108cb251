"""Per-op knowledge: the rule table, the API rules are written against, and the rule bodies.

- :mod:`.context`: ``InferContext`` (what a rule may read and do), labels, the soundness contract.
- :mod:`.table`: ``RULES`` (THE table), :func:`register_rule`, third-party registration.
- bodies by kind: :mod:`.layers` (weights: linear, conv, norms, embedding, attention),
  :mod:`.elementwise` (elementwise, reductions, ops along one axis), :mod:`.shape` (reshape,
  permute, indexing, cat/split, pooling), :mod:`.matmul` (matmul, addmm, sdpa, einsum), shared
  helpers in :mod:`.common`; third-party rows in :mod:`.torchvision` (and siblings).

A user's own op gets a row with :func:`register_rule`; a rule body is ``rule(ctx, node) ->
label`` using only ``ctx``'s methods (see :mod:`.context`).
"""
from .context import InferContext, NotATensor, ParamUse, TensorLabel, fixed_label
from .elementwise import binary, passthrough, reduction
from .table import RULES, LIBRARIES, Rule, lookup_rule, register_library, register_rule

__all__ = ["InferContext", "TensorLabel", "ParamUse", "NotATensor", "fixed_label", "RULES", "LIBRARIES",
           "Rule", "lookup_rule", "register_rule", "register_library", "passthrough", "binary", "reduction"]
