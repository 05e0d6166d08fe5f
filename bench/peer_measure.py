"""One runtime on one model, in a fresh process so its peak RSS is its own (bench/bench_peer.py runs this once
per model): load, prefill the prompt, greedy decode; prints one JSON line.

Both runtimes go through the same protocol: a warm-up (one prefill and 8 decode steps), then per repeat a
cleared KV cache, the whole prompt in one forward (prefill tokens/s) and `tokens` greedy steps, one token
each (decode tokens/s: the steps after the prefill, argmax included). Figures are medians over repeats.

    python bench/peer_measure.py prism  MODEL.prism --prompt 1,2,3 [--tokens 64 --threads 2 --repeats 3]
    python bench/peer_measure.py llama  MODEL.gguf  --prompt 1,2,3 [...]
    python bench/peer_measure.py reference CHECKPOINT --prompt 1,2,3 --logits OUT.npy   # fp32 prompt logits only

llama.cpp loads with use_mmap=False, so its weights are read into its own memory and counted in its RSS as
prism's are (a memory-mapped GGUF's pages count only once touched, and stay shared with the page cache).
This module imports torch only for prism, so the llama.cpp process carries no torch.

Options for bench_peer's other rows: --mmap (llama.cpp use_mmap=True, prism load(mmap=True)), --no-repack
(llama.cpp without its repacked weight copies), --expert-cache / --prefetch / --eviction / --verify-always / --python-misses / --kernel-readahead (prism behind its cache), --cold
(the model's files dropped from the page cache first) and --memory-cap BYTES (the process joins a memory cgroup
after its imports: bench/memory_cap.py). A prism load that would not fit the memory left is refused by prism_load
before it reads the experts: the line is then {"refused": the message}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

WARMUP_STEPS = 8


def memory() -> dict[str, int]:
    """VmRSS, VmHWM (peak resident set), RssAnon and RssFile (of VmRSS: the process's own pages, and file pages
    it maps, shared with the page cache) of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PrismRunner:
    """prism_load.load(path) with its defaults; the KV cache and forward of prism_load.models.model."""

    def __init__(self, path: str, threads: int, dtype: str | None = None, expert_kernel: str = "auto",
                 mmap: bool = False, expert_cache: str | None = None, prefetch: bool = False,
                 eviction: str | None = None, verify_always: bool = False, python_misses: bool = False,
                 kernel_readahead: bool = False):
        import torch

        torch.set_num_threads(threads)
        import prism_load

        self.torch = torch
        options = {} if expert_kernel == "auto" else {"expert_kernel": expert_kernel}
        options |= {"mmap": True} if mmap else {}
        options |= {"expert_cache": expert_cache} if expert_cache else {}
        options |= {"prefetch": True} if prefetch else {}
        options |= {"eviction": eviction} if eviction else {}
        options |= {"verify_checksums": "always"} if verify_always else {}
        self.model = prism_load.load(path, dtype=getattr(torch, dtype) if dtype else None, **options)
        if python_misses and getattr(self.model, "runtime", None) is not None:
            self.model.runtime.cache.native_allowed = False  # every miss by a callback (runtime/native_misses.py)
        if kernel_readahead and getattr(self.model, "runtime", None) is not None:
            self.model.runtime.cache.store.container.read_randomly(False)  # the kernel's readahead on the shards
        self.cache = None

    def reset(self) -> None:
        self.cache = self.model.new_cache()

    def forward(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            # the last position's logits only, as llama.cpp computes them (logits_all=False)
            logits = self.model(self.torch.tensor([ids]), cache=self.cache, logits_to_keep=1)[0, -1]  # [V]
        return logits.float().numpy()

    def reset_cache_stats(self) -> None:
        if getattr(self.model, "runtime", None) is not None:
            self.model.reset_stats()

    def cache_stats(self) -> dict | None:
        """The expert cache's counts since reset_cache_stats (None without a cache): what a ratio to the
        resident model rests on, since a random model's greedy continuations may repeat experts."""
        if getattr(self.model, "runtime", None) is None:
            return None
        stats = self.model.stats()
        return {k: stats[k] for k in ("hit_rate", "uses", "misses", "stall_seconds", "bytes_fetched")}

    def close(self) -> None:
        runtime = getattr(self.model, "runtime", None)
        if runtime is not None:
            runtime.close()


class LlamaRunner:
    """llama-cpp-python's Llama: eval() runs llama_decode; the last position's logits read back directly."""

    def __init__(self, path: str, threads: int, n_ctx: int, mmap: bool = False, repack: bool = True,
                 lazy: bool = False):
        import llama_cpp

        self.llama_cpp = llama_cpp
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def model_params():  # what Llama() has no argument for: llama_model_params fields it then fills in
            params = defaults()
            params.use_extra_bufts = repack  # repacked copies of the weights (CPU_REPACK), even under mmap
            if lazy:
                params.lazy_mode = llama_cpp.LLAMA_LAZY_MODE_ON  # expert rows read on demand (needs mmap)
            return params

        llama_cpp.llama_cpp.llama_model_default_params = model_params
        try:
            self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                                       n_ubatch=512, use_mmap=mmap, verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults
        self.n_vocab = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.reset()  # the next eval() drops every cached position past n_tokens = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self.llm.close()  # before interpreter shutdown, which otherwise frees it out of order


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop a file's (or a folder's files') cached pages, so the next read is a disk read."""
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(runner, prompt: list[int], tokens: int, repeats: int) -> dict:
    runner.reset()
    logits = runner.forward(prompt)
    for _ in range(WARMUP_STEPS):
        logits = runner.forward([int(logits.argmax())])
    if hasattr(runner, "reset_cache_stats"):  # the expert cache's counts cover the measured forwards only
        runner.reset_cache_stats()
    prefill, decode, generated, prompt_logits = [], [], None, None
    for _ in range(repeats):
        runner.reset()
        t0 = time.perf_counter()
        logits = runner.forward(prompt)
        t1 = time.perf_counter()
        if prompt_logits is None:
            prompt_logits = logits
        out = []
        for _ in range(tokens):
            out.append(int(logits.argmax()))
            logits = runner.forward([out[-1]])
        t2 = time.perf_counter()
        generated = generated or out
        prefill.append(len(prompt) / (t1 - t0))
        decode.append(tokens / (t2 - t1))
    return {"prefill_tokens_per_second": statistics.median(prefill), "prefill_repeats": prefill,
            "decode_tokens_per_second": statistics.median(decode), "decode_repeats": decode,
            "generated": generated, "prompt_logits": prompt_logits,
            **({"cache": runner.cache_stats()} if hasattr(runner, "cache_stats") else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runtime", choices=["prism", "llama", "reference"])
    ap.add_argument("model")
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--logits", help="write the prompt's last-position logits here (.npy)")
    ap.add_argument("--expert-kernel", default="auto", help="prism: load()'s expert_kernel")
    ap.add_argument("--mmap", action="store_true", help="load through a memory map (llama.cpp use_mmap, prism mmap)")
    ap.add_argument("--cold", action="store_true", help="drop the model's files from the page cache first")
    ap.add_argument("--no-repack", action="store_true", help="llama.cpp: no repacked weight copies (use_extra_bufts "
                    "off), so a memory-mapped model's weights stay in the mapping")
    ap.add_argument("--lazy", action="store_true", help="llama.cpp: lazy_mode ON, expert rows read on demand (mmap)")
    ap.add_argument("--expert-cache", help="prism: load()'s expert_cache (a budget: '40%%', '128MB')")
    ap.add_argument("--prefetch", action="store_true", help="prism: prefetch=True (with --expert-cache)")
    ap.add_argument("--eviction", choices=("next-use", "frequency", "lru"),
                    help="prism: load()'s eviction (with --expert-cache; default next-use)")
    ap.add_argument("--verify-always", action="store_true",
                    help="prism: verify_checksums='always' (every read checked, a cache's reloads too)")
    ap.add_argument("--python-misses", action="store_true",
                    help="prism: every cache miss by a callback into Python (runtime/native_misses.py off)")
    ap.add_argument("--kernel-readahead", action="store_true", help="prism: the kernel's readahead left on the expert "
                    "shards (Container.read_randomly(False): each miss reads past its expert, as before it)")
    ap.add_argument("--memory-cap", type=int, help="bytes this process may charge past its imports (a memory cgroup "
                    "joined after them, bench/memory_cap.py; implies --cold, so the model's pages are charged to it)")
    args = ap.parse_args()
    prompt = [int(x) for x in args.prompt.split(",")]
    if args.runtime == "llama":
        import llama_cpp  # noqa: F401 - imported before the baseline, as torch is for prism
    else:
        import torch  # noqa: F401
    if args.cold or args.memory_cap:
        drop_from_page_cache(Path(args.model))
    cap = None
    if args.memory_cap:
        from memory_cap import CapUnavailable, MemoryCap

        try:
            cap = MemoryCap.join(args.memory_cap)
        except CapUnavailable as e:
            raise SystemExit(f"--memory-cap: {e}") from None
    try:
        imported = memory()["VmRSS"]
        start = time.perf_counter()
        if args.runtime == "llama":
            runner = LlamaRunner(args.model, args.threads, n_ctx=len(prompt) + args.tokens + WARMUP_STEPS + 64,
                                 mmap=args.mmap, repack=not args.no_repack, lazy=args.lazy)
        else:
            from prism_load.errors import BudgetError

            try:
                runner = PrismRunner(args.model, args.threads, dtype="float32" if args.runtime == "reference" else None,
                                     expert_kernel=args.expert_kernel, mmap=args.mmap, expert_cache=args.expert_cache,
                                     prefetch=args.prefetch, eviction=args.eviction,
                                     verify_always=args.verify_always, python_misses=args.python_misses,
                                     kernel_readahead=args.kernel_readahead)
            except BudgetError as e:  # a load that would not fit, refused before it read the experts: a row too
                print(json.dumps({"refused": str(e)}))
                return
        load_seconds = time.perf_counter() - start
        loaded = memory()["VmRSS"]
        if args.runtime == "reference":
            runner.reset()
            result = {"prompt_logits": runner.forward(prompt)}
        else:
            result = run(runner, prompt, args.tokens, args.repeats)
        if args.logits:
            np.save(args.logits, result["prompt_logits"].astype(np.float32))
        del result["prompt_logits"]
        runner.close()
        mem = memory()
        if cap is not None:
            result |= {"memory_cap_bytes": args.memory_cap, "cap_peak_bytes": cap.peak_bytes(),
                       "cap_reclaim_failures": cap.reclaim_failures()}
    finally:
        if cap is not None:
            cap.leave()
    print(json.dumps({**result, "load_seconds": load_seconds, "rss_after_imports_bytes": imported,
                      "rss_after_load_bytes": loaded, "peak_rss_bytes": mem["VmHWM"],
                      "final_rss_anon_bytes": mem["RssAnon"], "final_rss_file_bytes": mem["RssFile"], "threads": args.threads,
                      "tokens": args.tokens, "prompt_tokens": len(prompt), "repeats": args.repeats}))


if __name__ == "__main__":
    main()
