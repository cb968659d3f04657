"""Session fixtures: tiny random-weight models of each architecture; GPU tests skip on CPU."""

from pathlib import Path

import pytest
import torch
from mm_testing import ARCHS

from mm_runtime.shared.tiny_models import write_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: write_tiny_model(root / arch, arch) for arch in ARCHS}
