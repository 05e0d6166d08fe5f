"""The runtime: experts of a converted model served from a budgeted cache, with shadow-router prefetch and
NUMA placement. `prism_load.load(path, expert_cache="50%")` builds it; see attach.py for the wiring.

- config.py: RuntimeConfig, every option of prism_load.load (loader.py loads with one);
- stores.py: the cold tier (checkpoint, memory; container_store.py: a container) behind one small protocol;
- cache.py: the fast (and, on CUDA, host) tier within a byte budget, eviction by next use (eviction.py);
- native_misses.py: a cache's misses served inside the native decode loop (native/expert_miss.c), replayed;
- prefetch.py: the background fetch worker and the shadow router;
- numa.py: topology from sysfs, libnuma allocations, placement of hot experts on the compute node;
- cuda.py: pinned copies, side-stream transfers, events; stats.py: the counters behind model.stats().
"""

from .attach import Runtime, attach_runtime, parse_budget
from .cache import CachedExperts, ExpertCache
from .config import RuntimeConfig
from .container_store import ContainerStore
from .loader import load_cached
from .stores import CheckpointStore, ExpertStore, MemoryStore

__all__ = [
    "CachedExperts",
    "CheckpointStore",
    "ContainerStore",
    "ExpertCache",
    "ExpertStore",
    "MemoryStore",
    "Runtime",
    "RuntimeConfig",
    "attach_runtime",
    "load_cached",
    "parse_budget",
]
