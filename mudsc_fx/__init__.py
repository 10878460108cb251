"""mudsc_fx: merge neural networks without training, by compiling their permutation symmetry.

Pipeline (each stage a function with a frozen result)::

    trace -> infer -> collect_stats -> solve -> rewrite -> reset_bn
"""
from .ir.graph import Barrier, Member, PermutationGraph, Space, Tap
from .ir.trace import TraceError, trace
from .passes.apply import apply_permutations, random_permutations
from .passes.check import CheckReport, check
from .passes.infer import infer

__all__ = ["trace", "infer", "check", "apply_permutations", "random_permutations", "PermutationGraph",
           "Space", "Member", "Tap", "Barrier", "CheckReport", "TraceError"]
