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


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread, restored afterwards: decode-sized ops on a shared 2-core machine spend
    more time in OpenMP barriers than computing. Threads the tests start inherit nothing: OpenMP's setting
    is per thread, so each generating thread sets it too (see runtime_fixtures.greedy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (the env var is read at import, so patch the constant),
    plus spies on the two download functions prism_load.hub calls."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls = []
    for name in ("snapshot_download", "hf_hub_download"):
        real = getattr(huggingface_hub, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(huggingface_hub, name, spy)
    return calls


@pytest.fixture(scope="session")
def q8():
    """Skip unless the native integer-activation kernels (int16 / int8 x: q8_linear.c and the fused decode calls
    built on it) run here."""
    from prism_load import native

    if not native.q8_available():
        pytest.skip(f"the integer kernels do not run here: {native.unavailable_reason()}")


@pytest.fixture
def per_layer_decode(monkeypatch):
    """The whole-token call (models/native_token.py, tests/test_native_token.py) off, for tests about the per-layer
    native steps, which it would otherwise run inside its one native loop."""
    from prism_load.models import native_token

    monkeypatch.setattr(native_token, "run", lambda *a: None)
