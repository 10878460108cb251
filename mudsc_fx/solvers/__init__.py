"""Matching solvers Psi: pure numpy/scipy functions from similarities to unit assignments."""
from mudsc_fx.solvers.match import (GroupAlignment, align, group_align, group_zip,
                                    matrices_from_labels, matrices_from_perms)
from mudsc_fx.solvers.zipit import zip_match, zip_match_reference

__all__ = [
    "align", "zip_match", "zip_match_reference", "matrices_from_perms",
    "matrices_from_labels", "GroupAlignment", "group_align", "group_zip",
]
