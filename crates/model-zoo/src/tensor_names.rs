//! The logical tensors of a Llama-family decoder ([`TensorRole`]) and their names in each
//! file convention ([`Naming`]): llama.cpp's GGUF names and Hugging Face's. Loading, conversion
//! and the random models all name tensors through here, so the two conventions stay one table.

/// The logical tensors of a Llama-family decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Token embedding `[vocab, hidden]`.
    Embedding,
    /// Final RMSNorm weight.
    OutputNorm,
    /// LM head `[vocab, hidden]` (absent when tied).
    LmHead,
    /// Pre-attention RMSNorm.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Pre-FFN RMSNorm.
    FfnNorm,
    /// FFN gate projection.
    Gate,
    /// FFN up projection.
    Up,
    /// FFN down projection.
    Down,
}

/// Tensor naming conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// llama.cpp's GGUF names (`blk.N.attn_q.weight`).
    Gguf,
    /// Hugging Face names (`model.layers.N.self_attn.q_proj.weight`).
    HuggingFace,
}

impl TensorRole {
    /// The weight's name in a convention (`layer` ignored for global tensors).
    pub fn name(self, naming: Naming, layer: usize) -> String {
        self.name_with_suffix(naming, layer, "weight")
    }

    /// The bias's name in a convention.
    pub fn bias_name(self, naming: Naming, layer: usize) -> String {
        self.name_with_suffix(naming, layer, "bias")
    }

    fn name_with_suffix(self, naming: Naming, layer: usize, suffix: &str) -> String {
        use TensorRole::*;
        match naming {
            Naming::Gguf => match self {
                Embedding => format!("token_embd.{suffix}"),
                OutputNorm => format!("output_norm.{suffix}"),
                LmHead => format!("output.{suffix}"),
                AttnNorm => format!("blk.{layer}.attn_norm.{suffix}"),
                Q => format!("blk.{layer}.attn_q.{suffix}"),
                K => format!("blk.{layer}.attn_k.{suffix}"),
                V => format!("blk.{layer}.attn_v.{suffix}"),
                O => format!("blk.{layer}.attn_output.{suffix}"),
                FfnNorm => format!("blk.{layer}.ffn_norm.{suffix}"),
                Gate => format!("blk.{layer}.ffn_gate.{suffix}"),
                Up => format!("blk.{layer}.ffn_up.{suffix}"),
                Down => format!("blk.{layer}.ffn_down.{suffix}"),
            },
            Naming::HuggingFace => match self {
                Embedding => format!("model.embed_tokens.{suffix}"),
                OutputNorm => format!("model.norm.{suffix}"),
                LmHead => format!("lm_head.{suffix}"),
                AttnNorm => format!("model.layers.{layer}.input_layernorm.{suffix}"),
                Q => format!("model.layers.{layer}.self_attn.q_proj.{suffix}"),
                K => format!("model.layers.{layer}.self_attn.k_proj.{suffix}"),
                V => format!("model.layers.{layer}.self_attn.v_proj.{suffix}"),
                O => format!("model.layers.{layer}.self_attn.o_proj.{suffix}"),
                FfnNorm => format!("model.layers.{layer}.post_attention_layernorm.{suffix}"),
                Gate => format!("model.layers.{layer}.mlp.gate_proj.{suffix}"),
                Up => format!("model.layers.{layer}.mlp.up_proj.{suffix}"),
                Down => format!("model.layers.{layer}.mlp.down_proj.{suffix}"),
            },
        }
    }
}
