"""mudsc_fx: merge neural networks without training, by compiling their permutation symmetry.

Pipeline (each stage a function with a frozen result)::

    trace -> infer -> collect_stats -> solve -> rewrite -> reset_bn
"""
from .ir.graph import Barrier, Member, PermutationGraph, Space, Tap
from .ir.errors import TraceError
from .ir.trace import trace
from .passes.apply import apply_permutations, random_permutations
from .passes.check import CheckReport, check
from .passes.infer import infer
from .passes.solve import Alignment, MatchConfig, solve
from .passes.stats import Statistics, collect_stats
from .passes.rewrite import rewrite
from .merge import PRESETS, Merger, MergeResult, align_models, merge, method_config
from .passes.bn_reset import reset_bn
from .methods import register_method
from .rules import register_rule
from . import rules
from .taskvec import EMRModel, emr_merge, task_arithmetic, ties_merge
from . import views  # pictures and pages of a graph or a merge (matplotlib only when drawing)

__all__ = ["trace", "infer", "check", "collect_stats", "solve", "rewrite", "reset_bn", "merge", "align_models",
           "method_config", "apply_permutations", "random_permutations", "emr_merge", "task_arithmetic",
           "ties_merge", "EMRModel", "PermutationGraph", "Space", "Member", "Tap", "Barrier", "CheckReport",
           "TraceError", "Statistics", "Alignment", "MatchConfig", "MergeResult", "Merger", "PRESETS", "register_method", "register_rule", "rules", "views"]
