"""RoutingTrace: the experts one sample was routed to, per token and MoE layer, stored compactly.

Shape `[len(tokens) - 1, num_layers, top_k]`: row i holds the experts used when token i was the model's input
(the last token is never an input during rollout, so it has no row). This is SGLang's `routed_experts` layout.

Storage is 1 byte per (row, layer, k) when the model has fewer than 255 experts (uint8, pad 255), else int16
(pad -1). A pad slot means "no replayed expert here": replay fills it with the live router's best expert that is
not already in the row (see `r3rl.replay`).

Codecs:
  - SGLang `meta_info["routed_experts"]`: base64 of little-endian int32, flat `[rows * layers * top_k]`.
  - vLLM: `prompt_routed_experts` + `routed_experts`, int16 arrays `[n, layers, top_k]`.
  - compact bytes: a 24-byte header (magic, version, dtype, rows, layers, top_k, num_experts) + raw ids.

A `ReplayBatch` holds int64 ids `[N, layers, top_k]` in a forward's flattened token order, with pad rows where no
trace row exists; the trainer's data module lays traces out into one (`r3rl.train.data.layout_padded`,
`layout_packed`).

Example:
    trace = RoutingTrace.from_sglang(meta["routed_experts"], num_tokens=len(ids), num_layers=48, top_k=8,
                                     num_experts=128)
    batch = r3rl.train.data.layout_padded([trace], seq_len=len(ids))
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "common_shape",
    "TraceError",
    "RoutingTrace",
    "ReplayBatch",
    "compact_dtype",
    "pad_value_for",
    "has_partial_rows",
]

_MAGIC = b"R3TR"
_VERSION = 1
_HEADER = struct.Struct("<4sBBxxIIII")  # magic, version, dtype code, pad, rows, layers, top_k, num_experts
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int16): 2}


class TraceError(ValueError):
    """A routing trace does not match the sample, the model, or its own invariants."""


def compact_dtype(num_experts: int) -> np.dtype:
    """uint8 below 255 experts (255 is the pad), int16 above (pad -1)."""
    if num_experts <= 0:
        raise TraceError(f"num_experts must be positive: got={num_experts}")
    if num_experts < 255:
        return np.dtype(np.uint8)
    if num_experts <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    raise TraceError(f"num_experts={num_experts} does not fit the int16 trace format (max 32767)")


def pad_value_for(num_experts: int) -> int:
    return 255 if compact_dtype(num_experts) == np.uint8 else -1


class _RowsLayersTopK:
    """`expert_ids` shaped [rows, MoE layers, top_k]: the layer and top-k counts, for traces and replay batches."""

    expert_ids: np.ndarray | torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]


@dataclass(frozen=True, eq=False)
class RoutingTrace(_RowsLayersTopK):
    """Routing of one sample. Build it with `from_ids` or a codec, which validate; the raw constructor does not."""

    expert_ids: np.ndarray  # [rows, layers, top_k], compact dtype
    num_experts: int

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_ids(cls, ids, num_experts: int, *, sample: int | str | None = None) -> RoutingTrace:
        """Validate and store ids (integer array-like `[rows, layers, top_k]`).

        -1 marks a pad slot. 255 is a pad only in an input that is already uint8 (the compact form); in any wider
        integer input with fewer than 255 experts it is an out-of-range id.
        """
        where = _where(sample)
        arr = _as_array(ids, where)
        if arr.ndim != 3:
            raise TraceError(f"trace must be [rows, layers, top_k]{where}: got shape={tuple(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TraceError(f"trace ids must be integers{where}: got dtype={arr.dtype}")
        if arr.shape[1] == 0 or arr.shape[2] == 0:
            raise TraceError(f"trace must have at least one layer and top_k >= 1{where}: got shape={tuple(arr.shape)}"
                             f", expected [rows, layers >= 1, top_k >= 1]")
        dtype = compact_dtype(num_experts)
        pad = pad_value_for(num_experts)
        wide = arr.astype(np.int64)
        is_pad = wide == -1  # the wire formats' pad
        if arr.dtype == np.uint8:
            is_pad |= wide == 255
        bad = (~is_pad) & ((wide < 0) | (wide >= num_experts))
        if bad.any():
            row, layer, slot = (int(x) for x in np.argwhere(bad)[0])
            raise TraceError(
                f"expert id out of range [0, {num_experts}){where}: got={int(wide[row, layer, slot])} at row={row} "
                f"layer={layer} slot={slot}"
            )
        compact = np.where(is_pad, pad, wide).astype(dtype)
        trace = cls(expert_ids=np.ascontiguousarray(compact), num_experts=num_experts)
        trace._check_no_duplicates(where)
        return trace

    @classmethod
    def empty(cls, num_layers: int, top_k: int, num_experts: int) -> RoutingTrace:
        return cls(np.zeros((0, num_layers, top_k), dtype=compact_dtype(num_experts)), num_experts)

    # --- shape ----------------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def pad_value(self) -> int:
        return pad_value_for(self.num_experts)

    @property
    def nbytes(self) -> int:
        return self.expert_ids.nbytes

    def pad_mask(self) -> np.ndarray:
        return self.expert_ids == self.pad_value

    def validate(
        self,
        *,
        num_tokens: int | None = None,
        num_layers: int | None = None,
        top_k: int | None = None,
        num_experts: int | None = None,
        sample: int | str | None = None,
    ) -> RoutingTrace:
        """Check the trace against a sample (`num_tokens` = prompt + response length) and a model. Returns self."""
        where = _where(sample)
        if num_experts is not None and num_experts != self.num_experts:
            raise TraceError(f"trace num_experts mismatch{where}: got={self.num_experts}, expected={num_experts}")
        if num_tokens is not None and self.num_rows != num_tokens - 1:
            raise TraceError(
                f"trace row count does not match sample tokens{where}: got={self.num_rows}, "
                f"expected={num_tokens - 1} (tokens={num_tokens}; one row per input token, the last token has none)"
            )
        if num_layers is not None and self.num_layers != num_layers:
            raise TraceError(f"trace num_layers mismatch{where}: got={self.num_layers}, expected={num_layers}")
        if top_k is not None and self.top_k != top_k:
            raise TraceError(f"trace top_k mismatch{where}: got={self.top_k}, expected={top_k}")
        return self

    # --- slicing --------------------------------------------------------------------------------------------------
    def truncate(self, num_tokens: int) -> RoutingTrace:
        """The trace of the first `num_tokens` tokens (e.g. a response cut at a stop string)."""
        if not 1 <= num_tokens <= self.num_rows + 1:
            raise TraceError(f"cannot truncate a trace of {self.num_rows + 1} tokens to {num_tokens} tokens")
        return RoutingTrace(self.expert_ids[: num_tokens - 1].copy(), self.num_experts)

    def append(self, other: RoutingTrace) -> RoutingTrace:
        """Concatenate a later turn's rows (multi-turn rollouts whose turns were routed separately)."""
        if (other.num_layers, other.top_k, other.num_experts) != (self.num_layers, self.top_k, self.num_experts):
            raise TraceError(
                "cannot append traces of different models: got (layers, top_k, experts)="
                f"{(other.num_layers, other.top_k, other.num_experts)}, "
                f"expected={(self.num_layers, self.top_k, self.num_experts)}"
            )
        return RoutingTrace(np.concatenate([self.expert_ids, other.expert_ids]), self.num_experts)

    # --- codecs -------------------------------------------------------------------------------------------------
    def to_sglang(self) -> str:
        """SGLang's `meta_info["routed_experts"]`: base64 of little-endian int32 (pad written as -1)."""
        wide = self.expert_ids.astype("<i4")
        if self.expert_ids.dtype == np.uint8:
            wide[self.pad_mask()] = -1
        return base64.b64encode(wide.tobytes()).decode("ascii")

    @classmethod
    def from_sglang(
        cls,
        data: str | bytes,
        *,
        num_layers: int,
        top_k: int,
        num_experts: int,
        num_tokens: int | None = None,
        layers: Sequence[int] | None = None,
        sample: int | str | None = None,
    ) -> RoutingTrace:
        """Decode `meta_info["routed_experts"]`. `num_layers` is the wire's layer count.

        SGLang's capturer has one column per decoder layer (`num_hidden_layers`), dense layers included. For a model
        whose layers are not all MoE, pass `layers=` the decoder indices of its MoE layers
        (`RoutingReplay.decoder_layers`) to keep only those columns, in the trace's MoE-layer order.
        """
        where = _where(sample)
        if num_layers <= 0 or top_k <= 0:
            raise TraceError(f"num_layers and top_k must be positive{where}: got {num_layers}, {top_k}")
        if not isinstance(data, str | bytes):
            raise TraceError(f"routed_experts must be a base64 string{where}: got {type(data).__name__}")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise TraceError(f"routed_experts is not valid base64{where}: {e}") from None
        per_row = num_layers * top_k * 4
        if len(raw) % per_row:
            raise TraceError(
                f"routed_experts byte count is not a whole number of rows{where}: got={len(raw)} bytes, "
                f"expected a multiple of {per_row} (num_layers={num_layers}, topk={top_k}, int32)"
            )
        ids = np.frombuffer(raw, dtype="<i4").reshape(-1, num_layers, top_k)
        if num_tokens is not None and ids.shape[0] != num_tokens - 1:
            raise TraceError(
                f"routed_experts element count does not match sample tokens{where}: got={ids.size}, "
                f"expected={(num_tokens - 1) * num_layers * top_k} (tokens={num_tokens}, num_layers={num_layers}, "
                f"topk={top_k})"
            )
        if layers is not None:
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise TraceError(f"MoE layer indices out of range [0, {num_layers}){where}: got={bad}")
            dup = sorted({i for i in layers if list(layers).count(i) > 1})
            if dup:
                raise TraceError(f"MoE layer indices must be distinct{where}: got duplicates {dup} in layers="
                                 f"{list(layers)}")
            ids = ids[:, list(layers)]
        return cls.from_ids(ids, num_experts, sample=sample)

    def to_vllm(self, num_prompt_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """vLLM's (`prompt_routed_experts`, `routed_experts`): int16 rows of the prompt and of the generation."""
        wide = self.expert_ids.astype(np.int16)
        if self.expert_ids.dtype == np.uint8:
            wide[self.pad_mask()] = -1
        return wide[:num_prompt_tokens].copy(), wide[num_prompt_tokens:].copy()

    @classmethod
    def from_vllm(
        cls, prompt_routed_experts, routed_experts, *, num_experts: int, sample: int | str | None = None
    ) -> RoutingTrace:
        parts = []
        for name, p in (("prompt_routed_experts", prompt_routed_experts), ("routed_experts", routed_experts)):
            if p is None:
                continue
            arr = _as_array(p, f" ({name}){_where(sample)}")
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise TraceError(f"vLLM {name} must hold integer expert ids{_where(sample)}: got dtype={arr.dtype}, "
                                 "expected int16/int32 (floats would be truncated)")
            parts.append(arr.astype(np.int64))
        if not parts:
            raise TraceError(f"vLLM trace has neither prompt_routed_experts nor routed_experts{_where(sample)}")
        shapes = {p.shape[1:] for p in parts if p.ndim == 3}
        if any(p.ndim != 3 for p in parts) or len(shapes) != 1:
            raise TraceError(
                f"vLLM trace arrays must be [n, layers, top_k] with equal layers/top_k{_where(sample)}: "
                f"got shapes={[p.shape for p in parts]}"
            )
        return cls.from_ids(np.concatenate(parts), num_experts, sample=sample)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(
            _MAGIC, _VERSION, _DTYPE_CODES[self.expert_ids.dtype], self.num_rows, self.num_layers, self.top_k,
            self.num_experts,
        )
        return header + self.expert_ids.astype(self.expert_ids.dtype.newbyteorder("<")).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, sample: int | str | None = None) -> RoutingTrace:
        where = _where(sample)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TraceError(f"compact trace must be bytes{where}: got {type(data).__name__} (a str is not the compact "
                             "form; SGLang's base64 string goes to from_sglang)")
        if len(data) < _HEADER.size:
            raise TraceError(f"compact trace is shorter than its {_HEADER.size}-byte header{where}: got={len(data)}")
        magic, version, code, rows, layers, top_k, num_experts = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise TraceError(f"not a compact trace{where}: got magic={magic!r} version={version}, expected "
                             f"{_MAGIC!r} version={_VERSION}")
        dtype = {v: k for k, v in _DTYPE_CODES.items()}.get(code)
        if dtype is None or dtype != compact_dtype(num_experts):
            raise TraceError(f"compact trace dtype code {code} does not fit num_experts={num_experts}{where}")
        expected = _HEADER.size + rows * layers * top_k * dtype.itemsize
        if len(data) != expected:
            raise TraceError(f"compact trace size mismatch{where}: got={len(data)} bytes, expected={expected}")
        ids = np.frombuffer(data, dtype=dtype.newbyteorder("<"), offset=_HEADER.size).reshape(rows, layers, top_k)
        return cls.from_ids(ids.astype(dtype), num_experts, sample=sample)

    # --- private ------------------------------------------------------------------------------------------------
    def _check_no_duplicates(self, where: str) -> None:
        ids = self.expert_ids
        if ids.size == 0 or ids.shape[2] < 2:
            return
        srt = np.sort(ids.astype(np.int32), axis=-1)
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != self.pad_value)
        if dup.any():
            row, layer, slot = (int(x) for x in np.argwhere(dup)[0])
            raise TraceError(
                f"duplicate expert in a trace row{where}: expert={int(srt[row, layer, slot])} appears twice at "
                f"row={row} layer={layer} (row={ids[row, layer].tolist()})"
            )


@dataclass(frozen=True, kw_only=True)
class ReplayBatch(_RowsLayersTopK):
    """Replay input for one forward: expert ids `[N, layers, top_k]` in the forward's token order.

    Layouts build it on the host in the compact dtype (uint8/int16, so the copy to the device is 1-2 bytes per id);
    `to(device)` moves it once per forward, from pinned memory so that the copy does not sync, and widens it to
    int64 on the device. `has_pad` is computed on the host when the batch is built, so replay never syncs to ask
    whether it must fill pad slots. `pad_value` marks slots with no replayed expert (255 or -1).
    """

    expert_ids: torch.Tensor  # [N, L, K]
    pad_value: int
    has_pad: bool
    num_experts: int
    validated: bool = False  # built by a layout from validated traces (or already checked): skip the host check
    partial_pad: bool = True  # some row mixes real and pad slots (then the pad fill must dedupe); False when every
    # pad row is all pad (a position without a trace row), where the fill is simply the live top-k

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    def to(self, device: torch.device | str) -> ReplayBatch:
        """int64 ids on `device` (no host sync: pinned, non-blocking copy, widened on the device)."""
        ids = self.expert_ids
        device = torch.device(device)
        has_pad, partial_pad = self.has_pad, self.partial_pad
        if ids.device.type == "cpu" and not self.validated:
            has_pad, partial_pad = self._validate_host(has_pad)
        if ids.device != device:
            if device.type == "cuda" and ids.device.type == "cpu" and not ids.is_pinned():
                ids = ids.pin_memory()
            ids = ids.to(device, non_blocking=True)
        return dataclasses.replace(self, expert_ids=ids.long(), has_pad=has_pad, validated=True,
                                   partial_pad=partial_pad)

    def _validate_host(self, has_pad: bool) -> tuple[bool, bool]:
        """Ids in range on the host, before they reach a device-side index (no device sync: the ids are here)."""
        ids = self.expert_ids.long()  # compare as the device will see the ids (a uint8 255 is not a -1 pad)
        if ids.numel() == 0:
            return has_pad, self.partial_pad
        is_pad = ids == self.pad_value
        bad = ~is_pad & ((ids < 0) | (ids >= self.num_experts))
        if bad.any():
            row, layer, slot = (int(x) for x in bad.nonzero()[0])
            raise TraceError(
                f"replay batch id out of range [0, {self.num_experts}) and not the pad {self.pad_value}: "
                f"got={int(ids[row, layer, slot])} at row={row} layer={layer} slot={slot}"
            )
        return has_pad or bool(is_pad.any()), self.partial_pad and has_partial_rows(is_pad)

    def narrow(self, start: int, length: int) -> ReplayBatch:
        """Rows `[start, start + length)`: the micro-batch of a packed layout, or of a flattened padded one."""
        if start < 0 or start + length > self.num_tokens:
            raise TraceError(f"micro-batch rows [{start}, {start + length}) outside the batch of {self.num_tokens}")
        return dataclasses.replace(self, expert_ids=self.expert_ids.narrow(0, start, length))

    @classmethod
    def from_tensor(cls, expert_ids: torch.Tensor, num_experts: int, pad_value: int | None = None) -> ReplayBatch:
        """Wrap ids recorded in-process (R2): the router chose them, so they are valid and have no pads."""
        pad = pad_value_for(num_experts) if pad_value is None else pad_value
        return cls(expert_ids=expert_ids.long(), pad_value=pad, has_pad=pad_value is not None, num_experts=num_experts,
                   validated=pad_value is None, partial_pad=pad_value is not None)


# --- private helpers ------------------------------------------------------------------------------------------------
def has_partial_rows(is_pad) -> bool:
    """Any (row, layer) with some but not all slots padded (numpy or torch bool `[rows, layers, k]`)."""
    return bool((is_pad.any(-1) & ~is_pad.all(-1)).any()) if is_pad.shape[0] else False


def _as_array(ids, where: str) -> np.ndarray:
    """ids as a numpy array, with a TraceError (not numpy's) for ragged nesting and strings."""
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy()
    try:
        arr = np.asarray(ids)
    except ValueError as e:  # ragged nesting
        raise TraceError(f"trace must be a rectangular [rows, layers, top_k] array{where}: got a ragged list "
                         f"({e})") from None
    if arr.dtype.kind in "USO":
        raise TraceError(f"trace ids must be integers{where}: got an array of {arr.dtype} (strings or objects), "
                         "expected integers")
    return arr


def _where(sample: int | str | None) -> str:
    return "" if sample is None else f" (sample {sample})"


def common_shape(traces: Sequence[RoutingTrace]) -> tuple[int, int, int]:
    """(layers, top_k, experts) shared by `traces`, which one batch lays out together; raises naming the first
    sample that differs."""
    if not traces:
        raise TraceError("cannot lay out an empty list of traces")
    first = traces[0]
    for b, t in enumerate(traces):
        if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
            raise TraceError(
                f"traces in one batch disagree (sample {b}): got (layers, top_k, experts)="
                f"{(t.num_layers, t.top_k, t.num_experts)}, "
                f"expected={(first.num_layers, first.top_k, first.num_experts)}"
            )
    return first.num_layers, first.top_k, first.num_experts
