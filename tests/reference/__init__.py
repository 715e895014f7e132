"""Independent references for the tests: written from the papers' formulas, in float64 where it matters.

Nothing here imports the module it is a reference for, and nothing in ``latentmoe`` imports this package:
a fast path and its reference share no helper (a shared SwiGLU would let a bug in it pass both sides).
"""
