"""Checkpoint key names, synthetic weights, the safetensors reader/writer and their errors.

Single process, CPU only. Legend: R, C = rows, cols of a weight; b0, b1 = FP8 block rows, cols.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest

from hpc_moe.backend import bfloat16, float8_e4m3
from hpc_moe.config import load_config
from hpc_moe.errors import InputError
from hpc_moe.weights import names
from hpc_moe.weights.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    CheckpointError,
    dequantize_fp8,
    quantize_fp8,
    read_header,
    save_checkpoint,
    tensor_shapes,
)
from hpc_moe.weights.safetensors_io import write_safetensors
from hpc_moe.weights.synthetic import SyntheticWeights

EXPERT = "model.layers.1.mlp.experts.7.up_proj.weight"
FP8_CFG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tiny_weights(tiny):
    return SyntheticWeights(tiny, seed=3)


def raises(match_parts, fn, *args, **kw):
    """fn(*args) must raise CheckpointError (an InputError) on one line naming every part."""
    with pytest.raises(CheckpointError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert isinstance(ei.value, InputError) and "\n" not in msg
    for part in match_parts:
        assert str(part) in msg, (part, msg)
    return msg


# ---- key names ---------------------------------------------------------------------------------
def test_tensor_shapes_tiny(tiny):
    s = tensor_shapes(tiny)
    H, V, nh = 64, 256, 4
    assert list(s)[0] == "model.embed_tokens.weight" and list(s)[-1] == "lm_head.weight"
    assert s["model.embed_tokens.weight"] == (V, H) and s["model.norm.weight"] == (H,)
    a = "model.layers.0.self_attn."
    assert s[a + "q_a_proj.weight"] == (48, H) and s[a + "q_a_layernorm.weight"] == (48,)
    assert s[a + "q_b_proj.weight"] == (nh * 24, 48)
    assert s[a + "kv_a_proj_with_mqa.weight"] == (32 + 8, H) and s[a + "kv_a_layernorm.weight"] == (32,)
    assert s[a + "kv_b_proj.weight"] == (nh * (16 + 16), 32) and s[a + "o_proj.weight"] == (H, nh * 16)
    assert s["model.layers.0.mlp.down_proj.weight"] == (H, 128)  # layer 0 is dense
    assert "model.layers.0.mlp.gate.weight" not in s
    m = "model.layers.2.mlp."
    assert s[m + "gate.weight"] == (16, H) and s[m + "gate.e_score_correction_bias"] == (16,)
    assert s[m + "experts.15.gate_proj.weight"] == (32, H) and s[m + "experts.15.down_proj.weight"] == (H, 32)
    assert s[m + "shared_experts.up_proj.weight"] == (32, H)
    assert "model.layers.2.mlp.experts.16.up_proj.weight" not in s
    # 3 globals + 1 dense layer (2 norms, 7 attention, 3 MLP) + 2 MoE layers (2 + 7 + gate, bias,
    # 16 x 3 experts, 3 shared)
    assert len(s) == 3 + 12 + 2 * 62

    nolora = tensor_shapes(tiny.replace(q_lora_rank=None))
    assert nolora[a + "q_proj.weight"] == (nh * 24, H) and a + "q_a_proj.weight" not in nolora
    noshared = tensor_shapes(tiny.replace(n_shared_experts=0))
    assert not any("shared_experts" in k for k in noshared)
    only = tensor_shapes(tiny, layers=[2])
    assert {k.split(".")[2] for k in only if k.startswith("model.layers.")} == {"2"}
    assert set(tensor_shapes(tiny, layers=[])) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert "lm_head.weight" not in tensor_shapes(tiny.replace(tie_word_embeddings=True))
    with pytest.raises(ValueError):
        tensor_shapes(tiny, layers=[3])


def test_is_quantized(tiny):
    yes = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
           "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.o_proj.weight",
           "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
           "model.layers.9.mlp.experts.255.up_proj.weight", "model.layers.9.mlp.shared_experts.down_proj.weight"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
          "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
          "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.3.mlp.gate.weight",
          "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.o_proj.weight_scale_inv"]
    assert all(map(names.is_quantized, yes)) and not any(map(names.is_quantized, no))


def test_deepseek_v3_parameter_count():
    cfg = load_config("deepseek-v3")
    total = sum(math.prod(s) for s in tensor_shapes(cfg).values())
    # 61 decoder layers (3 dense at 0.583B, 58 MoE at 11.507B) + embedding + lm_head + final norm
    # (1.853B) = 671,026,419,200. That is the published "671B": DeepSeek's README_WEIGHTS counts
    # the main model as 671B and the MTP module (layer 61, not listed by tensor_shapes) as a
    # further ~14B (11.6B of its own plus a copy of embedding and head), 685B on disk.
    assert total == 671_026_419_200
    assert abs(total - 671e9) / 671e9 < 0.01


# ---- synthetic weights -------------------------------------------------------------------------
def test_synthetic_deterministic_and_scaled(tiny, tiny_weights):
    w = tiny_weights
    assert set(w.keys()) == set(tensor_shapes(tiny)) and EXPERT in w and w.shape(EXPERT) == (32, 64)
    a = w.get(EXPERT)
    assert a.dtype == np.float32 and a.flags.c_contiguous and a.shape == (32, 64)
    assert np.array_equal(a, SyntheticWeights(tiny, seed=3).get(EXPERT))  # same on every rank
    assert not np.array_equal(a, SyntheticWeights(tiny, seed=4).get(EXPERT))
    assert not np.array_equal(a, w.get(EXPERT.replace("experts.7", "experts.8")))

    big = tiny.replace(hidden_size=1024, n_routed_experts=256, n_group=8, topk_group=4)
    b = SyntheticWeights(big, seed=0)
    down = b.get("model.layers.1.mlp.experts.0.down_proj.weight")  # fan_in = 32
    assert abs(down.std() * math.sqrt(32) - 1) < 0.05
    norm = b.get("model.layers.1.input_layernorm.weight")
    assert abs(norm.mean() - 1) < 0.02 and abs(norm.std() - 0.1) < 0.02
    assert abs(b.get("model.embed_tokens.weight").std() - 1) < 0.02
    bias = b.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert np.all(np.abs(bias) <= 0.05) and np.abs(bias).mean() > 0.01
    # Routing is decisive: on normed inputs, router logits have std ~2, and the gap between the
    # 8th and 9th best sigmoid score is far above float rounding.
    gate_EH = b.get("model.layers.1.mlp.gate.weight")
    x_TH = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)
    logits_TE = x_TH @ gate_EH.T
    assert 1.8 < logits_TE.std() < 2.2
    scores = np.sort(1 / (1 + np.exp(-logits_TE)), axis=1)[:, ::-1]
    assert np.median(scores[:, 7] - scores[:, 8]) > 1e-3
    with pytest.raises(CheckpointError, match="no_such"):
        w.get("model.no_such.weight")


def test_synthetic_deepseek_v3_expert_is_cheap():
    w = SyntheticWeights(load_config("deepseek-v3"), seed=0)
    name = "model.layers.60.mlp.experts.255.down_proj.weight"
    t = time.perf_counter()
    a = w.get(name)
    assert time.perf_counter() - t < 5.0  # ~0.5 s on a slow CI core; the model is 671e9 params
    assert a.shape == (7168, 2048) and abs(a.std() * math.sqrt(2048) - 1) < 0.01


# ---- round trips -------------------------------------------------------------------------------
def test_roundtrip_float32(tmp_path, tiny, tiny_weights):
    paths = save_checkpoint(tmp_path, tiny, tiny_weights)
    assert sorted(os.path.basename(p) for p in paths) == ["config.json", SINGLE_NAME]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    with Checkpoint.open(tmp_path) as ck:
        assert ck.config == tiny.replace(torch_dtype="float32")
        assert set(ck.keys()) == set(tiny_weights.keys()) and EXPERT in ck and "nope" not in ck
        assert ck.shape(EXPERT) == (32, 64) and ck.dtype(EXPERT) == np.float32
        for name in ck.keys():
            a = ck.get(name)
            assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
            assert np.array_equal(a, tiny_weights.get(name)), name
        assert isinstance(ck.get_raw(EXPERT), np.memmap)
        assert ck.validate() == []


def test_roundtrip_bfloat16(tmp_path, tiny, tiny_weights):
    save_checkpoint(tmp_path, tiny, tiny_weights, dtype="bfloat16")
    ck = Checkpoint.open(tmp_path)
    assert ck.config.torch_dtype == "bfloat16" and ck.dtype(EXPERT) == bfloat16
    for name in ck.keys():
        ref = tiny_weights.get(name)
        got = ck.get(name)
        assert np.array_equal(got, ref.astype(bfloat16).astype(np.float32)), name
        assert np.allclose(got, ref, rtol=2 ** -8, atol=0)


def _loop_dequant(q_RC, s, block):
    out = np.zeros(q_RC.shape, np.float32)
    b0, b1 = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            out[blk] = q_RC[blk].astype(np.float32) * s[i, j]
    return out


@pytest.mark.parametrize("changes", [
    {},  # every tiny weight is smaller than one 128 x 128 block
    {"quantization_config": {**FP8_CFG, "weight_block_size": [16, 32]}},  # many blocks, C % 32 != 0 for some
    {"hidden_size": 200, "intermediate_size": 300, "moe_intermediate_size": 136},  # partial 128-blocks
], ids=["one-block", "16x32", "partial-128"])
def test_roundtrip_fp8(tmp_path, tiny, changes):
    cfg = tiny.replace(**{"quantization_config": FP8_CFG, **changes})
    src = SyntheticWeights(cfg, seed=1)
    save_checkpoint(tmp_path, cfg, src, dtype="bfloat16")
    ck = Checkpoint.open(tmp_path)
    block = cfg.fp8_block
    assert ck.config.fp8_block == block
    n_quant = 0
    for name, (R, C) in ((n, s) for n, s in tensor_shapes(cfg).items() if names.is_quantized(n)):
        n_quant += 1
        q, s = ck.get_raw(name), ck.get_raw(name + "_scale_inv")
        assert q.dtype == float8_e4m3 and s.dtype == np.float32
        assert s.shape == (-(-R // block[0]), -(-C // block[1]))
        got, ref = ck.get(name), src.get(name)
        assert np.array_equal(got, _loop_dequant(np.asarray(q), np.asarray(s), block)), name
        for i in range(s.shape[0]):  # e4m3 has 3 mantissa bits: relative error <= 2^-4
            for j in range(s.shape[1]):
                blk = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                amax = np.abs(ref[blk]).max()
                assert np.abs(got[blk] - ref[blk]).max() <= amax / 16, (name, i, j)
                assert np.isclose(s[i, j], amax / 448, rtol=1e-6)
    assert n_quant > 0 and "model.layers.1.mlp.gate.weight_scale_inv" not in ck
    assert ck.dtype("model.layers.1.mlp.gate.weight") == bfloat16 and ck.dtype("lm_head.weight") == bfloat16
    assert ck.validate() == []


def test_quantize_fp8_edges():
    w = np.zeros((130, 5), np.float32)
    w[129, 4] = -3.0
    q, s = quantize_fp8(w, (128, 128))
    assert s.tolist() == [[1.0], [np.float32(3) / np.float32(448)]] and q.dtype == float8_e4m3
    assert float(q[129, 4]) == -448.0 and np.allclose(dequantize_fp8(q, s, (128, 128)), w, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        quantize_fp8(np.full((2, 2), np.inf, np.float32))
    with pytest.raises(ValueError):
        dequantize_fp8(q, s[:1], (128, 128))


def test_sharded_roundtrip(tmp_path, tiny, tiny_weights):
    cfg = tiny.replace(quantization_config=FP8_CFG)
    paths = save_checkpoint(tmp_path, cfg, tiny_weights, shards=3)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_NAME]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    wm = index["weight_map"]
    assert list(wm) == sorted(wm) and set(wm.values()) == set(names[1:4])
    data_bytes = 0
    for fn in set(wm.values()):
        hdr = read_header(str(tmp_path / fn))
        assert set(hdr) == {k for k, v in wm.items() if v == fn}
        data_bytes += sum(t.end - t.start for t in hdr.values())
    assert index["metadata"]["total_size"] == data_bytes
    assert wm[EXPERT] == wm[EXPERT + "_scale_inv"]
    ck = Checkpoint.open(tmp_path)
    assert set(ck.keys()) == set(wm) and ck.validate() == []
    # Re-save from the FP8 checkpoint (dequantised by get) and from a dict, unquantised.
    save_checkpoint(tmp_path / "f32", cfg, ck, fp8=False)
    back = Checkpoint.open(tmp_path / "f32")
    assert back.config.quantization_config is None and "_scale_inv" not in " ".join(back.keys())
    d = {n: back.get(n) for n in back.keys()}
    save_checkpoint(tmp_path / "dict", back.config, d, shards=2)
    again = Checkpoint.open(tmp_path / "dict")
    for n in tiny_weights.keys():
        assert np.array_equal(ck.get(n), again.get(n)), n


def test_get_touches_only_its_tensor(tmp_path, tiny, tiny_weights):
    save_checkpoint(tmp_path, tiny, tiny_weights)
    path = str(tmp_path / SINGLE_NAME)
    mine = read_header(path)[EXPERT]
    data_start = min(t.start for t in read_header(path).values())
    with open(path, "r+b") as f:  # every data byte but this expert's becomes 0xFF (a NaN in f32)
        size = os.path.getsize(path)
        f.seek(data_start)
        f.write(b"\xff" * (mine.start - data_start))
        f.seek(mine.end)
        f.write(b"\xff" * (size - mine.end))
    ck = Checkpoint.open(tmp_path)
    assert np.array_equal(ck.get(EXPERT), tiny_weights.get(EXPERT))
    assert np.isnan(ck.get(EXPERT.replace("experts.7", "experts.6"))).all()


# ---- errors ------------------------------------------------------------------------------------
def test_missing_tensor(tmp_path, tiny, tiny_weights):
    save_checkpoint(tmp_path / "one", tiny, tiny_weights)
    raises([EXPERT + "x", tmp_path / "one", SINGLE_NAME], Checkpoint.open(tmp_path / "one").get, EXPERT + "x")
    save_checkpoint(tmp_path / "many", tiny, tiny_weights, shards=2)
    bad = "model.layers.3.mlp.experts.7.up_proj.weight"
    msg = raises([bad], Checkpoint.open(tmp_path / "many").get, bad)
    assert msg == f"tensor '{bad}' not found in {tmp_path / 'many'} (index lists no such key)"


def test_wrong_shape_and_validate(tmp_path, tiny, tiny_weights):
    d = {n: tiny_weights.get(n) for n in tiny_weights.keys()}
    d[EXPERT] = d[EXPERT][:, :-1]
    del d["model.layers.2.mlp.experts.3.down_proj.weight"]
    tiny.save(str(tmp_path / "config.json"))
    write_safetensors(str(tmp_path / SINGLE_NAME), d)
    ck = Checkpoint.open(tmp_path)
    raises([EXPERT, tmp_path / SINGLE_NAME, "[32, 63]", "[32, 64]"], ck.get, EXPERT)
    problems = ck.validate(strict=False)
    assert len(problems) == 2 and EXPERT in problems[0] and "layers.2.mlp.experts.3.down_proj" in problems[1]
    raises([EXPERT, "and 1 more"], ck.validate)
    # The writer refuses the same mistake before writing anything.
    raises([EXPERT, "dict"], save_checkpoint, tmp_path / "w", tiny, d)
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_truncated_and_bad_header(tmp_path, tiny, tiny_weights):
    save_checkpoint(tmp_path, tiny, tiny_weights)
    path = tmp_path / SINGLE_NAME
    hdr = read_header(str(path))
    last = max(hdr, key=lambda n: hdr[n].end)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    raises([last, path, "truncated"], Checkpoint.open, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(20)
    raises([path, "header length"], Checkpoint.open, tmp_path)
    save_checkpoint(tmp_path, tiny, tiny_weights)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"x")
    raises([path, "bad header JSON"], Checkpoint.open, tmp_path)


def test_unknown_dtype_and_fp8_without_scale(tmp_path, tiny):
    write_safetensors(str(tmp_path / SINGLE_NAME), {"a": np.zeros(4, np.float32), EXPERT: np.zeros((32, 64), float8_e4m3)})
    tiny.save(str(tmp_path / "config.json"))
    raises([EXPERT, tmp_path / SINGLE_NAME, "stored as F8_E4M3", "_scale_inv"], Checkpoint.open(tmp_path).get, EXPERT)
    raw = (tmp_path / SINGLE_NAME).read_bytes()
    (tmp_path / SINGLE_NAME).write_bytes(raw.replace(b'"F32"', b'"F7X"'))  # same length, header intact
    raises(["'a'", tmp_path / SINGLE_NAME, "unknown dtype 'F7X'"], Checkpoint.open, tmp_path)


def test_missing_config_and_missing_shard(tmp_path, tiny, tiny_weights):
    save_checkpoint(tmp_path, tiny, tiny_weights, shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    wm = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    first = next(k for k, v in wm.items() if v.startswith("model-00002"))
    raises([first, tmp_path / "model-00002-of-00002.safetensors", "missing shard"], Checkpoint.open, tmp_path)
    os.remove(tmp_path / "config.json")
    raises([tmp_path / "config.json", "not found"], Checkpoint.open, tmp_path)
    (tmp_path / "config.json").write_text("{")
    raises([tmp_path / "config.json"], Checkpoint.open, tmp_path)


def test_bad_index_and_bad_scale(tmp_path, tiny, tiny_weights):
    save_checkpoint(tmp_path, tiny, tiny_weights, shards=2)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"][EXPERT] = "model-00001-of-00002.safetensors" if index["weight_map"][EXPERT].startswith(
        "model-00002") else "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    raises([EXPERT, tmp_path / INDEX_NAME, "no such tensor"], Checkpoint.open, tmp_path)
    (tmp_path / INDEX_NAME).write_text('{"metadata": {}}')
    raises([tmp_path / INDEX_NAME, "weight_map"], Checkpoint.open, tmp_path)

    cfg = tiny.replace(quantization_config={**FP8_CFG, "weight_block_size": [16, 16]})
    q, s = quantize_fp8(tiny_weights.get(EXPERT), (16, 16))
    os.makedirs(tmp_path / "fp8")
    cfg.save(str(tmp_path / "fp8" / "config.json"))
    write_safetensors(str(tmp_path / "fp8" / SINGLE_NAME), {EXPERT: q, EXPERT + "_scale_inv": s[:, :2]})
    ck = Checkpoint.open(tmp_path / "fp8")  # (32, 64) in 16 x 16 blocks needs a (2, 4) scale
    raises([EXPERT + "_scale_inv", tmp_path / "fp8" / SINGLE_NAME, "[2, 2]", "[2, 4]"], ck.get, EXPERT)
    wide = cfg.replace(quantization_config={**FP8_CFG, "weight_block_size": [16, 32]})
    got = Checkpoint.open(tmp_path / "fp8", config=wide).get(EXPERT)  # block size from the config
    assert np.array_equal(got, dequantize_fp8(q, s[:, :2], (16, 32)))


def test_crash_leaves_no_half_checkpoint(tmp_path, tiny, tiny_weights):
    class Crashing:
        def __init__(self, after):
            self.left = after

        def keys(self):
            return tiny_weights.keys()

        def shape(self, name):
            return tiny_weights.shape(name)

        def get(self, name):
            self.left -= 1
            if self.left < 0:
                raise KeyboardInterrupt  # anything, even a ^C, between two tensors
            return tiny_weights.get(name)

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, tiny, Crashing(50))
    assert os.listdir(tmp_path) == []
    save_checkpoint(tmp_path, tiny, tiny_weights)  # a complete one, then a crash over it
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, tiny, Crashing(50), dtype="bfloat16")
    assert sorted(os.listdir(tmp_path)) == [SINGLE_NAME]  # old data intact, config.json gone
    raises(["config.json"], Checkpoint.open, tmp_path)


# ---- interoperability --------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"dtype": "bfloat16"}, {"fp8": True, "shards": 2}], ids=["f32", "bf16", "fp8"])
def test_safetensors_library_reads_our_files(tmp_path, tiny, tiny_weights, kw):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors")
    save_checkpoint(tmp_path, tiny, tiny_weights, **kw)
    ck = Checkpoint.open(tmp_path)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    seen = set()
    for fn in files:
        with safetensors.safe_open(str(tmp_path / fn), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                raw = ck.get_raw(name)
                assert tuple(t.shape) == raw.shape
                assert np.array_equal(t.to(torch.float32).numpy(), raw.astype(np.float32)), name
                seen.add(name)
    assert seen == set(ck.keys())
    if kw == {}:
        from safetensors.numpy import load_file
        got = load_file(str(tmp_path / SINGLE_NAME))
        assert all(np.array_equal(got[n], ck.get(n)) for n in ck.keys())
    if kw.get("fp8"):
        assert ck.dtype(EXPERT) == float8_e4m3 and f"{EXPERT}_scale_inv" in seen


@pytest.mark.slow
def test_transformers_loads_our_checkpoint(tmp_path, tiny, tiny_weights):
    """Our key names are the ones transformers' DeepseekV3ForCausalLM expects (it fuses the
    per-expert keys into [E, 2I, H] gate_up and [E, H, I] down tensors on load)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save_checkpoint(tmp_path, tiny, tiny_weights, shards=2)
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert np.array_equal(sd["model.layers.1.self_attn.kv_b_proj.weight"],
                          tiny_weights.get("model.layers.1.self_attn.kv_b_proj.weight"))
    gate_up = sd.get("model.layers.1.mlp.experts.gate_up_proj")
    if gate_up is not None:  # transformers >= 5 layout
        e7 = np.concatenate([tiny_weights.get(EXPERT.replace("up_proj", "gate_proj")), tiny_weights.get(EXPERT)])
        assert np.array_equal(gate_up[7], e7)
    else:
        assert np.array_equal(sd[EXPERT], tiny_weights.get(EXPERT))
