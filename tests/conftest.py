"""Shared test set-up: one torch thread (tiny tensors are slower multi-threaded on 2 cores), and the
tiny checkpoint several command tests read (never write: no command changes its input)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A saved planted-outlier Llama folder: hidden 64, 2 layers, 4 heads, intermediate 128 (a power
    of two, so R4 exports), with a tokenizer."""
    from orthoopt.testing import save_planted

    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128)
