"""The engine's gated delta-net layer (`r3rl.rollout.model.attention_linear`) against HF's `Qwen3NextGatedDeltaNet`
(fp32, CPU): prefill of right-padded prompts of mixed lengths into arbitrary slots, then k one-token decode steps,
equals the HF layer's output over each full sequence.

Negative controls: forgetting the conv state between steps, or the recurrent state, breaks the match; a prefill that
ignores the prompt lengths (lets the padding write into the state) breaks it too. Slot copies (a prompt's samples) and
snapshot/restore (undoing a CUDA-graph warm-up) are exact.
"""

import pytest
import torch

from r3rl.models.presets import make_config, preset_available
from r3rl.rollout.model.attention import rowwise_linear
from r3rl.rollout.model.attention_linear import (
    LINEAR_ATTENTION_PARAMS,
    LinearAttentionSpec,
    LinearStateCache,
    linear_attention_decode,
    linear_attention_prefill,
    load_linear_attention,
)

PRESET = "tiny-qwen3-next"
pytestmark = pytest.mark.skipif(not preset_available(PRESET), reason="the installed transformers has no Qwen3-Next")
ATOL = 1e-5


def _hf_layer(seed=0):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = make_config(PRESET)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = Qwen3NextGatedDeltaNet(cfg, layer_idx=0).eval()
    with torch.no_grad():  # outputs of order 1, so that the tolerance means something
        for name, p in layer.named_parameters():
            if name.endswith("weight") and name != "norm.weight":
                fan_in = p.shape[-1] if p.dim() == 2 else p.shape[-1] * p.shape[-2]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        layer.norm.weight.copy_(1 + 0.1 * torch.randn(layer.norm.weight.shape, generator=g))
        layer.dt_bias.copy_(torch.randn(layer.dt_bias.shape, generator=g) * 0.5)
    return cfg, layer


def _engine_layer(cfg, layer):
    sd = layer.state_dict()
    assert set(LINEAR_ATTENTION_PARAMS) <= set(sd)

    def take(name, optional=False, dtype=None):
        if name not in sd:
            assert optional, name
            return None
        return sd[name].detach().clone().to(dtype or sd[name].dtype)

    spec = LinearAttentionSpec.from_config(cfg)
    return spec, load_linear_attention(take, "", spec)


def _run(lengths, steps, *, rows=None, chunk_size=64, seed=0, forget=None, honor_lengths=True, slots=4,
         dtype=torch.float32, batch_invariant=False):
    """(engine outputs, HF outputs) per request: its prompt's real positions, then each decode step."""
    cfg, layer = _hf_layer(seed)
    layer.to(dtype)
    spec, w = _engine_layer(cfg, layer)
    N, P, H = len(lengths), max(lengths), cfg.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randn(n, H, generator=g).to(dtype) for n in lengths]
    decode = torch.randn(steps, slots, H, generator=g).to(dtype)
    rows = list(range(N)) if rows is None else rows
    lengths_N = torch.tensor(lengths)
    h_NPH = torch.zeros(N, P, H, dtype=dtype)
    for n, x in enumerate(prompts):
        h_NPH[n, : len(x)] = x
        h_NPH[n, len(x):] = torch.randn(P - len(x), H, generator=g)  # padding must not matter, whatever it holds
    state = LinearStateCache.allocate(decoder_layers=[0], max_slots=slots, spec=spec, dtype=dtype,
                                      device=torch.device("cpu"))
    with torch.no_grad():
        o_NPH = linear_attention_prefill(w, h_NPH.view(N * P, H), lengths_N if honor_lengths else
                                         torch.full((N,), P), torch.tensor(rows), state, 0,
                                         chunk_size=chunk_size).view(N, P, H)
        steps_out = []
        for t in range(steps):
            if forget is not None:
                getattr(state, forget)(0).zero_()
            steps_out.append(linear_attention_decode(w, decode[t], state, 0, batch_invariant=batch_invariant))
        mine, ref = [], []
        for n, x in enumerate(prompts):
            full = torch.cat([x, decode[:, rows[n]]])
            ref.append(layer(full.unsqueeze(0))[0])
            mine.append(torch.cat([o_NPH[n, : len(x)], torch.stack([o[rows[n]] for o in steps_out])]))
    return mine, ref, lengths


@pytest.mark.parametrize(("chunk_size", "atol", "batch_invariant"), [(64, ATOL, False), (16, 2 * ATOL, False),
                                                                    (64, ATOL, True)])
def test_prefill_then_decode_equals_hf_over_the_full_sequence(chunk_size, atol, batch_invariant):
    """Mixed lengths (one past a 64-token chunk), right-padded, into slots in another order than the batch. HF's
    layer chunks by 64 (max error 6e-7 here); chunks of 16 sum in another order over the 70-token prompt (9e-6)."""
    mine, ref, lengths = _run([5, 70, 2], steps=4, rows=[2, 0, 1], chunk_size=chunk_size,
                              batch_invariant=batch_invariant)
    for n, (a, b) in enumerate(zip(mine, ref, strict=True)):
        assert b.abs().mean() > 0.05  # a signal, not zeros
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, n=n: f"request {n}: {m}")


def test_bf16_prefill_then_decode_follows_hf():
    """bfloat16 weights, inputs and conv state (the recurrent state stays float32, as in HF): the float32 core's
    differences round away (bitwise equal to HF on this CPU; the bound allows one bf16 rounding step)."""
    mine, ref, _ = _run([5, 70, 2], steps=4, rows=[2, 0, 1], dtype=torch.bfloat16)
    for a, b in zip(mine, ref, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("forget", ["conv", "recurrent"])
def test_forgetting_a_state_between_steps_breaks_the_match(forget):
    """Negative control: each decode step depends on the state carried from the prompt and the previous steps."""
    mine, ref, lengths = _run([5, 9, 3], steps=3, forget=forget)
    for a, b, n in zip(mine, ref, lengths, strict=True):
        torch.testing.assert_close(a[:n], b[:n], atol=ATOL, rtol=0)  # the prefill is unaffected
        assert (a[n:] - b[n:]).abs().max() > 1e-2


def test_prefill_that_lets_padding_into_the_state_breaks_the_match():
    """Negative control: the state must be the one at each prompt's last real token, not at the padded end."""
    mine, ref, lengths = _run([5, 9, 3], steps=2, honor_lengths=False)
    longest = max(lengths)
    for a, b, n in zip(mine, ref, lengths, strict=True):
        err = (a[n:] - b[n:]).abs().max()
        assert err < ATOL if n == longest else err > 1e-2


def test_batch_invariant_decode_does_not_depend_on_the_other_rows():
    """The CPU engine's mode (with its row-wise projections): a row's output and new state are bitwise the same
    decoded alone or among others."""
    cfg, layer = _hf_layer(0)
    spec, w = _engine_layer(cfg, layer)
    g = torch.Generator().manual_seed(5)
    x_BH = torch.randn(5, cfg.hidden_size, generator=g)
    init = LinearStateCache.allocate(decoder_layers=[0], max_slots=5, spec=spec, dtype=torch.float32,
                                     device=torch.device("cpu"))
    init.conv_LSCW.normal_(generator=g)
    init.recurrent_LSVKD.normal_(generator=g)
    snap = init.snapshot(5)
    with torch.no_grad():
        together = linear_attention_decode(w, x_BH, init, 0, batch_invariant=True, linear=rowwise_linear)
        state_together = init.recurrent_LSVKD.clone()
        init.restore(snap)
        alone = linear_attention_decode(w, x_BH[:1], init, 0, batch_invariant=True, linear=rowwise_linear)
    assert torch.equal(alone[0], together[0])
    assert torch.equal(init.recurrent_LSVKD[:, 0], state_together[:, 0])


def test_copied_rows_decode_alike_and_restore_undoes_a_step():
    cfg, layer = _hf_layer(0)
    spec, w = _engine_layer(cfg, layer)
    H = cfg.hidden_size
    g = torch.Generator().manual_seed(3)
    state = LinearStateCache.allocate(decoder_layers=[3, 0], max_slots=3, spec=spec, dtype=torch.float32,
                                      device=torch.device("cpu"))
    conv_ptr, rec_ptr = state.conv_LSCW.data_ptr(), state.recurrent_LSVKD.data_ptr()
    with torch.no_grad():
        linear_attention_prefill(w, torch.randn(6, H, generator=g), torch.tensor([6]), torch.tensor([0]), state, 0)
        state.copy_rows(torch.tensor([0, 0]), torch.tensor([1, 2]))  # a prompt's three samples
        x_BH = torch.randn(1, H, generator=g).expand(3, H)
        snap = state.snapshot(3)
        first = linear_attention_decode(w, x_BH, state, 0)
        state.restore(snap)  # the warm-up is undone: the same step again gives the same output
        again = linear_attention_decode(w, x_BH, state, 0)
        after = linear_attention_decode(w, x_BH, state, 0)
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])
    assert torch.equal(again, first) and not torch.equal(after, first)  # the state advanced: a step is not idempotent
    assert state.conv_LSCW.data_ptr() == conv_ptr and state.recurrent_LSVKD.data_ptr() == rec_ptr
    assert state.recurrent(3).abs().sum() == 0  # the other layer's state is untouched
    with pytest.raises(KeyError, match="decoder layer 1 is not a linear-attention layer"):
        state.conv(1)


# --- GPU (pytest -m gpu on a CUDA machine) ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_under_a_cuda_graph_matches_hf():
    """Decode captured once in a CUDA graph (a host sync or a reallocation would break the capture or the replays),
    warm-up undone by snapshot/restore, replayed step after step; slot 3 is a never-prefilled padding row."""
    dev = torch.device("cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 conv, as on the CPU
    try:
        cfg, layer = _hf_layer(0)
        layer.to(dev)
        spec, w = _engine_layer(cfg, layer)
        lengths, H, B, steps = [5, 70, 2], cfg.hidden_size, 4, 5
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randn(n, H, generator=g).to(dev) for n in lengths]
        decode = torch.randn(steps, B, H, generator=g).to(dev)
        N, P = len(lengths), max(lengths)
        h_NPH = torch.zeros(N, P, H, device=dev)
        for n, x in enumerate(prompts):
            h_NPH[n, : len(x)] = x
        state = LinearStateCache.allocate(decoder_layers=[0], max_slots=B, spec=spec, dtype=torch.float32, device=dev)
        with torch.no_grad():
            o_NPH = linear_attention_prefill(w, h_NPH.view(N * P, H), torch.tensor(lengths, device=dev),
                                             torch.arange(N, device=dev), state, 0).view(N, P, H)
            h_BH = torch.zeros(B, H, device=dev)
            snap = state.snapshot(B)
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                linear_attention_decode(w, h_BH, state, 0)  # warm-up
            torch.cuda.current_stream(dev).wait_stream(stream)
            state.restore(snap)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_BH = linear_attention_decode(w, h_BH, state, 0)
            outs = []
            for t in range(steps):
                h_BH.copy_(decode[t])
                graph.replay()
                outs.append(out_BH.clone())
            for n, x in enumerate(prompts):
                ref = layer(torch.cat([x, decode[:, n]]).unsqueeze(0))[0]
                mine = torch.cat([o_NPH[n, : len(x)], torch.stack([o[n] for o in outs])])
                torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0, msg=lambda m, n=n: f"request {n}: {m}")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
