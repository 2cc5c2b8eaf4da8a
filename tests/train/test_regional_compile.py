"""Regional torch.compile (`--compile`) with replay: routers and hooks stay eager, so R3 replays, the check counts
both stages and fails on a fault, and the experts tap reads what the experts received, all under compile. Real
inductor compiles on the CPU (a C++ compiler is on every CI machine); each compiling test pays ~20-30 s."""

import copy
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from r3rl.check import ReplayCheck
from r3rl.config import Fault, ReplayConfig
from r3rl.experts_tap import ExpertsTap
from r3rl.faults import corrupt_ids
from r3rl.models.loading import set_activation_checkpointing
from r3rl.models.presets import TINY_FAMILIES, TINY_NEW_FAMILIES, make_model, preset_available
from r3rl.replay import RoutingReplay
from r3rl.trace import ReplayBatch
from r3rl.train.regional_compile import compile_regions, compiled_regions, uncompile_regions


def _policy(seed=1):
    model = make_model("tiny-qwen3-moe", seed=seed).train()
    replay = RoutingReplay(model)
    replay.check = ReplayCheck(replay.num_layers, replay.top_k)
    set_activation_checkpointing(model, True, context_fn=replay.checkpoint_context_fn)
    return model, replay, ExpertsTap(model)


def _step(model, replay, tap, ids, batch):
    """One update forward + backward under replay (the recompute replays too); logits, grads, experts read."""
    model.zero_grad(set_to_none=True)
    with replay.replay(batch), tap.reading() as used:
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, used.ids()


def _recorded(model, replay, ids) -> ReplayBatch:
    with torch.no_grad(), replay.record() as rec:
        model(input_ids=ids, use_cache=False)
    return rec.batch()


def test_regions_leave_routers_and_hooks_eager_and_copies_bind_their_own_weights():
    model = make_model("tiny-qwen3-moe", seed=1)
    names = compile_regions(model)
    layer0 = {n for n in names if n.startswith("model.layers.0.")}
    assert layer0 == {"model.layers.0.self_attn", "model.layers.0.mlp.experts", "model.layers.0.input_layernorm",
                      "model.layers.0.post_attention_layernorm"}, layer0
    assert not any(n.endswith(".gate") for n in names)  # the routers: replay's patch points
    assert compiled_regions(model) == names
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn .*already has a per-instance forward"):
        compile_regions(model)
    twin = copy.deepcopy(model)  # e.g. the reference model: its regions run its own parameters
    assert twin.model.layers[0].mlp.experts.forward.__self__ is twin.model.layers[0].mlp.experts
    assert uncompile_regions(model) == len(names) and compiled_regions(model) == []
    assert "forward" not in vars(model.model.layers[0].self_attn)


def test_r3_replay_check_and_experts_tap_under_compile_match_eager_and_a_fault_fails():
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, eager_replay, eager_tap = _policy()
    model, replay, tap = _policy()
    model.load_state_dict(eager.state_dict())
    compile_regions(model)
    gen = torch.Generator().manual_seed(0)
    for ids in (torch.randint(0, 256, (3, 17), generator=gen), torch.randint(0, 256, (2, 23), generator=gen)):
        batch = _recorded(eager, eager_replay, ids)
        ref_logits, ref_grads, ref_used = _step(eager, eager_replay, eager_tap, ids, batch)
        logits, grads, used = _step(model, replay, tap, ids, batch)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
        # the experts computed with this micro-batch's replayed ids (not a first batch frozen into a graph)
        assert torch.equal(used, batch.expert_ids.long())
        # both stages replayed and checked, call for call as in eager
        got, want = replay.check.summary().to_dict()["stages"], eager_replay.check.summary().to_dict()["stages"]
        assert got == want and got["replay_backward"]["calls"] == replay.num_layers, got
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 8  # one graph per module class and grad mode

    # negative control under compile: layers swapped, the check fails with the contract's message and the experts
    # tap shows the swapped experts at the experts' inputs
    ids = torch.randint(0, 256, (3, 17), generator=gen)
    batch = _recorded(eager, eager_replay, ids)
    faulty = ReplayBatch.from_tensor(corrupt_ids(batch.expert_ids, Fault.PERMUTE_LAYERS), replay.num_experts)
    _, _, used = _step(model, replay, tap, ids, faulty)
    assert torch.equal(used, faulty.expert_ids.long()) and not torch.equal(used, batch.expert_ids.long())
    with pytest.raises(AssertionError, match=r"^R3 mismatch tokens \(\d+\) > threshold \(\d+\.\d\d\)$"):
        replay.check.summary()


def test_trainer_with_compile_replays_checks_and_measures_at_the_experts(tmp_path, caplog):
    from r3rl.train.config import TrainConfig
    from r3rl.train.losses import LossConfig
    from r3rl.train.trainer import Trainer

    caplog.set_level(logging.INFO, logger="r3rl")
    cfg = TrainConfig(replay=ReplayConfig(use_rollout_routing_replay=True, enable_r3_correctness_check=True),
                      rollout_batch_size=4, n_samples_per_prompt=4, rollout_max_response_len=6, num_rollout=2,
                      sft_steps=2, sft_batch_size=8, micro_batch_size=5, progress=False, plots=False, eval_prompts=16,
                      compile=True, loss=LossConfig(use_kl_loss=True, kl_loss_coef=0.01), run_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    assert compiled_regions(trainer.model) and compiled_regions(trainer.ref_model)
    # grad and no-grad forwards, the reference's frozen parameters, a micro-batch of one sample (16 = 5 + 5 + 5 + 1):
    # every variant stays within the regions' cache (past it torch would run a region eager without a word; with
    # torch's default limit of 8 this very run hits it: measured, hence RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        summary = trainer.run()
    assert summary["verdict"] == "pass", summary
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.search(r"torch\.compile: 16 regions in 4 decoder layers", m) for m in lines)
    wrappers = [m for m in lines if re.search(r"R3 wrapper: replay_(forward|backward) branch taken \(rank 0", m)]
    assert len(wrappers) == 2 * 2 * 4  # per step, per stage, per MoE layer
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["routing_mismatch"] == 0.0 and r["r3_check_passed"] and r["r3_check_replay_backward_tokens"] > 0


@pytest.mark.parametrize("preset", TINY_FAMILIES + TINY_NEW_FAMILIES)
def test_every_family_replays_through_its_compiled_regions(preset):
    if not preset_available(preset):
        pytest.skip(f"{preset}: the installed transformers lacks this family")
    model = make_model(preset, seed=1).eval()
    replay, tap = RoutingReplay(model), ExpertsTap(model)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    batch = _recorded(model, replay, ids)
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
    names = compile_regions(model, log=False)
    routers = {site.name for site in replay.sites}
    assert names and not any(r == n or r.startswith(n + ".") for r in routers for n in names), (routers, names)
    with torch.no_grad(), replay.replay(batch), tap.reading() as used:
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(used.ids(), batch.expert_ids.long())


def test_compiled_head_equals_the_eager_log_probs_entropy_and_their_gradients():
    from r3rl.train.data import response_logprobs, token_logprobs
    from r3rl.train.losses import entropy_from_logits
    from r3rl.train.regional_compile import compiled

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, 50, generator=gen, requires_grad=True)
    pos, targets = torch.tensor([2, 3, 4, 11, 12]), torch.randint(0, 50, (5,), generator=gen)
    rows = logits.detach().reshape(-1, 50)[pos]
    want_logp, want_ent = token_logprobs(rows, targets, 0.7), entropy_from_logits(rows)
    for head in (response_logprobs, compiled(response_logprobs)):
        for mode in ("grad", "detached"):
            logp, ent = head(logits, pos, targets, 0.7, mode)
            torch.testing.assert_close(logp, want_logp)
            torch.testing.assert_close(ent, want_ent)
            assert ent.requires_grad == (mode == "grad")
            (logp.sum() + (ent.sum() if mode == "grad" else 0)).backward()
            grad, logits.grad = logits.grad, None
            ref = logits.detach().clone().requires_grad_(True)
            r = ref.reshape(-1, 50).index_select(0, pos)
            (token_logprobs(r, targets, 0.7).sum() + (entropy_from_logits(r).sum() if mode == "grad" else 0)).backward()
            torch.testing.assert_close(grad, ref.grad)
    assert response_logprobs(logits, pos, targets)[1] is None
    with pytest.raises(ValueError, match="entropy must be None, 'grad' or 'detached': got 'yes'"):
        response_logprobs(logits, pos, targets, 1.0, "yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_regions_on_cuda_in_bf16_replay_check_and_fail_on_a_fault():
    """The GPU path of `--compile`: bf16, the experts' grouped GEMM under inductor, R3 with recompute."""
    model = make_model("tiny-qwen3-moe", seed=1, device="cuda", dtype=torch.bfloat16).train()
    replay = RoutingReplay(model)
    replay.check = ReplayCheck(replay.num_layers, replay.top_k, device="cuda")
    set_activation_checkpointing(model, True, context_fn=replay.checkpoint_context_fn)
    tap = ExpertsTap(model)
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    batch = _recorded(model, replay, ids)
    eager_logits, eager_grads, _ = _step(model, replay, tap, ids, batch)
    replay.check.summary()
    compile_regions(model)
    for _ in range(2):  # the second call runs the cached graphs
        logits, grads, used = _step(model, replay, tap, ids, batch)
        torch.testing.assert_close(logits.float(), eager_logits.float(), rtol=0.05, atol=0.05)
        assert torch.equal(used, batch.expert_ids.long().cpu())
        stages = replay.check.summary().to_dict()["stages"]
        assert stages["replay_backward"]["calls"] == replay.num_layers and stages["replay_forward"]["zero_overlap"] == 0
    faulty = ReplayBatch.from_tensor(corrupt_ids(batch.expert_ids, Fault.PERMUTE_LAYERS), replay.num_experts)
    _step(model, replay, tap, ids, faulty)
    with pytest.raises(AssertionError, match=r"^R3 mismatch tokens \(\d+\) > threshold \(\d+\.\d\d\)$"):
        replay.check.summary()


_HEAD = """
import torch
from r3rl.train.data import response_logprobs
from r3rl.train.regional_compile import compiled
g = torch.Generator().manual_seed(3)
logits, pos = torch.randn(2, 9, 50, generator=g), torch.tensor([2, 3, 4, 11, 12])
targets = torch.randint(0, 50, (5,), generator=g)
torch.testing.assert_close(compiled(response_logprobs)(logits, pos, targets, 0.7)[0],
                           response_logprobs(logits, pos, targets, 0.7)[0])
print("same")
"""


def test_processes_that_pin_another_cpu_isa_do_not_share_compiled_kernels(tmp_path):
    """torch's inductor cache has no key for ATEN_CPU_CAPABILITY: without r3rl's per-ISA directory, an avx2 process
    loaded the AVX-512 kernels of an earlier one and its compiled head was off by 5.5 (and the reverse crashed)."""
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY",
                                                             "ONEDNN_MAX_CPU_ISA")}
    base["TMPDIR"] = str(tmp_path)  # inductor's default cache directory lives under it: shared by the three runs
    for pinned in ({}, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, {}):
        proc = subprocess.run([sys.executable, "-c", _HEAD], env=base | pinned, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "same" in proc.stdout, (pinned, proc.stderr[-1500:])
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("torchinductor_"))
    assert len(names) == 2 and names[1] == names[0] + "_isa-avx2-avx2", names  # the default's and the pinned one's
