//! The Qwen2 hyper-parameters, read from GGUF metadata the way llama.cpp's
//! qwen2 loader reads them (src/llama-model.cpp, src/models/qwen2.cpp).

use crate::error::GgufError;
use crate::reader::GgufFile;

#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub n_ctx_train: usize,
    /// No `output.weight`: the LM head reuses `token_embd.weight`.
    pub tied_output: bool,
}

impl Qwen2Config {
    pub fn from_gguf(f: &GgufFile) -> Result<Qwen2Config, GgufError> {
        let path = f.path().to_path_buf();
        match f.get("general.architecture") {
            None => {
                return Err(GgufError::MissingKey {
                    path,
                    key: "general.architecture".into(),
                })
            }
            Some(v) => match v.as_str() {
                Some("qwen2") => {}
                Some(arch) => {
                    return Err(GgufError::WrongArchitecture {
                        path,
                        arch: arch.to_string(),
                    })
                }
                None => {
                    return Err(GgufError::WrongKeyType {
                        path,
                        key: "general.architecture".into(),
                        expected: "a string",
                        found: v.type_name(),
                    })
                }
            },
        }
        let int = |key: &str| -> Result<Option<usize>, GgufError> {
            match f.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
                    Some(x) => Ok(Some(x)),
                    None => Err(GgufError::WrongKeyType {
                        path: f.path().to_path_buf(),
                        key: key.into(),
                        expected: "a non-negative integer",
                        found: format!("{} {}", v.type_name(), v.summary()),
                    }),
                },
            }
        };
        let float = |key: &str| -> Result<Option<f32>, GgufError> {
            match f.get(key) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) => Ok(Some(x as f32)),
                    None => Err(GgufError::WrongKeyType {
                        path: f.path().to_path_buf(),
                        key: key.into(),
                        expected: "a number",
                        found: format!("{} {}", v.type_name(), v.summary()),
                    }),
                },
            }
        };
        let missing = |key: &str| GgufError::MissingKey {
            path: f.path().to_path_buf(),
            key: key.into(),
        };
        let req_int = |key: &str| int(key)?.ok_or_else(|| missing(key));
        let bad = |reason: String| GgufError::BadConfig {
            path: f.path().to_path_buf(),
            reason,
        };

        let n_layer = req_int("qwen2.block_count")?;
        let n_embd = req_int("qwen2.embedding_length")?;
        let n_head = req_int("qwen2.attention.head_count")?;
        let n_head_kv = int("qwen2.attention.head_count_kv")?.unwrap_or(n_head);
        let n_ff = req_int("qwen2.feed_forward_length")?;
        let rope_freq_base = float("qwen2.rope.freq_base")?.unwrap_or(10000.0);
        let rms_eps = float("qwen2.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| missing("qwen2.attention.layer_norm_rms_epsilon"))?;
        let n_ctx_train = req_int("qwen2.context_length")?;

        if n_layer == 0 {
            return Err(bad("qwen2.block_count is 0".into()));
        }
        if n_embd == 0 || n_ff == 0 {
            return Err(bad(format!(
                "embedding_length {n_embd} and feed_forward_length {n_ff} must be > 0"
            )));
        }
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(bad(format!(
                "attention.head_count {n_head} does not divide embedding_length {n_embd}"
            )));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(bad(format!(
                "attention.head_count_kv {n_head_kv} does not divide attention.head_count {n_head}"
            )));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(bad(format!(
                "attention.layer_norm_rms_epsilon {rms_eps} must be a positive number"
            )));
        }
        if !(rope_freq_base.is_finite() && rope_freq_base > 0.0) {
            return Err(bad(format!(
                "rope.freq_base {rope_freq_base} must be a positive number"
            )));
        }

        let embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::TensorNotFound {
                path: f.path().to_path_buf(),
                name: "token_embd.weight".into(),
            })?;
        if embd.dims.len() != 2 || embd.dims[0] != n_embd as u64 {
            return Err(bad(format!(
                "token_embd.weight has dims {:?}, expected [{n_embd}, n_vocab]",
                embd.dims
            )));
        }
        let n_vocab = usize::try_from(embd.dims[1])
            .map_err(|_| bad(format!("vocabulary {} too large", embd.dims[1])))?;

        Ok(Qwen2Config {
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim: n_embd / n_head,
            n_ff,
            n_vocab,
            rope_freq_base,
            rms_eps,
            n_ctx_train,
            tied_output: f.tensor("output.weight").is_none(),
        })
    }
}
