"""Key format, public id parsing, Argon2id parameters, verification and rotation."""

from __future__ import annotations

import re

import pytest

from neuraldrive_gw import keys

VALID = "nd-AbCd1234" + "x" * 24


def test_generated_keys_have_the_documented_format() -> None:
    generated = {keys.generate_key() for _ in range(200)}
    assert len(generated) == 200
    for token in generated:
        assert re.fullmatch(r"nd-[A-Za-z0-9]{32}", token)
        assert keys.key_id(token) == token[3:11]


@pytest.mark.parametrize("token, expected", [
    (VALID, "AbCd1234"),
    ("nd-" + "0" * 32, "00000000"),
    ("nd-" + "Z9" * 16, "Z9Z9Z9Z9"),
    ("", None),
    ("nd-", None),
    ("ND-AbCd1234" + "x" * 24, None),                 # prefix is case-sensitive
    ("nd_AbCd1234" + "x" * 24, None),
    ("sk-AbCd1234" + "x" * 24, None),
    ("AbCd1234" + "x" * 27, None),                    # right length, no prefix
    (VALID[:-1], None),                               # 31 characters
    (VALID + "x", None),                              # 33 characters
    ("nd-AbCd-234" + "x" * 24, None),
    ("nd-AbCd_234" + "x" * 24, None),
    ("nd-AbCd1234" + "x" * 23 + "=", None),
    ("nd-AbCd1234" + "x" * 23 + "/", None),
    ("nd-ÄbCd1234" + "x" * 24, None),                 # non-ASCII letter
    ("nd-AbCd１234" + "x" * 24, None),                # fullwidth digit (isalnum() is True)
    ("nd-AbCd1234" + "x" * 23 + "\u0661", None),      # Arabic-Indic digit
    ("nd-AbCd1234" + "x" * 23 + "\udc80", None),      # lone surrogate
    (" " + VALID[:-1], None),
    (VALID[:-1] + " ", None),
    (VALID[:-1] + "\n", None),
    (VALID[:-1] + "\t", None),
    (VALID[:-1] + "\x00", None),
    ("nd-AbCd1234" + "x" * 23 + "\u200b", None),      # zero-width space
])
def test_key_id_parsing(token: str, expected: str | None) -> None:
    assert keys.key_id(token) == expected


def test_key_id_of_huge_input_is_cheap_and_none() -> None:
    assert keys.key_id("nd-" + "a" * 10_000_000) is None


def test_hash_uses_the_explicit_argon2id_parameters() -> None:
    stored = keys.hash_key(VALID)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    salt, digest = stored.split("$")[4:]
    # Unpadded base64: 16-byte salt → 22 characters, 32-byte hash → 43 characters.
    assert (len(salt), len(digest)) == (22, 43)
    assert VALID not in stored
    assert keys.hash_key(VALID) != stored           # fresh salt every time


def test_verify_right_and_wrong() -> None:
    stored = keys.hash_key(VALID)
    assert keys.verify_key(stored, VALID) is True
    assert keys.verify_key(stored, VALID[:-1] + "y") is False
    assert keys.verify_key(stored, "") is False
    assert keys.verify_key(stored, "\udc80") is False


@pytest.mark.parametrize("stored", ["", "garbage", "$argon2id$v=19$m=19456,t=2,p=1$AAAA",
                                    "$2b$12$" + "a" * 53])
def test_verify_never_raises_on_a_damaged_hash(stored: str) -> None:
    assert keys.verify_key(stored, VALID) is False


def test_rotation_keeps_the_id_and_invalidates_the_old_key() -> None:
    old = keys.generate_key()
    public_id = keys.key_id(old)
    assert public_id is not None
    old_hash = keys.hash_key(old)
    new = keys.rotate_secret(public_id)
    assert keys.key_id(new) == public_id
    assert new != old and new[11:] != old[11:]
    new_hash = keys.hash_key(new)
    assert keys.verify_key(new_hash, new) is True
    assert keys.verify_key(new_hash, old) is False
    assert keys.verify_key(old_hash, new) is False


@pytest.mark.parametrize("bad", ["", "short", "AbCd12345", "AbCd-234", "ÄbCd1234", VALID])
def test_rotate_secret_rejects_bad_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        keys.rotate_secret(bad)
