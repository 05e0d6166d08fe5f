"""The CUDA path of the expert cache: stored bytes pinned in the host tier, copied on a side stream and decoded
on the GPU, events ordering the compute. Skipped without CUDA; bench/gpu_check.sh runs these on a GPU machine."""

from __future__ import annotations

import threading

import pytest
import torch
from containers import FACTORED_MIX
from runtime_fixtures import RUNTIME_CONFIG, prompts, write_runtime_container

import prism_load

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    return write_runtime_container(tmp_path_factory.mktemp("gpu") / "m.prism")


@pytest.fixture(scope="module")
def resident(container):
    return prism_load.load(container, device="cuda")


def greedy(model, ids, n=10):
    return model.generate(ids.cuda(), max_new_tokens=n, eos_token_id=[])


def two_experts(container) -> int:
    """A budget of two experts (of 8 per layer): far below one layer's experts."""
    model = prism_load.load(container, device="cuda", expert_cache="100%", prefetch=False)
    return 2 * model.runtime.cache.largest_bytes


def test_device_decode_is_bit_exact_to_cpu_decode(container):
    """Integer and bf16 codecs (the runtime container's mix) are elementwise: the GPU decodes the CPU's bits."""
    decoded = {"expert_form": "decoded", "dtype": torch.float32}
    cpu = prism_load.load(container, expert_cache="100%", prefetch=False, **decoded).runtime.cache.store
    gpu = prism_load.load(container, device="cuda", expert_cache="100%", prefetch=False, **decoded).runtime.cache
    for i in cpu.moe_layers:
        for e in range(cpu.num_experts):
            want = cpu.load(i, e)
            weights, event = gpu.transfer.load(gpu.store, i, e, gpu.transfer.pin(gpu.store.fetch(i, e)))
            event.synchronize()
            assert weights.gate_up.is_cuda and weights.down.is_cuda
            assert torch.equal(weights.gate_up.cpu(), want.gate_up) and torch.equal(weights.down.cpu(), want.down)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("decode_on", ["device", "cpu"])
def test_small_cache_on_gpu_matches_resident(container, resident, prefetch, decode_on):
    model = prism_load.load(container, device="cuda", expert_cache=two_experts(container), prefetch=prefetch,
                            decode_on=decode_on)
    for ids in prompts(3, RUNTIME_CONFIG["vocab_size"], seed=1):
        torch.testing.assert_close(model(ids.cuda()), resident(ids.cuda()), rtol=0, atol=1e-5)
        assert torch.equal(greedy(model, ids), greedy(resident, ids))
    s = model.stats()
    assert s["misses"] > 0 and s["hits"] + s["misses"] == s["uses"]
    assert s["residency"]["reserved_bytes"] <= s["residency"]["budget_bytes"]
    model.runtime.cache.check()


def test_host_tier_serves_repeat_misses_without_cold_reads(container):
    model = prism_load.load(container, device="cuda", expert_cache=two_experts(container), prefetch=False,
                            host_cache="100%")
    for ids in prompts(3, RUNTIME_CONFIG["vocab_size"], seed=2):
        greedy(model, ids)
    s = model.stats()
    store = model.runtime.cache.store
    keys = [(i, e) for i in store.moe_layers for e in range(store.num_experts)]
    assert s["host_hits"] > 0
    assert s["loads"] <= len(keys)  # every expert read from the cold tier at most once
    assert s["residency"]["host_bytes"] <= sum(store.stored_nbytes(*k) for k in keys)


def test_weights_wait_for_their_copy_on_the_compute_stream(container):
    """A freshly loaded expert is used right away on the compute stream: the event orders the matmul after
    the side-stream copy and decode, so the result equals the CPU's."""
    model = prism_load.load(container, device="cuda", expert_cache=two_experts(container), prefetch=False,
                            expert_form="decoded", dtype=torch.float32)
    cache = model.runtime.cache
    x = torch.randn(1, RUNTIME_CONFIG["hidden_size"])
    for e in range(cache.store.num_experts):
        cache.acquire(0, [e])
        w = cache.use(0, e)
        y = torch.nn.functional.linear(x.cuda(), w.gate_up)  # queued behind the event, no host sync
        cache.release_thread()
        want = torch.nn.functional.linear(x, cache.store.load(0, e).gate_up)
        torch.testing.assert_close(y.cpu(), want, rtol=1e-5, atol=1e-5)


def test_factored_experts_on_gpu(tmp_path):
    path = write_runtime_container(tmp_path / "f.prism", mix=FACTORED_MIX)
    resident = prism_load.load(path, device="cuda")
    model = prism_load.load(path, device="cuda", expert_cache="25%", prefetch=True)
    ids = prompts(1, RUNTIME_CONFIG["vocab_size"], seed=3)[0]
    assert torch.equal(greedy(model, ids, 6), greedy(resident, ids, 6))


def test_concurrent_generation_on_gpu(container, resident):
    model = prism_load.load(container, device="cuda", expert_cache=two_experts(container) * 2, prefetch=True,
                            lookahead=2)
    batches = [prompts(2, RUNTIME_CONFIG["vocab_size"], seed=10 + n) for n in range(3)]
    want = [[greedy(resident, ids) for ids in b] for b in batches]
    got = [[None, None] for _ in batches]
    errors = []

    def run(n):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):  # each thread computes on its own stream
                for k, ids in enumerate(batches[n]):
                    got[n][k] = greedy(model, ids)
                torch.cuda.current_stream().synchronize()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert all(torch.equal(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws))


def test_fitted_predictors_run_on_the_gpu(tmp_path):
    """The container's fitted predictors move to the GPU with the model: prediction runs there, output exact."""
    from containers import random_model, write_tiny

    n, h = RUNTIME_CONFIG["num_local_experts"], RUNTIME_CONFIG["hidden_size"]
    g = torch.Generator().manual_seed(0)
    predictor = {(j, i): {"recall": 0.9, "shadow_recall": 0.8, "weight": torch.randn(n, h, generator=g),
                          "bias": torch.randn(n, generator=g)} for j, i in ((1, 0), (2, 0), (2, 1))}
    path = write_tiny(tmp_path / "p.prism", model=random_model(RUNTIME_CONFIG), config=RUNTIME_CONFIG,
                      predictor=predictor)
    resident = prism_load.load(path, device="cuda")
    model = prism_load.load(path, device="cuda", expert_cache="50%", prefetch=True, lookahead=2)
    assert model.stats()["predictor_layers"] == [[1, 0], [2, 0], [2, 1]]
    assert all(p.weight.is_cuda for p in model.runtime.shadow.predictors.values())
    for ids in prompts(2, RUNTIME_CONFIG["vocab_size"], seed=5):
        assert torch.equal(greedy(model, ids, 8), greedy(resident, ids, 8))
    assert model.stats()["layers"][2]["predicted_steps"] > 0
    model.runtime.close()


def test_gpu_numa_node_is_read_or_unknown():
    from prism_load.runtime.cuda import gpu_pci_address
    from prism_load.runtime.numa import gpu_pci_node

    address = gpu_pci_address(0)
    assert address is None or address.count(":") == 2
    node = gpu_pci_node(0)
    assert node is None or node >= 0


def test_packed_experts_on_gpu_stay_packed_and_match_the_cpu(container):
    """On CUDA the fast tier holds the stored bytes (dequantised on the device at each use): the resident
    model's expert tensors are the container's expert bytes, and its fp32 logits are the CPU's decoded ones."""
    from prism_load.container.reader import Container
    from prism_load.runtime.stores import weights_nbytes

    bf16 = prism_load.load(container, device="cuda")  # bf16 tensors of the mix stay bf16: stored bytes too
    held = sum(weights_nbytes(w) for _, b in bf16.moe_blocks() for w in b.experts.experts)
    with Container(container) as c:
        assert held == sum(enc.nbytes() for r in c.records for enc in r.encodings.values())
    gpu = prism_load.load(container, device="cuda", dtype=torch.float32)
    cpu = prism_load.load(container, dtype=torch.float32, expert_form="decoded")
    ids = prompts(1, RUNTIME_CONFIG["vocab_size"], seed=4)[0]
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids), rtol=1e-4, atol=1e-4)
