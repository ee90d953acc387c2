"""The one error hierarchy of patchctl.

Every error a user can cause is a :class:`PatchctlError`. The docstring of each
subclass says what it means; the message names the bad value and the fix. The
CLI turns these into one line on stderr and a non-zero exit; the server into an
HTTP status with an OCI-style JSON body.
"""

from __future__ import annotations


class PatchctlError(Exception):
    """Base class of every error patchctl raises on purpose."""

    exit_code = 1
    code = "UNKNOWN"


class NotFound(PatchctlError):
    """A ref, digest, file or folder that was asked for does not exist."""

    exit_code = 2
    code = "NOT_FOUND"


class InvalidReference(PatchctlError):
    """A ``name:tag`` or digest string that does not match the allowed pattern."""

    code = "NAME_INVALID"


class InvalidPatch(PatchctlError):
    """Input that cannot be read as a patch: bad config, header, shapes or values."""

    code = "PATCH_INVALID"


class UnsupportedPatch(InvalidPatch):
    """A well-formed patch of a type the math does not handle (e.g. DoRA, IA3)."""

    code = "PATCH_UNSUPPORTED"


class InvalidCheckpoint(PatchctlError):
    """A model folder or safetensors file that is missing pieces or is malformed."""

    code = "CHECKPOINT_INVALID"


class BaseMismatch(PatchctlError):
    """A patch used with a base whose fingerprint is not the one it records."""

    code = "BASE_MISMATCH"


class ShapeMismatch(InvalidPatch):
    """A patch tensor whose shape does not fit the base tensor it changes."""

    code = "SHAPE_MISMATCH"


class DigestMismatch(PatchctlError):
    """Bytes whose sha256 is not the digest they were stored or sent under."""

    code = "DIGEST_INVALID"


class RegistryError(PatchctlError):
    """A registry folder that cannot be used: unknown version, not a registry."""

    code = "REGISTRY_INVALID"


class LogDamaged(RegistryError):
    """A line of a ref log or record log that is not what patchctl wrote (its checksum fails)."""

    def __init__(self, path: str, line: int, why: str):
        self.path, self.line, self.why = path, line, why
        super().__init__(f"{path} line {line}: {why}; the log is damaged: run `patchctl fsck` "
                         "(`fsck --repair-logs` restores lines the index still knows)")

    def __reduce__(self) -> tuple:
        return (LogDamaged, (self.path, self.line, self.why))


class PickleRefused(PatchctlError):
    """A pickle file (.bin, .pt) given without ``--trust-pickle``."""

    code = "PICKLE_REFUSED"


class InvalidArgument(PatchctlError):
    """An option value out of its allowed range (density, weights, method...)."""

    code = "ARGUMENT_INVALID"


class DeviceUnavailable(PatchctlError):
    """A device (e.g. ``cuda``) that was asked for but is not present."""

    code = "DEVICE_UNAVAILABLE"


class RemoteError(PatchctlError):
    """A remote that cannot be reached or answered unexpectedly."""

    code = "REMOTE_ERROR"


class LimitExceeded(RemoteError):
    """A peer's manifest, blob count or declared blob size over a pull's caps (raise them with the flags)."""

    code = "LIMIT_EXCEEDED"


class TransferTimeout(RemoteError):
    """A pull that passed its deadline or received less than its minimum rate."""

    code = "TRANSFER_TIMEOUT"


class StorageError(RegistryError):
    """The registry's disk refused a write: no space (ENOSPC, EDQUOT), file too large (EFBIG), no permission."""

    code = "STORAGE_ERROR"


class EvaluationFailed(PatchctlError):
    """A custom evaluator that raised while scoring a model."""

    code = "EVALUATION_FAILED"


class PatchctlWarning(UserWarning):
    """Something done as asked that a user should know about (e.g. a change to tied embeddings).

    Raised with :func:`warnings.warn`; the CLI prints it as one ``warning: ...`` line on stderr.
    """
