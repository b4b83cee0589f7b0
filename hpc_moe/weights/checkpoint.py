"""Hugging Face safetensors checkpoints of DeepSeek-V3-class models: key names, reader, writer.

The reader parses each file's header itself and memory-maps the data, so that ``get(name)`` touches
only that tensor's bytes: a rank that owns a few experts of a 671B checkpoint reads those experts,
not the checkpoint. FP8 (e4m3) weights with a float32 ``<name>_scale_inv`` per block (the published
DeepSeek-V3 format) are dequantised on read. The writer streams one tensor at a time, so it never
holds a whole model, and replaces every file atomically.

Shapes are (out_features, in_features) as in torch ``nn.Linear``; ``get`` always returns float32.
Legend: R, C = rows, cols of a weight; b0, b1 = FP8 block rows, cols; nr, nc = blocks per axis.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from hpc_moe.backend import bfloat16, float8_e4m3
from hpc_moe.config import ConfigError, ModelConfig
from hpc_moe.fp8 import FP8_MAX
from hpc_moe.weights import names
from hpc_moe.weights.safetensors_io import ST_DTYPES, CheckpointError, TensorInfo, atomic_file, read_header, write_tensors_file

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"

_FP8_NAMES = frozenset({"F8_E4M3", "F8_E5M2"})


# ---- key names ---------------------------------------------------------------------------------
def tensor_shapes(cfg: ModelConfig, layers: Iterable[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF key of the checkpoint -> its unquantised shape, in checkpoint order.

    layers: the decoder layers to list (default: all); embed_tokens, model.norm and lm_head are
    always listed (``layers=[]`` gives only those). lm_head is left out when the config ties it to
    the embedding, as ``save_pretrained`` does. The MTP layer (``num_nextn_predict_layers``) is not
    part of this program's model and is not listed.
    """
    H, V, nh = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {names.EMBED: (V, H)}

    def mlp(prefix: str, inter: int) -> None:
        shapes[prefix + "gate_proj.weight"] = shapes[prefix + "up_proj.weight"] = (inter, H)
        shapes[prefix + "down_proj.weight"] = (H, inter)

    for L in range(cfg.num_hidden_layers) if layers is None else layers:
        if not 0 <= L < cfg.num_hidden_layers:
            raise ValueError(f"layer {L} out of range [0, {cfg.num_hidden_layers})")
        p, a, m = names.layer(L) + ".", names.attention(L) + ".", names.mlp(L) + "."
        shapes[p + "input_layernorm.weight"] = (H,)
        if cfg.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (nh * cfg.qk_head_dim, H)
        else:
            shapes[a + "q_a_proj.weight"] = (cfg.q_lora_rank, H)
            shapes[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
        shapes[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (H, nh * cfg.v_head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if cfg.is_moe_layer(L):
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            shapes[m + "gate.weight"] = (E, H)
            shapes[m + "gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                mlp(m + f"experts.{e}.", I)
            if cfg.n_shared_experts > 0:
                mlp(m + "shared_experts.", I * cfg.n_shared_experts)
        else:
            mlp(m, cfg.intermediate_size)
    shapes[names.FINAL_NORM] = (H,)
    if not cfg.tie_word_embeddings:
        shapes[names.LM_HEAD] = (V, H)
    return shapes


# ---- FP8 block quantisation --------------------------------------------------------------------
def _blocks(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def quantize_fp8(w_RC: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """float32 (R, C) -> (e4m3 (R, C), float32 scale_inv (nr, nc)), W ~= W_q * scale per block.

    scale = amax(block) / 448 so each block uses the whole e4m3 range; an all-zero block gets
    scale 1 (any scale represents it exactly, and 1 keeps the scale tensor free of zeros).
    """
    w_RC = np.asarray(w_RC, dtype=np.float32)
    (R, C), (b0, b1) = w_RC.shape, block
    nr, nc = _blocks(w_RC.shape, block)
    padded = w_RC
    if (R, C) != (nr * b0, nc * b1):
        padded = np.zeros((nr * b0, nc * b1), np.float32)
        padded[:R, :C] = w_RC
    blocks = padded.reshape(nr, b0, nc, b1)
    amax = np.abs(blocks).max(axis=(1, 3))
    if not np.isfinite(amax).all():
        raise ValueError("cannot quantise a weight holding inf or NaN to FP8")
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    # amax / (amax / 448) can land a hair above 448, which e4m3fn would turn into NaN.
    q = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX).reshape(padded.shape)
    return np.ascontiguousarray(q[:R, :C]).astype(float8_e4m3), scale


def dequantize_fp8(q_RC: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """e4m3 (R, C) and float32 scale_inv (ceil(R/b0), ceil(C/b1)) -> float32 (R, C), C-contiguous.

    Each b0 x b1 block is multiplied by its scale; the last block row/column may be partial.
    """
    (R, C), (b0, b1) = q_RC.shape, block
    nr, nc = _blocks(q_RC.shape, block)
    if scale_inv.shape != (nr, nc):
        raise ValueError(f"scale shape {scale_inv.shape} does not match weight {q_RC.shape} "
                         f"in blocks of {block} (expected {(nr, nc)})")
    out = np.zeros((nr * b0, nc * b1), np.float32)
    out[:R, :C] = q_RC
    out.reshape(nr, b0, nc, b1)[...] *= np.asarray(scale_inv, np.float32)[:, None, :, None]
    return out if (R, C) == out.shape else np.ascontiguousarray(out[:R, :C])


# ---- reader ------------------------------------------------------------------------------------
class Checkpoint:
    """A memory-mapped HF checkpoint directory (``config.json`` + one file or an index of shards).

    Open with :meth:`open`. Headers are parsed (and checked against file sizes) at open; tensor
    bytes are read only by ``get``/``get_raw`` of that tensor.
    """

    def __init__(self, directory: str, config: ModelConfig, tensors: dict[str, TensorInfo], where: str):
        self.directory = directory
        self.config = config
        self._tensors = tensors
        self._where = where  # names the key source in "not found" messages
        self._maps: dict[str, np.memmap] = {}
        self._expected: dict[str, tuple[int, ...]] | None = None

    @classmethod
    def open(cls, directory: str, config: ModelConfig | None = None) -> "Checkpoint":
        """Open ``directory``; ``config`` overrides its config.json (which is then not needed)."""
        d = os.path.abspath(directory)
        if not os.path.isdir(d):
            raise CheckpointError(f"checkpoint directory not found: {d}")
        if config is None:
            cpath = os.path.join(d, CONFIG_NAME)
            if not os.path.isfile(cpath):
                raise CheckpointError(f"{cpath}: config.json not found in checkpoint directory {d}")
            try:
                config = ModelConfig.from_json(cpath)
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
        index = os.path.join(d, INDEX_NAME)
        if os.path.isfile(index):
            return cls(d, config, _read_index(d, index), "index lists no such key")
        single = os.path.join(d, SINGLE_NAME)
        if os.path.isfile(single):
            return cls(d, config, read_header(single), f"{SINGLE_NAME} has no such key")
        raise CheckpointError(f"{d}: neither {SINGLE_NAME} nor {INDEX_NAME} found")

    def close(self) -> None:
        """Drop the memory maps (arrays from get_raw keep theirs alive until they are freed)."""
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- lookup ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every stored tensor name, ``_scale_inv`` tensors included."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in {self.directory} ({self._where})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape (the unquantised shape: FP8 keeps the element layout)."""
        return self.info(name).shape

    def dtype(self, name: str) -> np.dtype:
        """Stored NumPy dtype (``float8_e4m3fn`` for FP8 weights, ``bfloat16`` from ml_dtypes)."""
        return ST_DTYPES[self.info(name).dtype]

    @property
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._expected is None:
            self._expected = tensor_shapes(self.config)
        return self._expected

    # ---- data --------------------------------------------------------------------------------
    def get_raw(self, name: str) -> np.ndarray:
        """The stored array, a read-only view into the memory-mapped file (no copy, no check)."""
        t = self.info(name)
        mm = self._maps.get(t.file)
        if mm is None:
            mm = self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        return mm[t.start:t.end].view(ST_DTYPES[t.dtype]).reshape(t.shape)

    def get(self, name: str) -> np.ndarray:
        """float32, C-contiguous host copy of tensor ``name``, dequantised when stored as FP8.

        Known keys (those of :func:`tensor_shapes`) must have the shape the config implies.
        """
        problem = self._problem(name, self.expected_shapes.get(name))
        if problem:
            raise CheckpointError(problem)
        raw = self.get_raw(name)
        if self._tensors[name].dtype not in _FP8_NAMES:
            return np.array(raw, dtype=np.float32, order="C")
        return dequantize_fp8(raw, self.get_raw(name + SCALE_SUFFIX), self.config.fp8_block or (128, 128))

    def validate(self, strict: bool = True) -> list[str]:
        """Check that every tensor the config implies is present with its shape (and FP8 weights
        have scales of the right shape). Returns the problems, one line each; with ``strict``, a
        non-empty list raises CheckpointError naming the first."""
        problems = [p for n, want in self.expected_shapes.items() if (p := self._problem(n, want))]
        if strict and problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(problems[0] + more)
        return problems

    def _problem(self, name: str, want: tuple[int, ...] | None) -> str | None:
        t = self._tensors.get(name)
        if t is None:
            return f"tensor {name!r} not found in {self.directory} ({self._where})"
        if want is not None and t.shape != want:
            return f"tensor {name!r} in {t.file}: shape {list(t.shape)}, config implies {list(want)}"
        if t.dtype in _FP8_NAMES:
            sname, block = name + SCALE_SUFFIX, self.config.fp8_block or (128, 128)
            s = self._tensors.get(sname)
            if len(t.shape) != 2:
                return f"tensor {name!r} in {t.file}: FP8 tensor must be 2-D (got {list(t.shape)})"
            if s is None:
                return f"tensor {name!r} in {t.file}: stored as {t.dtype} but {sname!r} is missing"
            if s.shape != _blocks(t.shape, block):
                return (f"tensor {sname!r} in {s.file}: shape {list(s.shape)}, {list(_blocks(t.shape, block))} "
                        f"expected for {list(t.shape)} in blocks of {list(block)}")
        return None


def _read_index(d: str, index: str) -> dict[str, TensorInfo]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object; {e!r})") from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, fn in weight_map.items():
        path = os.path.join(d, fn)
        if path not in headers:
            if not os.path.isfile(path):
                raise CheckpointError(f"tensor {name!r}: index {index} points to missing shard file {path}")
            headers[path] = read_header(path)
        if name not in headers[path]:
            raise CheckpointError(f"tensor {name!r}: index {index} places it in {path}, which has no such tensor")
        tensors[name] = headers[path][name]
    return tensors


# ---- writer ------------------------------------------------------------------------------------
def _order(name: str) -> tuple:
    # Layer order (embedding first, head last) with numbers compared as numbers, so that a shard
    # holds consecutive layers and experts, as published checkpoints do.
    layer = names.layer_of(name)
    layer = layer if layer is not None else (-1 if name == names.EMBED else 1 << 30)
    return (layer, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def _source_shape(source: Any, name: str) -> tuple[int, ...]:
    shape = getattr(source, "shape", None)
    return tuple(shape(name) if callable(shape) else np.shape(source[name]))


def _source_get(source: Any, name: str) -> np.ndarray:
    get = getattr(source, "get", None)
    return np.asarray(get(name) if callable(get) else source[name], dtype=np.float32)


def save_checkpoint(directory: str, cfg: ModelConfig, source: Any, *, shards: int = 1,
                    dtype: str = "float32", fp8: bool | None = None) -> list[str]:
    """Write ``source``'s tensors as an HF checkpoint directory; returns the paths written.

    source: anything with ``keys()`` and ``get(name)`` (SyntheticWeights, Checkpoint, a dict of
    arrays); ``shape(name)`` is used when present so the header needs no data. ``_scale_inv``
    tensors of the source are dropped (its ``get`` already dequantises). shards: 1 gives
    ``model.safetensors``; n > 1 gives ``model-0000i-of-0000n.safetensors`` + index, split by
    bytes in layer order. dtype: "float32" or "bfloat16" for unquantised tensors. fp8: store the
    :func:`~hpc_moe.weights.names.is_quantized` weights as e4m3 + float32 ``weight_scale_inv`` blocks; None means
    "when cfg.quantization_config says fp8". config.json records what was written (torch_dtype,
    quantization_config). Each file is replaced atomically and config.json is written last (and
    removed first), so a crash leaves a directory that does not open rather than a mixed one.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16' (got {dtype!r})")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive integer (got {shards!r})")
    block = cfg.fp8_block if fp8 is None else ((cfg.fp8_block or (128, 128)) if fp8 else None)
    qcfg = None
    if block is not None:
        qcfg = dict(cfg.quantization_config or {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"})
        qcfg["weight_block_size"] = list(block)
    out_cfg = cfg.replace(quantization_config=qcfg, torch_dtype=dtype)
    st_dtype, np_dtype = ("F32", np.dtype(np.float32)) if dtype == "float32" else ("BF16", bfloat16)

    keys = set(source.keys())
    keys_out = sorted((n for n in keys if not (n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in keys)), key=_order)
    expected = tensor_shapes(cfg)
    specs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}  # per tensor: stored entries
    for n in keys_out:
        shape = _source_shape(source, n)
        if n in expected and shape != expected[n]:
            raise CheckpointError(f"tensor {n!r} from {type(source).__name__}: shape {list(shape)}, "
                                  f"config implies {list(expected[n])}")
        if block is not None and names.is_quantized(n) and len(shape) == 2:
            specs[n] = {n: ("F8_E4M3", shape), n + SCALE_SUFFIX: ("F32", _blocks(shape, block))}
        else:
            specs[n] = {n: (st_dtype, shape)}

    def nbytes(n: str) -> int:
        return sum(math.prod(s) * ST_DTYPES[d].itemsize for d, s in specs[n].values())

    total = sum(nbytes(n) for n in keys_out)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for n in keys_out:  # a tensor goes to the shard its middle byte falls in
        groups[min(shards - 1, int((done + nbytes(n) / 2) * shards / max(total, 1)))].append(n)
        done += nbytes(n)

    def chunks(group: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        for n in group:
            w = _source_get(source, n)
            if len(specs[n]) == 2:
                q, s = quantize_fp8(w, block)
                yield n, q
                yield n + SCALE_SUFFIX, s
            else:
                yield n, w.astype(np_dtype)

    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, CONFIG_NAME)
    index_path = os.path.join(directory, INDEX_NAME)
    for p in [config_path] + ([index_path] if shards == 1 else []):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
    paths, weight_map = [], {}
    for i, group in enumerate(groups):
        fn = SINGLE_NAME if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        path = os.path.join(directory, fn)
        file_specs = {k: v for n in group for k, v in specs[n].items()}
        write_tensors_file(path, file_specs, chunks(group))
        weight_map.update({k: fn for k in file_specs})
        paths.append(path)
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with atomic_file(index_path, "w") as f:
            f.write(json.dumps(index, indent=2) + "\n")
        paths.append(index_path)
    with atomic_file(config_path, "w") as f:
        f.write(json.dumps(out_cfg.to_dict(), indent=2) + "\n")  # what cfg.save writes, atomically
    paths.append(config_path)
    return paths

