"""fedmtl.privacy.shamir: t-of-n reconstruction, and failure on too few / bad shares."""

from __future__ import annotations

import itertools
import os

import pytest

from fedmtl.privacy.shamir import ShamirError, Share, combine_shares, split_secret


@pytest.mark.parametrize("secret_len", [0, 1, 15, 16, 32, 100])
def test_any_t_shares_reconstruct(secret_len):
    # Prepare
    secret = os.urandom(secret_len)
    shares = split_secret(secret, threshold=3, num_shares=5)
    # Execute
    results = {combine_shares(list(c)) for c in itertools.combinations(shares, 3)}
    # Assert
    assert results == {secret}
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]


def test_shares_round_trip_through_bytes_in_any_order():
    # Prepare
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=4, num_shares=6)
    # Execute
    restored = [Share.from_bytes(s.to_bytes()) for s in reversed(shares)]
    # Assert
    assert restored[::-1] == shares
    assert combine_shares(restored[:4]) == secret


def test_fewer_than_t_shares_refused():
    shares = split_secret(b"k" * 32, threshold=3, num_shares=5)
    with pytest.raises(ShamirError, match="3 needed"):
        combine_shares(shares[:2])


def test_duplicate_and_mixed_shares_refused():
    s1 = split_secret(b"a" * 32, threshold=2, num_shares=3)
    s2 = split_secret(b"b" * 20, threshold=2, num_shares=3)
    with pytest.raises(ShamirError, match="duplicate"):
        combine_shares([s1[0], s1[0]])
    with pytest.raises(ShamirError, match="disagree"):
        combine_shares([s1[0], s2[1]])
    with pytest.raises(ShamirError):
        combine_shares([])


def test_malformed_share_bytes_refused():
    raw = split_secret(b"x" * 32, threshold=2, num_shares=2)[0].to_bytes()
    with pytest.raises(ShamirError):
        Share.from_bytes(raw[:-1])
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00\x00" + raw[2:])  # x = 0 would be the secret itself
    with pytest.raises(TypeError):
        Share.from_bytes("text")


@pytest.mark.parametrize(
    "threshold,num_shares", [(0, 3), (4, 3), (2, 70000)]
)
def test_split_rejects_bad_parameters(threshold, num_shares):
    with pytest.raises(ValueError):
        split_secret(b"x", threshold=threshold, num_shares=num_shares)


def test_split_rejects_non_bytes():
    with pytest.raises(TypeError):
        split_secret("secret", threshold=2, num_shares=3)
