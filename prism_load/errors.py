"""One exception type per boundary; the CLI turns any PrismError into one line and exit code 2."""


class PrismError(Exception):
    """Base of every error caused by user input (files, configs, options), never by a bug."""


class ConfigError(PrismError):
    """config.json is missing a field, has a bad value, or names an unsupported architecture."""


class CheckpointError(PrismError):
    """A Hugging Face checkpoint folder is incomplete or inconsistent (missing tensor, wrong shape)."""


class ContainerError(PrismError):
    """A .prism container is damaged, hostile or does not match the format spec."""


class RecipeError(PrismError):
    """A conversion recipe is malformed or names unknown keys."""


class CalibrationError(PrismError):
    """A calibration source cannot provide the requested samples."""


class ProfileError(PrismError):
    """A routing profile is missing, incomplete or belongs to another model."""


class BudgetError(PrismError):
    """A size or bits budget cannot be met by any allocation."""


class DoesNotFit(BudgetError):
    """A load would hold more bytes than this process may still take (runtime/memory.check_fits): need_bytes,
    available_bytes and where that figure comes from (source), for a caller that picks another way to load."""

    def __init__(self, message: str, need_bytes: int, available_bytes: int, source: str):
        super().__init__(message)
        self.need_bytes, self.available_bytes, self.source = need_bytes, available_bytes, source


class EncodingError(PrismError):
    """A tensor cannot be encoded as asked (bad shape, non-finite values, mismatched statistics)."""


class GenerationError(PrismError, ValueError):
    """Inputs to generation disagree: a mask of the wrong shape, right padding, an empty prompt."""
