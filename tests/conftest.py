import pytest
import torch
from tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(name) -> (folder, transformers model), built once per session."""
    built = {}

    def make(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = (folder, save_tiny(name, folder))
        return built[name]

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
