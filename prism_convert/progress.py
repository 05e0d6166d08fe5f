"""The progress callback every long-running library function takes instead of printing.

`progress(description, done, total)`: `description` starts with the stage ("profile", "compress", "training")
and may go on after a colon ("compress: layer 3 done"); `done` of `total` steps are finished. The CLI turns
these calls into progress bars (prism_convert/cli/render.py); a script passes its own function, or None.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
