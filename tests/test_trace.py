import base64

import numpy as np
import pytest
import torch

from r3rl.trace import ReplayBatch, RoutingTrace, TraceError, compact_dtype
from r3rl.train.data import layout_packed, layout_padded


def _random_trace(rows=7, layers=3, k=4, experts=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(rows)])
    return RoutingTrace.from_ids(ids, experts)


def test_compact_dtype_is_one_byte_below_255_experts():
    assert compact_dtype(128) == np.uint8 and compact_dtype(254) == np.uint8
    assert compact_dtype(255) == np.int16 and compact_dtype(1024) == np.int16
    t = _random_trace(experts=128)
    assert t.nbytes == t.num_rows * t.num_layers * t.top_k  # 1 byte per (row, layer, k)


@pytest.mark.parametrize("experts", [16, 300])
def test_codecs_round_trip(experts):
    t = _random_trace(experts=experts)
    ids = t.expert_ids.astype(np.int64)
    ids[2, 1, 3] = -1  # a pad slot survives every codec
    t = RoutingTrace.from_ids(ids, experts)
    assert t.pad_mask()[2, 1, 3]
    s = RoutingTrace.from_sglang(t.to_sglang(), num_layers=3, top_k=4, num_experts=experts, num_tokens=8)
    np.testing.assert_array_equal(s.expert_ids, t.expert_ids)
    prompt, gen = t.to_vllm(num_prompt_tokens=3)
    assert prompt.dtype == np.int16 and prompt.shape == (3, 3, 4) and gen.shape == (4, 3, 4)
    v = RoutingTrace.from_vllm(prompt, gen, num_experts=experts)
    np.testing.assert_array_equal(v.expert_ids, t.expert_ids)
    b = RoutingTrace.from_bytes(t.to_bytes())
    np.testing.assert_array_equal(b.expert_ids, t.expert_ids)
    assert b.expert_ids.dtype == t.expert_ids.dtype


def test_sglang_wire_format_is_little_endian_int32_with_minus_one_pads():
    ids = _random_trace(rows=2, layers=1, k=2).expert_ids.astype(np.int64)
    ids[1, 0, 1] = -1
    t = RoutingTrace.from_ids(ids, 16)
    raw = np.frombuffer(base64.b64decode(t.to_sglang()), dtype="<i4")
    np.testing.assert_array_equal(raw, ids.reshape(-1))


def test_255_is_an_expert_id_on_the_wire_not_a_pad():
    ids = _random_trace().expert_ids.astype(np.int64)
    ids[0, 0, 0] = 255
    wire = base64.b64encode(ids.astype("<i4").tobytes())
    with pytest.raises(TraceError, match="out of range \\[0, 16\\).*got=255 at row=0 layer=0 slot=0"):
        RoutingTrace.from_sglang(wire, num_layers=3, top_k=4, num_experts=16)


def test_sglang_dense_layer_columns_are_selected_away():
    t = _random_trace(layers=3)
    wide = np.zeros((t.num_rows, 5, 4), dtype="<i4")  # decoder layers 0..4; MoE at 0, 2, 4; dense columns are 0s
    wide[:, [0, 2, 4]] = t.expert_ids
    wire = base64.b64encode(wide.tobytes())
    with pytest.raises(TraceError, match="duplicate expert"):
        RoutingTrace.from_sglang(wire, num_layers=5, top_k=4, num_experts=16)
    got = RoutingTrace.from_sglang(wire, num_layers=5, top_k=4, num_experts=16, layers=[0, 2, 4])
    np.testing.assert_array_equal(got.expert_ids, t.expert_ids)
    with pytest.raises(TraceError, match="out of range \\[0, 5\\).*got=\\[7\\]"):
        RoutingTrace.from_sglang(wire, num_layers=5, top_k=4, num_experts=16, layers=[0, 7])
    with pytest.raises(TraceError, match="must be positive"):
        RoutingTrace.from_sglang(wire, num_layers=0, top_k=4, num_experts=16)
    with pytest.raises(TraceError, match="must be a base64 string.*got int"):
        RoutingTrace.from_sglang(5, num_layers=5, top_k=4, num_experts=16)


def test_rejects_wrong_row_count():
    t = _random_trace(rows=7)
    with pytest.raises(TraceError, match=r"got=7, expected=9 \(tokens=10"):
        t.validate(num_tokens=10, sample=3)
    msg = r"element count does not match sample tokens \(sample 5\): got=84, expected=36"
    with pytest.raises(TraceError, match=msg):
        RoutingTrace.from_sglang(t.to_sglang(), num_layers=3, top_k=4, num_experts=16, num_tokens=4, sample=5)


def test_rejects_wrong_layers_and_topk():
    t = _random_trace()
    with pytest.raises(TraceError, match="num_layers mismatch.*got=3, expected=4"):
        t.validate(num_layers=4)
    with pytest.raises(TraceError, match="top_k mismatch.*got=4, expected=8"):
        t.validate(top_k=8)
    with pytest.raises(TraceError, match="not a whole number of rows"):
        RoutingTrace.from_sglang(base64.b64encode(b"\x00" * 20), num_layers=3, top_k=4, num_experts=16)


def test_rejects_out_of_range_ids():
    ids = _random_trace().expert_ids.astype(np.int64)
    ids[4, 2, 1] = 16
    with pytest.raises(TraceError, match=r"out of range \[0, 16\) \(sample 2\): got=16 at row=4 layer=2 slot=1"):
        RoutingTrace.from_ids(ids, 16, sample=2)
    ids[4, 2, 1] = -7
    with pytest.raises(TraceError, match="got=-7"):
        RoutingTrace.from_ids(ids, 16)


def test_rejects_duplicates_in_a_row():
    ids = _random_trace().expert_ids.astype(np.int64)
    ids[1, 0, :2] = 5
    with pytest.raises(TraceError, match="duplicate expert.*expert=5 appears twice at row=1 layer=0"):
        RoutingTrace.from_ids(ids, 16)


def test_two_pads_in_a_row_are_not_duplicates():
    ids = _random_trace().expert_ids.astype(np.int64)
    ids[1, 0, :2] = -1
    RoutingTrace.from_ids(ids, 16)


def test_rejects_undecodable_base64():
    with pytest.raises(TraceError, match="not valid base64 \\(sample 1\\)"):
        RoutingTrace.from_sglang("@@not base64@@", num_layers=3, top_k=4, num_experts=16, sample=1)


def test_rejects_corrupt_compact_bytes():
    data = _random_trace().to_bytes()
    with pytest.raises(TraceError, match="size mismatch"):
        RoutingTrace.from_bytes(data[:-1])
    with pytest.raises(TraceError, match="not a compact trace"):
        RoutingTrace.from_bytes(b"XXXX" + data[4:])


def test_truncate_and_append():
    t = _random_trace(rows=7)
    head = t.truncate(4)
    assert head.num_rows == 3
    both = head.append(RoutingTrace(t.expert_ids[3:], 16))
    np.testing.assert_array_equal(both.expert_ids, t.expert_ids)
    with pytest.raises(TraceError, match="different models"):
        t.append(_random_trace(layers=2))
    with pytest.raises(TraceError, match="cannot truncate"):
        t.truncate(20)


def test_layout_padded_places_rows_and_pads():
    a, b = _random_trace(rows=3, seed=1), _random_trace(rows=5, seed=2)
    batch = layout_padded([a, b], seq_len=6)
    ids = batch.expert_ids.view(2, 6, 3, 4)
    assert batch.has_pad and batch.pad_value == 255
    np.testing.assert_array_equal(ids[0, :3].numpy(), a.expert_ids)
    assert (ids[0, 3:] == 255).all() and (ids[1, 5] == 255).all()
    left = layout_padded([a], seq_len=6, left_pad=[2]).expert_ids.view(6, 3, 4)
    assert (left[:2] == 255).all()
    np.testing.assert_array_equal(left[2:5].numpy(), a.expert_ids)
    with pytest.raises(TraceError, match="does not fit the padded forward \\(sample 0\\)"):
        layout_padded([b], seq_len=5)  # 6 tokens in 5 positions
    with pytest.raises(TraceError, match="sample 1.*got=5, expected=4"):
        layout_padded([a, b], seq_len=6, lengths=[4, 5])
    with pytest.raises(TraceError, match="one left_pad entry per trace: got 1, expected 2"):
        layout_padded([a, b], seq_len=6, left_pad=[0])


def test_layout_packed_and_narrow():
    a, b = _random_trace(rows=3, seed=1), _random_trace(rows=5, seed=2)
    batch = layout_packed([a, b], lengths=[4, 6])
    assert batch.num_tokens == 10
    np.testing.assert_array_equal(batch.expert_ids[4:9].numpy(), b.expert_ids)
    assert (batch.expert_ids[3] == 255).all()
    assert isinstance(batch.narrow(4, 6), ReplayBatch) and batch.narrow(4, 6).num_tokens == 6
    with pytest.raises(TraceError, match="sample 1.*got=5, expected=6"):
        layout_packed([a, b], lengths=[4, 7])


def test_replay_batch_from_tensor():
    batch = ReplayBatch.from_tensor(torch.zeros(4, 2, 3, dtype=torch.uint8), num_experts=8)
    assert batch.expert_ids.dtype == torch.int64 and not batch.has_pad


def test_replay_batch_is_validated_on_the_host_before_upload():
    ids = torch.zeros(3, 2, 2, dtype=torch.int64)
    ids[:, :, 1] = 1
    ids[1, 1, 0] = 255  # a pad the caller did not declare
    moved = ReplayBatch(expert_ids=ids, pad_value=255, has_pad=False, num_experts=8).to("cpu")
    assert moved.has_pad  # found on the host, so replay fills it instead of indexing expert 255
    ids[2, 0, 1] = 9
    with pytest.raises(TraceError, match=r"out of range \[0, 8\) and not the pad 255: got=9 at row=2 layer=0 slot=1"):
        ReplayBatch(expert_ids=ids, pad_value=255, has_pad=True, num_experts=8).to("cpu")


def test_uint8_batch_with_minus_one_pad_is_checked_as_the_device_sees_it():
    ids = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    with pytest.raises(TraceError, match="not the pad -1: got=255"):
        ReplayBatch(expert_ids=ids, pad_value=-1, has_pad=True, num_experts=16).to("cpu")


@pytest.mark.parametrize("make, message", [
    (lambda: RoutingTrace.from_vllm(np.full((2, 3, 4), 1.5), None, num_experts=16),
     "must hold integer expert ids.*float64"),
    (lambda: RoutingTrace.from_sglang(_random_trace(layers=3).to_sglang(), num_layers=3, top_k=4, num_experts=16,
                                      layers=[0, 0]), "must be distinct.*duplicates \\[0\\]"),
    (lambda: RoutingTrace.from_ids(np.zeros((2, 3, 0), dtype=np.int64), 16), "top_k >= 1.*got shape=\\(2, 3, 0\\)"),
    (lambda: RoutingTrace.from_ids(np.zeros((2, 0, 4), dtype=np.int64), 16), "at least one layer"),
    (lambda: RoutingTrace.from_ids([[[1, 2]], [[1, 2, 3]]], 16), "ragged list"),
    (lambda: RoutingTrace.from_ids(np.array([[["a", "b"]]]), 16), "strings or objects"),
    (lambda: RoutingTrace.from_bytes("R3TR..."), "must be bytes.*got str"),
])
def test_bad_trace_inputs_raise_trace_error_with_got_and_expected(make, message):
    with pytest.raises(TraceError, match=message):
        make()


def test_faults_corrupt_every_row_or_layer_the_same_way_for_traces_and_batches():
    """One fault definition: the per-sample trace (r3rl train) and the laid-out batch (r3rl check) agree."""
    import torch

    from r3rl.config import Fault
    from r3rl.faults import corrupt_ids, corrupt_trace

    ids = np.arange(5 * 3 * 2).reshape(5, 3, 2) % 16
    trace = RoutingTrace.from_ids(ids, 16)
    for fault in (Fault.SHIFT, Fault.PERMUTE_LAYERS):
        batched = corrupt_ids(torch.from_numpy(ids)[None].repeat(2, 1, 1, 1), fault)
        single = corrupt_trace(trace, fault).expert_ids
        assert (batched[1].numpy() == single).all() and not (single == ids).all()
    assert (corrupt_trace(trace, Fault.SHIFT).expert_ids[:-1] == ids[1:]).all()
    assert (corrupt_trace(trace, Fault.PERMUTE_LAYERS).expert_ids[:, 1] == ids[:, 0]).all()
    with pytest.raises(ValueError, match="at least 2 MoE layers"):
        corrupt_trace(RoutingTrace.from_ids(ids[:, :1], 16), Fault.PERMUTE_LAYERS)
