//! Tiny synthetic Qwen2 models that llama.cpp loads: the tensor set of
//! llama.cpp's qwen2 loader (src/models/qwen2.cpp), every qwen2.* key it
//! reads, and a small byte-level BPE tokenizer (gpt2 model, qwen2
//! pre-tokenizer) trained on a built-in text so its merges are real.
//! Weights are deterministic (ChaCha8 seeded by `SynthSpec::seed`).

use crate::error::GgufError;
use crate::reader::MetadataValue as V;
use crate::types::GgmlType;
use crate::writer::GgufWriter;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    /// Total tokens: 256 byte symbols + merges + the special tokens.
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub tied_output: bool,
    /// Type of the matrices (F32 or F16); norms and biases are always F32.
    pub weight_type: GgmlType,
    pub seed: u64,
    /// A token whose embedding carries a massive activation (as Qwen2's
    /// first tokens do): its first 4 dims are scaled by 1000, so its row of
    /// the residual stream is three orders of magnitude above the others.
    pub massive_token: Option<u32>,
}

impl SynthSpec {
    /// 2 layers, n_embd 64, 4 heads / 2 KV heads (head_dim 16), n_ff 128,
    /// 320 tokens, context 256, untied, F32, seed 42.
    pub fn tiny() -> SynthSpec {
        SynthSpec {
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_vocab: 320,
            n_ctx: 256,
            tied_output: false,
            weight_type: GgmlType::F32,
            seed: 42,
            massive_token: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    fn validate(&self) -> Result<(), GgufError> {
        let bad = |reason: String| Err(GgufError::BadSynthSpec { reason });
        if self.n_layer == 0 || self.n_embd == 0 || self.n_ff == 0 || self.n_ctx == 0 {
            return bad(format!(
                "n_layer {}, n_embd {}, n_ff {}, n_ctx {} must all be > 0",
                self.n_layer, self.n_embd, self.n_ff, self.n_ctx
            ));
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_head {} does not divide n_embd {}",
                self.n_head, self.n_embd
            ));
        }
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "n_head_kv {} does not divide n_head {}",
                self.n_head_kv, self.n_head
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let min_vocab = 256 + SPECIALS.len();
        if self.n_vocab < min_vocab {
            return bad(format!(
                "n_vocab {} is below the {min_vocab} byte and special tokens",
                self.n_vocab
            ));
        }
        if i32::try_from(self.n_vocab).is_err() {
            return bad(format!(
                "n_vocab {} does not fit llama.cpp's int32 token ids",
                self.n_vocab
            ));
        }
        if !matches!(self.weight_type, GgmlType::F32 | GgmlType::F16) {
            return bad(format!(
                "weight_type {} (only F32 and F16 are generated)",
                self.weight_type
            ));
        }
        Ok(())
    }
}

/// Special tokens, appended after the BPE vocabulary (as in Qwen2).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const CORPUS: &str = "The quick brown fox jumps over the lazy dog. \
A parity tool runs two implementations of the same model on the same prompt and compares every \
intermediate tensor, layer by layer, to find the first place where they diverge. \
fn main() { let x = vec![1, 2, 3]; for i in 0..x.len() { println!(\"{}\", x[i]); } } \
def add(a, b):\n    return a + b\n\nclass Model:\n    def __init__(self, config):\n        self.config = config\n\
The attention of the model is computed from the queries, the keys and the values; the \
feed forward network applies a gate and an up projection, then a down projection. \
int main(void) { int total = 0; for (int i = 0; i < 10; i++) { total += i; } return total; } \
Hello world! Hello there, how are you today? I am fine, thank you. \
import numpy as np\nresult = np.zeros((4, 4))\nprint(result.shape)\n";

/// GPT-2's byte-to-unicode map: the symbol of each byte, in token order
/// (printable bytes first, then the rest mapped to U+0100...).
pub fn byte_symbols() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let set: HashSet<u32> = printable.iter().copied().collect();
    let mut out: Vec<(u8, char)> = printable
        .iter()
        .map(|&b| (b as u8, char::from_u32(b).unwrap_or('?')))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !set.contains(&b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// A byte-level BPE vocabulary of `n_normal` tokens (256 byte symbols first)
/// and its merges, trained greedily on [`CORPUS`] and, once the corpus is
/// exhausted, extended with merges of existing token pairs.
pub fn train_bpe(n_normal: usize) -> (Vec<String>, Vec<String>) {
    let syms = byte_symbols();
    let mut byte_map = [' '; 256];
    for &(b, c) in &syms {
        byte_map[b as usize] = c;
    }
    let mut tokens: Vec<String> = syms.iter().map(|&(_, c)| c.to_string()).collect();
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges: Vec<String> = Vec::new();

    // Pre-tokenize like GPT-2: a space attaches to the following word.
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    let mut cur = String::new();
    for ch in CORPUS.chars() {
        let boundary = ch == ' ' || ch == '\n' || (!ch.is_alphanumeric() && !cur.is_empty());
        if boundary && !cur.is_empty() && !(cur == " " && ch != ' ') {
            let w: Vec<String> = cur
                .bytes()
                .map(|b| byte_map[b as usize].to_string())
                .collect();
            *words.entry(w).or_default() += 1;
            cur.clear();
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        let w: Vec<String> = cur
            .bytes()
            .map(|b| byte_map[b as usize].to_string())
            .collect();
        *words.entry(w).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    words.sort();

    while tokens.len() < n_normal {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += n;
            }
        }
        // Most frequent pair; ties broken by the pair itself (deterministic).
        let best = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        let Some(((a, b), _)) = best else { break };
        let merged = format!("{a}{b}");
        merges.push(format!("{a} {b}"));
        if known.insert(merged.clone()) {
            tokens.push(merged.clone());
        }
        for (w, _) in words.iter_mut() {
            let mut i = 0;
            let mut out = Vec::with_capacity(w.len());
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
            *w = out;
        }
    }
    // Corpus exhausted: merge pairs of existing tokens, in order.
    let mut i = 0;
    'outer: while tokens.len() < n_normal {
        let left = tokens[i % tokens.len()].clone();
        for j in 0..tokens.len() {
            if tokens.len() >= n_normal {
                break 'outer;
            }
            let merged = format!("{left}{}", tokens[j]);
            if known.insert(merged.clone()) {
                merges.push(format!("{left} {}", tokens[j]));
                tokens.push(merged);
                break;
            }
        }
        i += 1;
    }
    (tokens, merges)
}

struct Gen {
    rng: ChaCha8Rng,
}

impl Gen {
    /// Standard normal via Box-Muller.
    fn normal(&mut self) -> f32 {
        let u1: f64 = self.rng.gen::<f64>().max(1e-12);
        let u2: f64 = self.rng.gen::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn values(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

fn encode(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Write a synthetic Qwen2 GGUF for `spec` to `path`.
pub fn write_tiny_qwen2(spec: &SynthSpec, path: &Path) -> Result<(), GgufError> {
    build_tiny_qwen2(spec)?.write(path)
}

/// The writer holding the synthetic model (for callers that add to it).
pub fn build_tiny_qwen2(spec: &SynthSpec) -> Result<GgufWriter, GgufError> {
    spec.validate()?;
    let mut w = GgufWriter::new();
    let hd = spec.head_dim();
    let n_embd_kv = hd * spec.n_head_kv;
    let u32_of = |x: usize, what: &str| {
        u32::try_from(x).map_err(|_| GgufError::BadSynthSpec {
            reason: format!("{what} {x} does not fit in u32"),
        })
    };

    w.add("general.architecture", V::String("qwen2".into()));
    w.add("general.type", V::String("model".into()));
    w.add(
        "general.name",
        V::String(format!(
            "synthetic-qwen2-{}l-{}d-seed{}",
            spec.n_layer, spec.n_embd, spec.seed
        )),
    );
    w.add(
        "general.file_type",
        V::U32(if spec.weight_type == GgmlType::F16 {
            1
        } else {
            0
        }),
    );
    w.add(
        "qwen2.block_count",
        V::U32(u32_of(spec.n_layer, "n_layer")?),
    );
    w.add("qwen2.context_length", V::U32(u32_of(spec.n_ctx, "n_ctx")?));
    w.add(
        "qwen2.embedding_length",
        V::U32(u32_of(spec.n_embd, "n_embd")?),
    );
    w.add(
        "qwen2.feed_forward_length",
        V::U32(u32_of(spec.n_ff, "n_ff")?),
    );
    w.add(
        "qwen2.attention.head_count",
        V::U32(u32_of(spec.n_head, "n_head")?),
    );
    w.add(
        "qwen2.attention.head_count_kv",
        V::U32(u32_of(spec.n_head_kv, "n_head_kv")?),
    );
    w.add("qwen2.rope.freq_base", V::F32(1_000_000.0));
    w.add("qwen2.attention.layer_norm_rms_epsilon", V::F32(1e-6));

    // Tokenizer: byte-level BPE + specials at the end.
    let (mut tokens, merges) = train_bpe(spec.n_vocab - SPECIALS.len());
    let mut types = vec![V::I32(1); tokens.len()];
    let first_special = tokens.len();
    for s in SPECIALS {
        tokens.push(s.to_string());
        types.push(V::I32(3));
    }
    let id = |k: usize| V::U32((first_special + k) as u32);
    w.add("tokenizer.ggml.model", V::String("gpt2".into()));
    w.add("tokenizer.ggml.pre", V::String("qwen2".into()));
    w.add(
        "tokenizer.ggml.tokens",
        V::Array(tokens.into_iter().map(V::String).collect()),
    );
    w.add("tokenizer.ggml.token_type", V::Array(types));
    w.add(
        "tokenizer.ggml.merges",
        V::Array(merges.into_iter().map(V::String).collect()),
    );
    w.add("tokenizer.ggml.eos_token_id", id(2));
    w.add("tokenizer.ggml.padding_token_id", id(0));
    w.add("tokenizer.ggml.bos_token_id", id(0));
    w.add("tokenizer.ggml.add_bos_token", V::Bool(false));
    w.add("tokenizer.chat_template", V::String(CHAT_TEMPLATE.into()));

    // Weights: matrices std ~ 0.5/sqrt(fan_in) clamped to [0.02, 0.1], so
    // activations stay O(1); norms near 1; biases small.
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(spec.seed),
    };
    let wt = spec.weight_type;
    let matrix = |w: &mut GgufWriter,
                  g: &mut Gen,
                  name: String,
                  fan_in: usize,
                  fan_out: usize,
                  ty: GgmlType| {
        let std = (0.5 / (fan_in as f32).sqrt()).clamp(0.02, 0.1);
        let v = g.values(fan_in * fan_out, 0.0, std);
        w.add_tensor(
            name,
            vec![fan_in as u64, fan_out as u64],
            ty,
            encode(ty, &v),
        )
    };
    let vector = |w: &mut GgufWriter, g: &mut Gen, name: String, n: usize, mean: f32, std: f32| {
        let v = g.values(n, mean, std);
        w.add_tensor(
            name,
            vec![n as u64],
            GgmlType::F32,
            encode(GgmlType::F32, &v),
        )
    };

    {
        // The same distribution `matrix` draws (the massive row aside).
        let std = (0.5 / (spec.n_embd as f32).sqrt()).clamp(0.02, 0.1);
        let mut v = g.values(spec.n_embd * spec.n_vocab, 0.0, std);
        if let Some(t) = spec.massive_token {
            let row = (t as usize).min(spec.n_vocab - 1) * spec.n_embd;
            v[row..row + 4.min(spec.n_embd)].iter_mut().for_each(|x| *x *= 1000.0);
        }
        w.add_tensor("token_embd.weight", vec![spec.n_embd as u64, spec.n_vocab as u64], wt, encode(wt, &v))?;
    }
    for l in 0..spec.n_layer {
        let b = format!("blk.{l}");
        vector(
            &mut w,
            &mut g,
            format!("{b}.attn_norm.weight"),
            spec.n_embd,
            1.0,
            0.05,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.attn_q.weight"),
            spec.n_embd,
            spec.n_embd,
            wt,
        )?;
        vector(
            &mut w,
            &mut g,
            format!("{b}.attn_q.bias"),
            spec.n_embd,
            0.0,
            0.02,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.attn_k.weight"),
            spec.n_embd,
            n_embd_kv,
            wt,
        )?;
        vector(
            &mut w,
            &mut g,
            format!("{b}.attn_k.bias"),
            n_embd_kv,
            0.0,
            0.02,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.attn_v.weight"),
            spec.n_embd,
            n_embd_kv,
            wt,
        )?;
        vector(
            &mut w,
            &mut g,
            format!("{b}.attn_v.bias"),
            n_embd_kv,
            0.0,
            0.02,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.attn_output.weight"),
            spec.n_embd,
            spec.n_embd,
            wt,
        )?;
        vector(
            &mut w,
            &mut g,
            format!("{b}.ffn_norm.weight"),
            spec.n_embd,
            1.0,
            0.05,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.ffn_gate.weight"),
            spec.n_embd,
            spec.n_ff,
            wt,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.ffn_up.weight"),
            spec.n_embd,
            spec.n_ff,
            wt,
        )?;
        matrix(
            &mut w,
            &mut g,
            format!("{b}.ffn_down.weight"),
            spec.n_ff,
            spec.n_embd,
            wt,
        )?;
    }
    vector(
        &mut w,
        &mut g,
        "output_norm.weight".into(),
        spec.n_embd,
        1.0,
        0.05,
    )?;
    if !spec.tied_output {
        matrix(
            &mut w,
            &mut g,
            "output.weight".into(),
            spec.n_embd,
            spec.n_vocab,
            wt,
        )?;
    }
    Ok(w)
}
