from engine.kv.block_hash import ROOT_BLOCK_HASH, hash_block_tokens


def test_hash_is_deterministic_and_fixed_size():
    h = hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 3, 4])
    assert h == hash_block_tokens(ROOT_BLOCK_HASH, (1, 2, 3, 4))
    assert isinstance(h, bytes) and len(h) == len(ROOT_BLOCK_HASH) == 32


def test_hash_depends_on_tokens_their_order_and_the_parent():
    root = ROOT_BLOCK_HASH
    h = hash_block_tokens(root, [1, 2, 3, 4])
    assert h != hash_block_tokens(root, [1, 2, 3, 5])
    assert h != hash_block_tokens(root, [4, 3, 2, 1])
    other_parent = hash_block_tokens(root, [9, 9, 9, 9])
    assert hash_block_tokens(other_parent, [1, 2, 3, 4]) != h


def test_values_python_hash_confuses_are_told_apart():
    # hash(-1) == hash(-2) in CPython; a content hash must not care.
    assert hash(-1) == hash(-2)
    assert hash_block_tokens(ROOT_BLOCK_HASH, [-1]) != hash_block_tokens(ROOT_BLOCK_HASH, [-2])
    # Fixed-width encoding: [1, 2] and [258] must not share bytes the way a varint might.
    assert hash_block_tokens(ROOT_BLOCK_HASH, [1, 2]) != hash_block_tokens(ROOT_BLOCK_HASH, [258])
