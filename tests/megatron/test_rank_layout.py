"""Layout of per-sample traces for one Megatron rank, against references built by hand (no megatron-core needed).

Each id encodes where it came from: trace of sample b, row i, layer l, slot k holds a distinct value, so a layout
that puts any row in the wrong place is caught by an exact comparison. Negative controls: contiguous CP split
against mcore's zigzag, sample-major order against the router's sequence-major one, a wrong stage offset.
"""

import numpy as np
import pytest
import torch

from r3rl.megatron.layout import (
    RankLayout,
    moe_layer_numbers,
    pack_thd,
    rank_router_batch,
    stage_trace_layers,
    zigzag_cp_slice,
)
from r3rl.trace import RoutingTrace

E, L, K = 250, 2, 2  # 250 experts: uint8 ids, pad 255


def _trace(b: int, n_tokens: int) -> RoutingTrace:
    """Row i, layer l, slot k of sample b holds (b * 50 + i * 2 + l) plus k * 120 (distinct ids per row)."""
    i = np.arange(n_tokens - 1)[:, None, None]
    ids = b * 50 + i * 2 + np.arange(L)[None, :, None] + 120 * np.arange(K)[None, None, :]
    return RoutingTrace.from_ids(ids.astype(np.uint8), E)


def _row(trace: RoutingTrace | None, i: int) -> np.ndarray:
    """Reference row: the trace's row i, or a pad row."""
    if trace is None or i >= trace.num_rows:
        return np.full((L, K), 255, dtype=np.uint8)
    return trace.expert_ids[i]


def _ids(layout: RankLayout, traces) -> np.ndarray:
    return rank_router_batch(traces, layout).expert_ids.numpy()


def test_bshd_router_order_is_sequence_major():
    traces = [_trace(0, 4), _trace(1, 3)]
    got = _ids(RankLayout(seq_len=4), traces)
    # mcore's router flattens [s, b]: token t is (position t // B, sample t % B)
    want = np.stack([_row(traces[t % 2], t // 2) for t in range(8)])
    np.testing.assert_array_equal(got, want)
    sample_major = np.stack([_row(traces[t // 4], t % 4) for t in range(8)])
    assert not np.array_equal(got, sample_major)  # negative control: [b, s] order is a different layout


@pytest.mark.parametrize("cp_rank,positions", [(0, [0, 1, 6, 7]), (1, [2, 3, 4, 5])])
def test_cp_zigzag_by_hand(cp_rank, positions):
    traces = [_trace(0, 8), _trace(1, 5)]
    got = _ids(RankLayout(seq_len=8, cp_size=2, cp_rank=cp_rank), traces)
    want = np.stack([_row(traces[b], p) for p in positions for b in range(2)])
    np.testing.assert_array_equal(got, want)
    contiguous = [0, 1, 2, 3] if cp_rank == 0 else [4, 5, 6, 7]
    wrong = np.stack([_row(traces[b], p) for p in contiguous for b in range(2)])
    assert not np.array_equal(got, wrong)  # negative control: a contiguous CP split


def test_cp_and_sequence_parallel_by_hand():
    """cp=2, tp=2 with SP, 16 positions in chunks of 4: cp rank 1 keeps chunks 1 and 2 (positions 4..11), SP rank 1
    the second half of those (8..11); cp rank 0 keeps chunks 0 and 3 (0..3, 12..15), SP rank 1 then 12..15."""
    traces = [_trace(0, 16)]
    got = _ids(RankLayout(seq_len=16, cp_size=2, cp_rank=1, tp_size=2, tp_rank=1, sequence_parallel=True), traces)
    np.testing.assert_array_equal(got, np.stack([_row(traces[0], p) for p in [8, 9, 10, 11]]))
    got0 = _ids(RankLayout(seq_len=16, cp_size=2, cp_rank=0, tp_size=2, tp_rank=1, sequence_parallel=True), traces)
    np.testing.assert_array_equal(got0, np.stack([_row(traces[0], p) for p in [12, 13, 14, 15]]))
    # without sequence parallel every TP rank sees the whole CP-local sequence
    full = _ids(RankLayout(seq_len=16, cp_size=2, cp_rank=1, tp_size=2, tp_rank=1), traces)
    np.testing.assert_array_equal(full, np.stack([_row(traces[0], p) for p in range(4, 12)]))


def test_thd_packing_and_cp_by_hand():
    traces = [_trace(0, 5), _trace(1, 3)]  # 5 and 3 tokens, padded to multiples of 2*cp = 4: 8 and 4
    ids, cu = pack_thd(traces, pad_multiple=4)
    assert cu == [0, 8, 12]
    want_packed = np.stack([_row(traces[0], i) for i in range(8)] + [_row(traces[1], i) for i in range(4)])
    np.testing.assert_array_equal(ids.numpy(), want_packed)
    # cp=2: each packed sample is zigzagged on its own. Sample 0 (8): chunks of 2, rank 0 keeps 0,1,6,7;
    # sample 1 (4): chunks of 1, rank 0 keeps 0 and 3.
    got = _ids(RankLayout(packed=True, cp_size=2, cp_rank=0), traces)
    want = np.stack([_row(traces[0], i) for i in [0, 1, 6, 7]] + [_row(traces[1], i) for i in [0, 3]])
    np.testing.assert_array_equal(got, want)
    whole = zigzag_cp_slice(ids, 2, 0)  # negative control: zigzag over the whole pack, not per sample
    assert not np.array_equal(got, whole.numpy())


def test_thd_packing_with_sequence_parallel():
    traces = [_trace(0, 3), _trace(1, 2)]  # padded to multiples of tp=2: 4 and 2 -> 6 tokens, 3 per rank
    got = _ids(RankLayout(packed=True, tp_size=2, tp_rank=1, sequence_parallel=True), traces)
    want = np.stack([_row(traces[0], 3)] + [_row(traces[1], i) for i in range(2)])
    np.testing.assert_array_equal(got, want)


def test_layout_reports_pads_and_validates_divisibility():
    batch = rank_router_batch([_trace(0, 4)], RankLayout(seq_len=4))
    assert batch.has_pad and not batch.partial_pad  # the last token has no row: one all-pad row
    with pytest.raises(ValueError, match="divisible by 2\\*cp=4: got 6"):
        rank_router_batch([_trace(0, 4)], RankLayout(seq_len=6, cp_size=2))
    with pytest.raises(ValueError, match="cp_rank must be in \\[0, cp_size\\): got cp_size=2, cp_rank=2"):
        RankLayout(cp_size=2, cp_rank=2)


def test_stage_trace_layers_and_dense_layers():
    numbers = moe_layer_numbers(8, [0, 1, 1, 0, 1, 1, 1, 0])  # dense layers 1, 4, 8 have no router
    assert numbers == [2, 3, 5, 6, 7]
    assert moe_layer_numbers(4, 2) == [1, 3]  # mcore's int freq: every 2nd layer from the first
    # pp=2, 4 decoder layers per stage: stage 1 holds layers 5..8, whose MoE layers read trace layers 2, 3, 4
    assert stage_trace_layers(numbers, layer_offset=4, num_stage_layers=4) == {5: 2, 6: 3, 7: 4}
    assert stage_trace_layers(numbers, layer_offset=0, num_stage_layers=4) == {2: 0, 3: 1}
    # negative control: a wrong stage offset maps the stage to other trace layers
    assert stage_trace_layers(numbers, layer_offset=2, num_stage_layers=4) != {5: 2, 6: 3, 7: 4}


def test_compact_dtype_travels():
    batch = rank_router_batch([_trace(0, 4)], RankLayout(seq_len=4))
    assert batch.expert_ids.dtype == torch.uint8  # 1 byte per id on the host; widened on the device
