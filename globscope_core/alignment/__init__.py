"""Permutation symmetry: weight matching, activation matching and the learned DEEP-ALIGN."""
