"""Suite-wide settings.

Tests run torch on one thread: the models here are tiny, and on a 2-core machine OpenMP threads
waiting for each other make small matmuls far slower (and a busy neighbour makes it much worse).
One fixed thread count also keeps bit-exact comparisons meaningful within a process.
"""

import torch

torch.set_num_threads(1)
