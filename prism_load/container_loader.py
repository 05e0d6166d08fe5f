"""Old path of prism_load/container/loader.py.

Kept only for the importers outside this half of issue 15 that still use the old path (prism_convert/,
prism_load/packed.py: owned by others while the restructuring is under way); delete it once they import
from prism_load.container.
"""

from .container.loader import dense_decode_dtype  # noqa: F401
