"""Blobs written whole under their digests: good and bad digests, mismatches, no partial files."""

from __future__ import annotations

import hashlib

import pytest

from tests.store.helpers import blobs
from tp_ollama.errors import RequestError


def test_blobs_with_good_and_bad_digests(store):
    data = b"some bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert not store.has_blob(digest)
    assert store.add_blob(digest, data) is True
    assert store.has_blob(digest) and store.has_blob(digest.replace(":", "-"))
    assert store.add_blob(digest, iter([b"some ", b"bytes"])) is False  # already there
    wrong = "sha256:" + "0" * 64
    with pytest.raises(RequestError, match=f'digest mismatch, expected "{wrong}", got "{digest}"'):
        store.add_blob(wrong, data)
    assert not store.has_blob(wrong)
    assert blobs(store) == {digest.replace(":", "-")}  # no partial file left behind
    for bad in ("sha256:abc", "md5:" + "0" * 64, "sha256:" + "G" * 64):
        with pytest.raises(RequestError, match="invalid digest format"):
            store.has_blob(bad)
