"""Content addresses of full KV blocks, the keys of the prefix cache.

The KV of a token depends on every token before it, so a full block is named by a chained hash:

    hash(block i) = H(hash(block i - 1), token ids of block i)      hash(block -1) = ROOT_BLOCK_HASH

Two blocks with the same hash hold the same KV (for one model), whichever request computed them,
so equal hashes along a prompt's prefix mean that prefix's KV can be shared.

Why a cryptographic hash (BLAKE2b, 256 bits) and not Python's hash(): a collision would hand a
request another prompt's KV and silently corrupt its output, with no error anywhere.  hash() is
64 bits and not collision resistant (hash(-1) == hash(-2); tuples of ints collide by construction),
so a user could craft a colliding prompt.  BLAKE2b costs about a microsecond per block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes

ROOT_BLOCK_HASH: BlockHash = bytes(32)


def hash_block_tokens(parent_hash: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    # Token ids as fixed-width int64: the encoding is injective, and with the fixed-length parent
    # first, (parent, tokens) -> bytes is too.
    data = parent_hash + array("q", token_ids).tobytes()
    return hashlib.blake2b(data, digest_size=32).digest()


def salted_root(cache_salt: bytes) -> BlockHash:
    """The parent hash of a request's first block: the root itself without a salt (so unsalted
    keys are unchanged), else the root hashed with the salt (what else its KV depends on)."""
    if not cache_salt:
        return ROOT_BLOCK_HASH
    return hashlib.blake2b(ROOT_BLOCK_HASH + b"salt:" + cache_salt, digest_size=32).digest()
