"""The block pool and prefix cache alone (pure Python: no torch, no model)."""

from __future__ import annotations

import pytest

from smolvlm.engine.block_manager import BlockManager, BlockPoolError
from smolvlm.engine.params import SamplingParams
from smolvlm.engine.sequence import ImageSpan, Sequence

BS = 4


def make_seq(seq_id, tokens, images=None):
    return Sequence(seq_id, tokens, SamplingParams(), BS, images=images)


def computed(manager, seq):
    """Pretend the model computed every token of `seq` (what the scheduler does after a step)."""
    seq.num_computed_tokens = seq.num_tokens
    manager.commit(seq)


def test_allocate_and_free_return_every_block():
    m = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(0, list(range(10))), make_seq(1, list(range(100, 105)))
    assert m.allocate(a) and m.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2  # ceil(10/4), ceil(5/4)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert m.num_free_blocks == 3
    assert [m.blocks[i].ref_count for i in a.block_table] == [1, 1, 1]
    m.free_sequence(a)
    m.free_sequence(b)
    assert m.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in m.blocks)
    assert a.block_table == [] and a.num_computed_tokens == 0


def test_allocate_fails_cleanly_when_short():
    m = BlockManager(num_blocks=3, block_size=BS)
    big = make_seq(0, list(range(13)))  # 4 blocks
    assert not m.allocate(big)
    assert big.block_table == [] and m.num_free_blocks == 3


def test_double_free_is_detected():
    m = BlockManager(num_blocks=4, block_size=BS)
    s = make_seq(0, [1, 2, 3])
    m.allocate(s)
    table = list(s.block_table)
    m.free_sequence(s)
    s.block_table = table
    with pytest.raises(BlockPoolError, match="freed twice"):
        m.free_sequence(s)


def test_ensure_slots_grows_by_whole_blocks():
    m = BlockManager(num_blocks=3, block_size=BS)
    s = make_seq(0, [1, 2, 3, 4])
    m.allocate(s)
    assert len(s.block_table) == 1
    assert m.ensure_slots(s, 5) and len(s.block_table) == 2
    assert m.ensure_slots(s, 8) and len(s.block_table) == 2
    assert m.ensure_slots(s, 12) and len(s.block_table) == 3
    assert not m.ensure_slots(s, 13) and len(s.block_table) == 3


def test_prefix_hit_shares_blocks_and_counts_references():
    m = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2 tokens
    a = make_seq(0, prompt)
    m.allocate(a)
    assert a.num_computed_tokens == 0  # nothing cached yet
    computed(m, a)
    b = make_seq(1, prompt[:8] + [99, 98, 97])
    assert m.allocate(b)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [m.blocks[i].ref_count for i in b.block_table[:2]] == [2, 2]
    m.free_sequence(a)
    assert [m.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    m.free_sequence(b)
    assert m.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_reused():
    m = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(1, 10))  # 9 tokens, 3 blocks
    a = make_seq(0, prompt)
    m.allocate(a)
    computed(m, a)
    m.free_sequence(a)
    again = make_seq(1, prompt)
    assert m.allocate(again) and again.num_cached_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_token():
    m = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(1, 9))  # exactly 2 full blocks
    a = make_seq(0, prompt)
    m.allocate(a)
    computed(m, a)
    b = make_seq(1, prompt)
    m.allocate(b)
    # Block 0 is a hit; block 1 holds the last token, which must be computed: it is the sequence's own.
    assert b.num_computed_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert m.blocks[b.block_table[1]].ref_count == 1


def test_different_images_with_identical_tokens_never_share():
    m = BlockManager(num_blocks=16, block_size=BS)
    image_token = 7
    tokens = [1, 2] + [image_token] * 8 + [3, 4, 5]  # the image covers positions 2..9
    a = make_seq(0, tokens, [ImageSpan(tuple(range(2, 10)), "cat")])
    m.allocate(a)
    computed(m, a)
    other = make_seq(1, tokens, [ImageSpan(tuple(range(2, 10)), "dog")])
    m.allocate(other)
    assert other.num_cached_tokens == 0  # block 0 already covers the image: no hit at all
    same = make_seq(2, tokens, [ImageSpan(tuple(range(2, 10)), "cat")])
    m.allocate(same)
    assert same.num_cached_tokens == 12 and same.block_table[:3] == a.block_table[:3]


def test_recycled_block_forgets_its_hash():
    m = BlockManager(num_blocks=2, block_size=BS)
    a = make_seq(0, [1, 2, 3, 4, 5])  # 2 blocks; block 0 gets registered
    m.allocate(a)
    computed(m, a)
    m.free_sequence(a)
    assert len(m.hash_to_block) == 1
    # A different sequence takes every block: the cached one is overwritten, its key must go.
    b = make_seq(1, [9, 9, 9, 9, 9, 9, 9])
    m.allocate(b)
    assert m.hash_to_block == {}
    assert b.num_cached_tokens == 0
    computed(m, b)
    m.free_sequence(b)
    c = make_seq(2, [1, 2, 3, 4, 5])
    m.allocate(c)
    assert c.num_cached_tokens == 0, "a stale hash handed out a block that now holds other tokens"


def test_uncached_blocks_are_evicted_before_cached_ones():
    m = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(0, [1, 2, 3, 4, 5])  # block 0 cached, block 1 (1 token) not
    m.allocate(a)
    computed(m, a)
    m.free_sequence(a)
    b = make_seq(1, [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8])  # needs 3 of 4 blocks
    m.allocate(b)
    assert len(m.hash_to_block) == 1, "the cached block should have been kept, the uncached one reused"
    m.free_sequence(b)
    c = make_seq(2, [1, 2, 3, 4, 6])
    m.allocate(c)
    assert c.num_cached_tokens == 4


def test_prefix_caching_off_never_hits():
    m = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(0, list(range(9)))
    m.allocate(a)
    computed(m, a)
    b = make_seq(1, list(range(9)))
    m.allocate(b)
    assert b.num_cached_tokens == 0 and m.hash_to_block == {}


def test_block_hash_is_chained():
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8])
    b = make_seq(1, [9, 2, 3, 4, 5, 6, 7, 8])  # same second block, different first
    assert a.block_hash(1) != b.block_hash(1)
    assert a.block_hash(0) == make_seq(2, [1, 2, 3, 4, 0]).block_hash(0)
    with pytest.raises(ValueError, match="not full"):
        make_seq(3, [1, 2]).block_hash(0)


PURE_MODULES = ["params", "sequence", "block_manager", "scheduler"]


def test_bookkeeping_modules_import_no_torch():
    """The block manager and scheduler (and what they use) import only the standard library and each
    other, so they can be read and tested without torch. (Importing them through the package still
    loads torch via smolvlm/__init__.py; this checks their own import statements.)"""
    import ast
    import sys
    from pathlib import Path

    engine_dir = Path(__file__).resolve().parents[1] / "smolvlm" / "engine"
    allowed_local = {f"smolvlm.engine.{m}" for m in PURE_MODULES}
    for name in PURE_MODULES:
        tree = ast.parse((engine_dir / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                ok = module in allowed_local or top in sys.stdlib_module_names or module == "__future__"
                assert ok, f"smolvlm/engine/{name}.py imports {module!r}: bookkeeping must stay pure Python"
