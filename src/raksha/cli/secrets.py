"""Where the CLI finds a vault's passphrase or key file, never on the command line itself."""

from __future__ import annotations

import getpass
import os
import sys

from raksha.domain.errors import InvalidInput, VaultKeyError
from raksha.vault.format.kdf import Secret


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror}", code="SECRET_UNREADABLE") from None


def resolve_secret(password_file: str | None, key_file: str | None, *, required: bool,
                   confirm: bool = False, prompt: str = "Vault passphrase: ", environ: bool = True) -> Secret | None:
    """``--key-file``, ``--password-file``, $RAKSHA_PASSWORD_FILE, $RAKSHA_PASSWORD, or a prompt on a tty.

    ``environ=False`` skips the environment: it holds the current secret, never a new one.
    """
    if key_file:
        return Secret(keyfile=_read(key_file, "key file"))
    if password_file:
        return Secret(passphrase=_read(password_file, "password file").rstrip(b"\r\n"))
    if environ and os.environ.get("RAKSHA_PASSWORD_FILE"):
        return Secret(passphrase=_read(os.environ["RAKSHA_PASSWORD_FILE"], "password file").rstrip(b"\r\n"))
    if environ and os.environ.get("RAKSHA_PASSWORD"):
        return Secret(passphrase=os.environ["RAKSHA_PASSWORD"].encode())
    if not required:
        return None
    if not sys.stdin.isatty():
        raise VaultKeyError("the vault is encrypted and no passphrase was given "
                            "(use --password-file, --key-file or RAKSHA_PASSWORD)", code="VAULT_KEY_REQUIRED")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise InvalidInput("the passphrases do not match", code="PASSPHRASE_MISMATCH")
    return Secret(passphrase=first.encode())
