"""Model configuration with the field names of Hugging Face's DeepSeek-V3 ``config.json``.

A config is frozen and validated once, at load time, so that a bad value fails with a message naming
the field and the rule instead of deep inside a matmul. Presets live in ``data/configs/*.json`` and
are plain HF config files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from hpc_moe.errors import InputError

log = logging.getLogger("hpc_moe.config")
# Keys of Hugging Face's DeepseekV3Config (and PretrainedConfig's that its files carry) that this
# program reads past: a key outside them and the fields is a misspelling as far as we can tell.
HF_KEYS_UNUSED = frozenset({
    "architectures", "attention_dropout", "aux_loss_alpha", "ep_size", "initializer_range", "num_nextn_predict_layers",
    "pretraining_tp", "seq_aux", "transformers_version", "use_cache", "auto_map", "pad_token_id", "dtype", "head_dim",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "rope_parameters",
    "partial_rotary_factor", "use_sliding_window", "sliding_window"})
# The fields that set the model's shape: missing ones silently become DeepSeek-V3's.
CORE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
               "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "first_k_dense_replace")
PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "configs")


class ConfigError(InputError):
    """A config value breaks a rule; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3-class model hyper-parameters; every field is spelled as in HF ``config.json``."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # The yarn parameters as published (``rope_scaling``) or as newer transformers write them
    # (``rope_parameters``); normalised to the published form, without rope_theta.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 163840
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope_interleave: bool = True
    attention_bias: bool = False
    quantization_config: dict | None = None
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    model_type: str = "deepseek_v3"
    # Keys of config.json that this program does not use, kept so that a round trip loses nothing.
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        """Layers from ``first_k_dense_replace`` on are MoE (as transformers' DeepseekV3)."""
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """(rows, cols) of one FP8 scale block when the checkpoint is block-quantised, else None."""
        q = self.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return None
        return tuple(q.get("weight_block_size", (128, 128)))

    # ---- I/O ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        rope = d.pop("rope_parameters", None)
        if rope is not None:
            # transformers >= 5 keeps rope_theta and the scaling in one dict.
            rope = dict(rope)
            if "rope_theta" in rope:
                d.setdefault("rope_theta", rope.pop("rope_theta"))
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rope
        scaling = d.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            d["rope_scaling"] = {"type": kind, **scaling} if kind not in (None, "default") else None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**known, extra=extra)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` form (published spelling: ``rope_scaling`` + ``rope_theta``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d}
        d.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        _warn_keys(path, d)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ---- rules -------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        ints = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "max_position_embeddings"]
        for name in ints:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer (got {v!r})")
        for name in ["n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                     "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"]:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer (got {v!r})")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"q_lora_rank must be null or a positive integer (got {self.q_lora_rank!r})")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (rope rotates pairs)")
        need(self.num_key_value_heads == self.num_attention_heads,
             "num_key_value_heads must equal num_attention_heads (MLA has no grouped KV heads)")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (got {self.hidden_act!r})")
        need(self.scoring_func == "sigmoid",
             f"scoring_func must be 'sigmoid' (DeepSeek-V3 routing; got {self.scoring_func!r})")
        need(self.topk_method == "noaux_tc",
             f"topk_method must be 'noaux_tc' (got {self.topk_method!r})")
        need(self.moe_layer_freq == 1, "moe_layer_freq must be 1 (every layer after the dense ones is MoE)")
        need(self.rms_norm_eps > 0, "rms_norm_eps must be positive")
        need(self.rope_theta > 0, "rope_theta must be positive")
        need(not self.attention_bias, "attention_bias must be false (DeepSeek-V3 has none)")
        need(self.first_k_dense_replace <= self.num_hidden_layers,
             "first_k_dense_replace must be <= num_hidden_layers")
        if self.n_routed_experts > 0:
            e = self.n_routed_experts
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive when there are routed experts")
            need(self.n_group >= 1, "n_group must be >= 1")
            need(e % self.n_group == 0,
                 f"n_routed_experts must be divisible by n_group ({e} % {self.n_group} != 0)")
            need(e // self.n_group >= 2,
                 "n_routed_experts / n_group must be >= 2 (a group's score is the sum of its top-2 experts)")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group must be in [1, n_group={self.n_group}] (got {self.topk_group})")
            need(1 <= self.num_experts_per_tok <= (e // self.n_group) * self.topk_group,
                 "num_experts_per_tok must be in [1, topk_group * n_routed_experts / n_group] "
                 f"(got {self.num_experts_per_tok})")
        rs = self.rope_scaling
        if rs is not None:
            need(isinstance(rs, dict), "rope_scaling must be an object or null")
            need(rs.get("type") == "yarn", f"rope_scaling.type must be 'yarn' (got {rs.get('type')!r})")
            need(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1,
                 "rope_scaling.factor must be a number >= 1")
            need(isinstance(rs.get("original_max_position_embeddings"), int)
                 and rs["original_max_position_embeddings"] > 0,
                 "rope_scaling.original_max_position_embeddings must be a positive integer")
        blk = self.quantization_config
        if blk is not None:
            need(isinstance(blk, dict), "quantization_config must be an object or null")
            need(blk.get("quant_method") == "fp8",
                 f"quantization_config.quant_method must be 'fp8' (got {blk.get('quant_method')!r})")
            need(blk.get("fmt", "e4m3") == "e4m3", "quantization_config.fmt must be 'e4m3'")
            bs = blk.get("weight_block_size", [128, 128])
            need(isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs),
                 "quantization_config.weight_block_size must be two positive integers")


def _warn_keys(path: str, d: dict) -> None:
    """One warning line for a config.json whose keys look wrong (Hugging Face loads such a file
    with defaults too, so we do): keys no DeepSeek-V3 config has, core fields left out."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(k for k in d if k not in fields and k not in HF_KEYS_UNUSED)
    missing = [k for k in CORE_FIELDS if k not in d]
    parts = ([f"unknown keys ignored: {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing, DeepSeek-V3's used: {', '.join(f'{k}={getattr(ModelConfig, k)}' for k in missing)}"] if missing else [])
    if parts:
        log.warning("config %s: %s", path, "; ".join(parts))


def preset_names() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(PRESET_DIR) if n.endswith(".json"))


def load_config(name_or_path: str) -> ModelConfig:
    """A preset name (``tiny``, ``small``, ``paper``, ``deepseek-v3``), a config.json, or a
    checkpoint directory holding one."""
    if os.path.isdir(name_or_path):
        return ModelConfig.from_json(os.path.join(name_or_path, "config.json"))
    if os.path.isfile(name_or_path):
        return ModelConfig.from_json(name_or_path)
    preset = os.path.join(PRESET_DIR, name_or_path + ".json")
    if os.path.isfile(preset):
        return ModelConfig.from_json(preset)
    raise ConfigError(f"no config file or preset named {name_or_path!r} (presets: {', '.join(preset_names())})")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
