"""Shared by the bench tests: each bench script sets torch threads and quiets library logging."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """Give the tests after a bench script their torch threads, log levels and progress bars back."""
    import transformers

    threads = torch.get_num_threads()
    levels = {n: logging.getLogger(n).level for n in ("fedpeft", "absl")}
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.utils.logging.enable_progress_bar()
