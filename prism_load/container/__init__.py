"""The .prism container, one way: `format` (the spec: constants, encodings, records, manifest) <- `codecs`
(decoders of stored encodings) <- `reader` (Container: reads and validates, against the model config too)
<- `verify` (every byte of a container) / `loader` (a runnable model with every expert resident).

This package exports the spec and the reader; import `verify` and `loader` from their modules.
"""

from .format import *  # noqa: F403 - the spec's public names
from .reader import Container, model_args, parse_manifest, read_manifest, validate, validate_config  # noqa: F401
