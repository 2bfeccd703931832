from __future__ import annotations

import hashlib

import pytest

from key_service import keyformat


def test_generated_key_shape_and_stored_forms() -> None:
    key = keyformat.generate()
    assert key.plaintext.startswith("myl_")
    assert len(key.plaintext) == keyformat.KEY_LENGTH == 53
    assert key.plaintext[4:].isalnum()
    assert key.plaintext.isascii()
    assert keyformat.is_well_formed(key.plaintext)
    assert key.key_hash == hashlib.sha256(key.plaintext.encode()).digest()
    assert key.display_prefix == key.plaintext[:12]


def test_injected_randomness_repeats_and_extremes_pad() -> None:
    first = keyformat.generate(lambda n: bytes(range(n)))
    second = keyformat.generate(lambda n: bytes(range(n)))
    assert first == second
    zero = keyformat.generate(lambda n: bytes(n))
    assert zero.plaintext[4:47] == "0" * 43
    top = keyformat.generate(lambda n: b"\xff" * n)
    assert len(top.plaintext) == 53
    assert keyformat.is_well_formed(zero.plaintext)
    assert keyformat.is_well_formed(top.plaintext)


def test_checksum_catches_every_single_character_change() -> None:
    key = keyformat.generate().plaintext
    for position in range(4, len(key)):
        for replacement in "0aZ":
            if key[position] == replacement:
                continue
            changed = key[:position] + replacement + key[position + 1 :]
            assert not keyformat.is_well_formed(changed), (position, replacement)


@pytest.mark.parametrize(
    "candidate",
    ["", "myl_", "MYL_" + "0" * 49, "myk_" + "0" * 49, "myl_" + "0" * 48, "myl_" + "0" * 50,
     "myl_" + "-" * 49, "myl_" + "é" * 49, "myl_" + "0" * 43 + "000000"],
)  # fmt: skip
def test_malformed_candidates(candidate: str) -> None:
    assert not keyformat.is_well_formed(candidate)


def test_checksum_is_crc32_in_base62() -> None:
    body = "0" * 43
    import zlib

    assert keyformat.checksum(body) == keyformat.base62(zlib.crc32(body.encode()), 6)
    assert keyformat.is_well_formed("myl_" + body + keyformat.checksum(body))


def test_base62() -> None:
    assert keyformat.base62(0, 3) == "000"
    assert keyformat.base62(61, 1) == "z"
    assert keyformat.base62(62, 2) == "10"
    assert keyformat.base62(2**32 - 1, 6) == "4gfFC3"
    with pytest.raises(ValueError, match="more than"):
        keyformat.base62(62**6, 6)
    with pytest.raises(ValueError, match="non-negative"):
        keyformat.base62(-1, 6)
