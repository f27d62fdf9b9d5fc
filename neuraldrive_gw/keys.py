"""API keys: the `nd-` token format, its public key id, and Argon2id hashing."""

from __future__ import annotations

import secrets
import string

from argon2 import PasswordHasher, Type
from argon2.exceptions import Argon2Error

PREFIX = "nd-"
ID_LEN = 8                     # public key id: the first 8 characters after the prefix
BODY_LEN = 32                  # characters after the prefix (id + secret)
TOKEN_LEN = len(PREFIX) + BODY_LEN
ALPHABET = string.ascii_letters + string.digits
_ALPHABET_SET = frozenset(ALPHABET)

# OWASP's Argon2id minimum (m=19 MiB, t=2, p=1): about 25 ms per verify on the appliance,
# and a bounded 19 MiB per concurrent verify (NOTES-platform §6). Spelled out because
# argon2-cffi 21.1 (Debian 12) has no `profiles` and defaults to 100 MiB, p=8.
TIME_COST = 2
MEMORY_COST_KIB = 19456
PARALLELISM = 1
HASH_LEN = 32
SALT_LEN = 16

_hasher = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB,
                         parallelism=PARALLELISM, hash_len=HASH_LEN, salt_len=SALT_LEN,
                         type=Type.ID)


def key_id(token: str) -> str | None:
    """The public key id of a well-formed token, else None.

    Well-formed means exactly `nd-` followed by 32 ASCII letters or digits: nothing else
    (no whitespace, no Unicode look-alikes, no longer or shorter tokens). This runs on every
    request before any database or Argon2 work, so it is a length check and two string
    tests — linear, no regular expression, and it never raises for any str.
    """
    if not isinstance(token, str) or len(token) != TOKEN_LEN or not token.startswith(PREFIX):
        return None
    body = token[len(PREFIX):]
    if not (body.isascii() and body.isalnum()):    # ASCII letters and digits, nothing else
        return None
    return body[:ID_LEN]


def generate_key() -> str:
    """A fresh key: `nd-` + 32 characters from [A-Za-z0-9] drawn with `secrets` (~190 bits)."""
    return PREFIX + _random(BODY_LEN)


def rotate_secret(public_id: str) -> str:
    """A new key with the same public id and 24 fresh random characters.

    Rotation keeps the id so that listings, logs and the audit trail follow one key across
    rotations; only the secret part changes, and with it the stored hash, which is what
    invalidates the old token. 24 characters from a 62-symbol alphabet are ~143 bits, still
    far beyond guessing. Raises ValueError if `public_id` is not a valid key id.
    """
    if len(public_id) != ID_LEN or not all(ch in _ALPHABET_SET for ch in public_id):
        raise ValueError("not a key id")
    return PREFIX + public_id + _random(BODY_LEN - ID_LEN)


def hash_key(token: str) -> str:
    """Argon2id PHC string of the whole token (blocking, ~25 ms, 19 MiB: run off the loop)."""
    return _hasher.hash(token)


def verify_key(stored_hash: str, token: str) -> bool:
    """True only if `token` matches `stored_hash`.

    Never raises for a wrong token or a malformed/unsupported stored hash: both are False,
    so a damaged row fails closed as an ordinary 401. Blocking (~25 ms); run it in a thread.
    """
    try:
        return _hasher.verify(stored_hash, token)
    except (Argon2Error, ValueError):
        # Argon2Error covers a mismatch; ValueError covers InvalidHash (renamed
        # InvalidHashError in argon2-cffi 23, both ValueErrors) for a corrupt row, and a
        # token that cannot be encoded (lone surrogates).
        return False


def _random(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))
