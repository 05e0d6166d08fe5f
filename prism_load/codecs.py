"""Old path of prism_load/container/codecs.py (decoders) and container/format.py (Encoding).

Kept only for the importers outside this half of issue 15 that still use the old path (prism_convert/,
prism_load/packed.py: owned by others while the restructuring is under way); delete it once they import
from prism_load.container.
"""

from .container.codecs import LowRankLinear, check_tensors, decode, pack_bits, unpack_bits  # noqa: F401
from .container.format import INT_BITS, PASSTHROUGH_DTYPES, Encoding, packed_row_bytes  # noqa: F401
