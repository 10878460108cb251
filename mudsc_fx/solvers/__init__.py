"""Matching solvers Psi: pure numpy/scipy functions from similarities to unit assignments."""
from mudsc_fx.solvers.match import (GroupAlignment, align, group_align, group_zip, live_weights,
                                    matrices_from_labels, matrices_from_perms, perms_to_labels)
from mudsc_fx.solvers.zipit import zip_match, zip_match_fast, zip_match_reference
from mudsc_fx.solvers.families import Matcher, Matching, register_matcher

__all__ = [
    "align", "zip_match", "zip_match_fast", "zip_match_reference", "matrices_from_perms",
    "matrices_from_labels", "perms_to_labels", "live_weights", "GroupAlignment", "group_align", "group_zip",
    "Matcher", "Matching", "register_matcher",
]
