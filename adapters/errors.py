"""One exception family for the whole hub.

Messages name the offending thing and the expected vs found value, so a user
reading one line knows what to fix. The serving layer maps each subclass to one
HTTP status in a single place.
"""


class AdapterError(Exception):
    """Base class of every error dcft-hub raises on purpose."""


class AdapterConfigError(AdapterError, ValueError):
    """An adapter config (or training/serving config) is invalid."""


class TargetError(AdapterConfigError):
    """Target modules are unknown, match nothing, or do not fit the kernel."""


class AdapterFileError(AdapterError):
    """An adapter file is malformed, truncated, oversized or inconsistent."""


class BaseModelMismatchError(AdapterError):
    """An adapter was made for a different backbone than the one at hand."""


class RegistryError(AdapterError):
    """A hub/registry operation failed (bad name, missing version, unreachable store)."""


class RegistryUnavailableError(RegistryError):
    """The hub's store cannot be reached now (unmounted, bucket down): retry later."""


class AdapterNotFoundError(RegistryError, KeyError):
    """No adapter (or version) of that name exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AccessDeniedError(AdapterError):
    """A tenant reached for an adapter it does not own."""


class DataError(AdapterError, ValueError):
    """A dataset file is empty, lacks a column, or holds an unknown label."""


class RecordNotFoundError(AdapterNotFoundError):
    """No fine-tuning file or job of that id for this tenant (another tenant's id included)."""


class TrainingFileError(DataError):
    """A fine-tuning file is malformed or over the limits; the message names the first bad lines."""

    def __init__(self, message: str, param: str | None = "file"):
        super().__init__(message)
        self.param = param
