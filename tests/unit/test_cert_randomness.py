from __future__ import annotations

import pytest

from cert_service import randomness


def test_uuids_are_version_4_and_distinct() -> None:
    values = [randomness.uuid4() for _ in range(1000)]  # crosses several 4 KiB blocks
    assert len(set(values)) == 1000
    assert all(v.version == 4 and v.variant == "specified in RFC 4122" for v in values)


def test_serials_are_positive_159_bit_numbers() -> None:
    serials = [randomness.serial_number() for _ in range(500)]
    assert len(set(serials)) == 500
    assert all(0 < s < 2**159 for s in serials)


def test_bytes_are_never_handed_out_twice() -> None:
    chunks = [randomness.random_bytes(1000) for _ in range(20)]
    assert len(set(chunks)) == 20
    with pytest.raises(ValueError, match="between 1 and 4096"):
        randomness.random_bytes(0)
    with pytest.raises(ValueError, match="between 1 and 4096"):
        randomness.random_bytes(5000)
