import pytest

from tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture
def sd_pipe(tmp_path):
    return tiny_sd_pipeline(tmp_path)


@pytest.fixture
def sdxl_pipe(tmp_path):
    return tiny_sdxl_pipeline(tmp_path)
