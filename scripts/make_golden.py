"""Regenerate ``data/golden/``: tiny DeepSeek-V3-class HF checkpoints and transformers' outputs on them.

    .venv/bin/python scripts/make_golden.py                    # every case into data/golden/
    .venv/bin/python scripts/make_golden.py --case fp8_sharded --out /tmp/golden

Each case is a tiny random config (hidden 32-48, vocab 128-192, 3 layers) whose weights come from
hpc_moe's ``SyntheticWeights`` (decisive routing, non-zero ``e_score_correction_bias``) and are
written by hpc_moe's ``save_checkpoint`` as an HF checkpoint with per-expert keys. The reference is
transformers' own ``DeepseekV3ForCausalLM``, loaded from that directory with ``from_pretrained``
in float32: prefill logits of a batch of equal-length prompts, greedy tokens from ``generate``
(``do_sample=False``), and the experts its router picked for every prompt token.

Writes ``<out>/<case>/`` = the checkpoint + ``reference.npz``:
    input_ids       int64   [B, S]
    prefill_logits  float32 [B, S, V]
    tokens          int64   [B, N]     greedy continuation
    topk_ids        int64   [M, B, S, K] experts each prompt token was routed to in each MoE layer
                                       (ascending; the set transformers' router picked)

tests/test_parity.py imports this file (CASES, write_checkpoint, transformers_reference) for its
live comparison, so torch and transformers are imported only inside the functions that need them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hpc_moe.config import ModelConfig
from hpc_moe.weights.checkpoint import save_checkpoint
from hpc_moe.weights.synthetic import SyntheticWeights

GOLDEN_DIR = os.path.join(ROOT, "data", "golden")
REFERENCE_NAME = "reference.npz"

# The published yarn block of DeepSeek-V3 (factor 40, original 4096) scaled down to tiny contexts.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

BASE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 16, "v_head_dim": 8, "n_routed_experts": 16, "num_experts_per_tok": 4,
    "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "moe_layer_freq": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": None, "rope_interleave": True, "max_position_embeddings": 512,
    "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 1,
}


@dataclass(frozen=True)
class Case:
    """One golden checkpoint: config overrides on BASE and how save_checkpoint writes it.

    rope_parameters: rewrite config.json in transformers >= 5's spelling (``rope_parameters``
    holding rope_theta and the yarn block) instead of the published ``rope_scaling`` + ``rope_theta``.
    """

    name: str
    doc: str
    overrides: dict = field(default_factory=dict)
    shards: int = 1
    dtype: str = "float32"
    fp8: bool = False
    rope_parameters: bool = False
    seed: int = 0
    batch: int = 3
    prompt_len: int = 10
    new_tokens: int = 8


CASES = {c.name: c for c in [
    Case("v3_yarn", "DeepSeek-V3 form: q LoRA, yarn rope_scaling (published spelling), interleaved "
         "rope, 1 shared expert, norm_topk_prob, group-limited routing; float32, one file",
         {"rope_scaling": YARN}, seed=1),
    Case("v2lite_shared2_nonorm", "V2-Lite form: q_lora_rank null (q_proj), 2 shared experts, "
         "norm_topk_prob false, plain rope, one routing group; bfloat16, 3 shards + index.json",
         {"q_lora_rank": None, "n_shared_experts": 2, "norm_topk_prob": False, "n_group": 1,
          "topk_group": 1, "num_experts_per_tok": 3, "vocab_size": 160},
         shards=3, dtype="bfloat16", seed=2),
    Case("fp8_sharded", "FP8 e4m3 with float32 weight_scale_inv per 128x128 block (q_b_proj, "
         "kv_b_proj and the dense MLP span 2 blocks, the last one partial), yarn with "
         "mscale != mscale_all_dim; 2 shards + index.json",
         {"rope_scaling": {**YARN, "factor": 8.0, "original_max_position_embeddings": 64,
                           "mscale": 1.0, "mscale_all_dim": 0.5},
          "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 6,
          "intermediate_size": 160, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
          "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}},
         shards=2, fp8=True, seed=3),
    Case("rope_parameters_noninterleaved", "config.json in the rope_parameters spelling (yarn), "
         "rope_interleave false, every layer MoE (first_k_dense_replace 0), 8 groups of 2 experts",
         {"rope_scaling": {**YARN, "factor": 2.0, "original_max_position_embeddings": 256,
                           "mscale": 0.8, "mscale_all_dim": 0.8},
          "rope_theta": 50000.0, "rope_interleave": False, "first_k_dense_replace": 0,
          "n_group": 8, "topk_group": 3, "num_experts_per_tok": 4, "vocab_size": 192},
         rope_parameters=True, dtype="bfloat16", seed=4),
]}


def case_config(case: Case) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **case.overrides})


def case_input_ids(case: Case) -> np.ndarray:
    """int64 [B, S] prompt token ids, fixed by the case's seed."""
    rng = np.random.default_rng([case.seed, 12345])
    return rng.integers(0, case_config(case).vocab_size, size=(case.batch, case.prompt_len), dtype=np.int64)


def write_checkpoint(case: Case, directory: str) -> None:
    """The case's SyntheticWeights written by hpc_moe's save_checkpoint into ``directory``."""
    cfg = case_config(case)
    save_checkpoint(directory, cfg, SyntheticWeights(cfg, case.seed), shards=case.shards,
                    dtype=case.dtype, fp8=case.fp8)
    if case.rope_parameters:
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            d = json.load(f)
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        scaling = d.pop("rope_scaling", None)
        if scaling:
            scaling = dict(scaling)
            rope["rope_type"] = scaling.pop("type")
            rope.update(scaling)
        d["rope_parameters"] = rope
        with open(path, "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")


# ---- the transformers side (torch imported here only) ---------------------------------------------
def _dequantized_copy(directory: str, out: str) -> None:
    """Write ``directory``'s FP8 checkpoint as a float32 one in ``out``, dequantised with torch.

    transformers cannot run this checkpoint on CPU itself: its FineGrainedFP8 path needs a GPU for
    the FP8 kernels and, to dequantise on CPU instead, the accelerate package. So the reference is
    transformers on the dequantised weights, and the dequantisation is done here with torch's own
    float8_e4m3fn (not hpc_moe's dequantizer, which is what is under test): each 128 x 128 block
    of the e4m3 weight times its ``weight_scale_inv``, the last block of a row or column partial
    when the dimension is not a multiple of 128 (DeepSeek's ``weight_dequant`` convention; e.g.
    V3's kv_a_proj_with_mqa has 576 rows, scales [5, 56]).

    Checked once by hand (accelerate installed aside): transformers 5.23's own CPU dequantisation
    (``Fp8Dequantize`` at load time) gives the same weights for tensors of whole blocks, but
    derives the block size as rows // scale_rows, so it mis-scales weights with a partial block
    (160 x 48 with scales [2, 1] -> 80-row blocks); its runtime ``_dequantize_fp8_weight`` uses
    the config's 128 x 128 like this function.
    """
    import torch
    from safetensors.torch import load_file, save_file

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    b0, b1 = config.pop("quantization_config")["weight_block_size"]
    tensors = {}
    for fn in sorted(os.listdir(directory)):
        if fn.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, fn)))
    state = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[name + "_scale_inv"].to(torch.float32)
            R, C = t.shape
            s = s.repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)[:R, :C]
            state[name] = t.to(torch.float32) * s
        else:
            state[name] = t.to(torch.float32)
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = "float32"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_transformers(directory: str):
    """transformers' DeepseekV3ForCausalLM from our HF checkpoint, float32, eager attention.

    Fails if transformers reports any missing, unexpected or mismatched weight (it would silently
    initialise a missing one at random). FP8 checkpoints go through :func:`_dequantized_copy`.
    """
    import torch
    from transformers import DeepseekV3ForCausalLM

    with open(os.path.join(directory, "config.json")) as f:
        quantized = json.load(f).get("quantization_config") is not None
    tmp = tempfile.mkdtemp(prefix="golden-dequant-") if quantized else None
    try:
        if quantized:
            _dequantized_copy(directory, tmp)
        model, info = DeepseekV3ForCausalLM.from_pretrained(
            tmp or directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"transformers did not load {directory} cleanly: {bad}")
    return model.eval()


def transformers_reference(directory: str, input_ids: np.ndarray, new_tokens: int) -> dict:
    """Run transformers on the checkpoint: the arrays of reference.npz (see the module docstring)."""
    import torch

    model = load_transformers(directory)
    moe = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    picked = [None] * len(moe)

    def recorder(i):
        def hook(module, args, output):  # the router returns (logits, topk_weights, topk_indices)
            picked[i] = output[2].numpy().copy()
        return hook

    ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    with torch.no_grad():
        handles = [m.gate.register_forward_hook(recorder(i)) for i, m in enumerate(moe)]
        try:
            logits = model(ids).logits
        finally:
            for h in handles:
                h.remove()
        # eos_token_id=None: greedy runs all new_tokens steps even where the model emits EOS.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = out[:, ids.shape[1]:].numpy().astype(np.int64)
    if tokens.shape != (ids.shape[0], new_tokens):
        raise RuntimeError(f"transformers generated {tokens.shape}, expected {(ids.shape[0], new_tokens)}")
    B, S = ids.shape
    topk_ids = np.sort(np.stack(picked).reshape(len(moe), B, S, -1), axis=-1).astype(np.int64)
    return {"input_ids": np.asarray(input_ids, np.int64), "prefill_logits": logits.numpy().astype(np.float32),
            "tokens": tokens, "topk_ids": topk_ids}


def make_case(case: Case, out_root: str) -> str:
    directory = os.path.join(out_root, case.name)
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    write_checkpoint(case, directory)
    ref = transformers_reference(directory, case_input_ids(case), case.new_tokens)
    np.savez_compressed(os.path.join(directory, REFERENCE_NAME), **ref)
    return directory


def write_readme(out_root: str, names) -> None:
    import torch
    import transformers

    lines = [
        "# Golden parity files",
        "",
        "Tiny DeepSeek-V3-class HF checkpoints and the outputs of transformers' own",
        "`DeepseekV3ForCausalLM` on them; `tests/test_parity.py` checks hpc_moe against these files",
        "(no torch needed) and, where torch and transformers are installed, against a live run.",
        "",
        "Made by",
        "",
        "    .venv/bin/python scripts/make_golden.py",
        "",
        f"with transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}.",
        "Weights: `SyntheticWeights(cfg, seed)` written by `save_checkpoint`; reference: `from_pretrained`",
        "in float32 (eager attention), prefill logits of the prompts and `generate(do_sample=False)`.",
        "The FP8 case is run by transformers on weights dequantised with torch (transformers needs a",
        "GPU, or accelerate, to run FP8 checkpoints).",
        "",
        "Each `<case>/reference.npz`: `input_ids` int64 [B, S], `prefill_logits` float32 [B, S, V],",
        "`tokens` int64 [B, N] (greedy), `topk_ids` int64 [MoE layers, B, S, K] (the experts",
        "transformers' router picked for each prompt token, ascending).",
        "",
        "| case | what it covers |",
        "|---|---|",
    ]
    lines += [f"| `{n}` | {CASES[n].doc} |" for n in names]
    with open(os.path.join(out_root, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=GOLDEN_DIR, help="output folder (default data/golden)")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="only this case (repeatable)")
    args = p.parse_args(argv)
    names = args.case or list(CASES)
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        d = make_case(CASES[name], args.out)
        print(f"wrote {d}")
    if not args.case:
        write_readme(args.out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
