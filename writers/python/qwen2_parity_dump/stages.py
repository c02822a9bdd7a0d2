"""The stage catalogue's names and canonical layouts.

A copy of what crates/capture/src/stage.rs (``CATALOGUE``) says, in its
execution order. crates/parity/tests/writers.rs reads this table from this
file and compares it with the Rust catalogue, so a stage added or changed
there fails that test until it is changed here (and in
writers/cpp/qwen2_parity_dump.hpp) too.
"""

from dataclasses import dataclass

# (name, layout, scope): scope "global" is written once per step with no
# layer; "layer" once per step and layer.
STAGES = (
    ("embed", "hidden", "global"),
    ("attn_norm", "hidden", "layer"),
    ("q_proj", "q_heads", "layer"),
    ("k_proj", "kv_heads", "layer"),
    ("v_proj", "kv_heads", "layer"),
    ("q_rope", "q_heads", "layer"),
    ("k_rope", "kv_heads", "layer"),
    ("attn_scores", "attention", "layer"),
    ("attn_probs", "attention", "layer"),
    ("attn_ctx", "q_heads", "layer"),
    ("attn_out", "hidden", "layer"),
    ("attn_residual", "hidden", "layer"),
    ("ffn_norm", "hidden", "layer"),
    ("ffn_gate", "ffn", "layer"),
    ("ffn_up", "ffn", "layer"),
    ("ffn_act", "ffn", "layer"),
    ("ffn_down", "hidden", "layer"),
    ("layer_out", "hidden", "layer"),
    ("final_norm", "hidden", "global"),
    ("logits", "vocab", "global"),
)

LAYOUT = {name: layout for name, layout, _ in STAGES}
IS_GLOBAL = {name: scope == "global" for name, _, scope in STAGES}

# What each axis of a layout indexes, outermost first (for error messages).
AXES = {
    "hidden": ("token", "dim"),
    "q_heads": ("token", "head", "dim"),
    "kv_heads": ("token", "head", "dim"),
    "attention": ("head", "query", "key"),
    "ffn": ("token", "unit"),
    "vocab": ("token", "vocab"),
}


@dataclass(frozen=True)
class Dims:
    """The model dimensions the canonical layouts are built from."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int

    def __post_init__(self):
        for field, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Dims.{field} must be a positive integer, got {value!r}")


def canonical_shape(stage, dims, n_tokens, n_kv):
    """The shape `stage` must have in a pass of `n_tokens` tokens that leaves
    `n_kv` positions in the KV cache."""
    layout = LAYOUT[stage]
    return {
        "hidden": (n_tokens, dims.n_embd),
        "q_heads": (n_tokens, dims.n_head, dims.head_dim),
        "kv_heads": (n_tokens, dims.n_head_kv, dims.head_dim),
        "attention": (dims.n_head, n_tokens, n_kv),
        "ffn": (n_tokens, dims.n_ff),
        "vocab": (n_tokens, dims.n_vocab),
    }[layout]
