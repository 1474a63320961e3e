"""One exception root for all of Raksha.

Every error carries a stable ``code`` (API and CLI clients match on it), a
``retryable`` flag (whether trying the same thing again can help) and the CLI
exit status its category maps to. Messages are for people; codes are the
contract.
"""

from __future__ import annotations

from typing import Any

# CLI exit statuses, documented in docs/cli.md.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DAMAGED = 3
EXIT_NOT_FOUND = 4
EXIT_BUSY = 5
EXIT_KEY = 6
EXIT_FORMAT = 7
EXIT_STORAGE = 8
EXIT_INTERRUPTED = 130


class RakshaError(Exception):
    """Root of every error Raksha raises on purpose."""

    code = "RAKSHA_ERROR"
    retryable = False
    exit_status = EXIT_ERROR

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.details:
            out["details"] = {k: v for k, v in self.details.items() if v is not None}
        return out


class PermanentError(RakshaError):
    """Retrying the same request cannot help; the input or the stored data must change."""


class RetryableError(RakshaError):
    """A transient condition (a lock, a network blip); the same request may succeed later."""

    retryable = True


class InvalidInput(PermanentError):
    code = "INVALID_INPUT"
    exit_status = EXIT_USAGE


class ImageInvalid(InvalidInput):
    code = "IMAGE_INVALID"


class NotFound(PermanentError):
    code = "NOT_FOUND"
    exit_status = EXIT_NOT_FOUND


class AlreadyExists(PermanentError):
    code = "ALREADY_EXISTS"


class Forbidden(PermanentError):
    """The caller may not do this (policy, or another project's resource)."""

    code = "FORBIDDEN"


class Unauthorized(PermanentError):
    """No valid credentials came with the request."""

    code = "UNAUTHORIZED"


class Conflict(PermanentError):
    """The resource is not in a state that allows the request (restore a failed run, delete a running one)."""

    code = "CONFLICT"


class ImageInUse(Conflict):
    """A disk image to be written over is open in QEMU (a running VM, an export): stop that first."""

    code = "IMAGE_IN_USE"
    exit_status = EXIT_BUSY


class InvalidStateTransition(Conflict):
    """A status change the resource's state machine (raksha.domain.states) does not allow."""

    code = "INVALID_STATE_TRANSITION"


class StatusChanged(Conflict):
    """Someone else changed the resource's status first (a lost compare-and-set); re-read and decide again."""

    code = "STATUS_CHANGED"
    retryable = True


class JobBusy(Conflict):
    """The backup job already has a run in progress; a job never runs twice at once."""

    code = "JOB_BUSY"
    retryable = True


class VaultFormatUnsupported(PermanentError):
    code = "VAULT_FORMAT_UNSUPPORTED"
    exit_status = EXIT_FORMAT


class VaultKeyError(PermanentError):
    code = "VAULT_KEY_WRONG"
    exit_status = EXIT_KEY


class VaultCorrupt(PermanentError):
    """Stored data does not decode or does not match its name or hash."""

    code = "VAULT_CORRUPT"
    exit_status = EXIT_DAMAGED


class ChunkMissing(VaultCorrupt):
    code = "VAULT_CHUNK_MISSING"


class VaultLocked(RetryableError):
    code = "VAULT_LOCKED"
    exit_status = EXIT_BUSY


class BackendError(RetryableError):
    """The storage backend failed in a way that may pass (I/O error, timeout)."""

    code = "BACKEND_IO"
    exit_status = EXIT_STORAGE


class StorageFull(PermanentError):
    """No space left where data is written. Retrying helps only once space is freed."""

    code = "STORAGE_FULL"
    exit_status = EXIT_STORAGE


class SourceError(RetryableError):
    """Reading the disk being backed up failed (it vanished, the export closed)."""

    code = "SOURCE_IO"


class Interrupted(RakshaError):
    code = "INTERRUPTED"
    exit_status = EXIT_INTERRUPTED


class HypervisorError(RetryableError):
    """libvirt or QEMU failed or refused an operation on a VM (translated at the hypervisor boundary)."""

    code = "HYPERVISOR_ERROR"


class VmGone(HypervisorError):
    """The VM stopped or vanished while it was being worked on (destroyed, crashed, undefined)."""

    code = "VM_GONE"
