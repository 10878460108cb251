"""mudsc_fx: merge neural networks without training, by compiling their permutation symmetry."""
