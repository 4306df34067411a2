"""Shared test set-up: one torch thread (tiny tensors are slower multi-threaded on 2 cores)."""

import torch

torch.set_num_threads(1)

