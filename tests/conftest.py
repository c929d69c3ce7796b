import pytest
import torch

# Tiny models run fastest on one thread, and a busy 2-core CI machine makes extra threads fight.
torch.set_num_threads(1)

from tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture
def sd_pipe(tmp_path):
    return tiny_sd_pipeline(tmp_path)


@pytest.fixture
def sdxl_pipe(tmp_path):
    return tiny_sdxl_pipeline(tmp_path)


@pytest.fixture
def no_compile(monkeypatch):
    """torch.compile raises: a CPU run must not reach it."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called on a CPU")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
