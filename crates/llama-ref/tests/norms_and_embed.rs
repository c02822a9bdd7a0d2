//! Real model: the norm stages are RMSNorm of the stage before them times the
//! GGUF norm weight, and the embed stage is the token's row of token_embd
//! (both weights read and dequantized by our gguf crate).

mod common;

use common::{get, rms_norm, worst, PROMPT};
use capture::stage::Stage;
use llama_ref::{KvType, LlamaRef, RefOptions};

#[test]
fn norms_are_rmsnorm_times_the_gguf_weight_and_embed_is_the_token_row() {
    let path = real_model_or_skip!();
    let file = gguf::GgufFile::open(&path).unwrap();
    let eps = file.get_f64("qwen2.attention.layer_norm_rms_epsilon").unwrap();
    let weight = |name: &str| -> Vec<f32> {
        let info = file.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
        gguf::dequant::dequantize(info.ggml_type, file.tensor_data(info), info.n_elements as usize).unwrap()
    };
    let llama = LlamaRef::load(&path).unwrap();
    let tokens = llama.tokenize(PROMPT, false).unwrap();
    let c = llama.run(&tokens, 2, &RefOptions { kv_type: KvType::F32, ..RefOptions::default() }).unwrap();
    let n_layer = c.config.n_layer;
    let n_embd = c.config.n_embd;
    // ggml: sum of squares in double, scale = 1/sqrtf(mean + eps) in f32,
    // x*scale then *w in f32: a few ulp; 4e-6 relative + 1e-6 absolute.
    let (atol, rtol) = (1e-6, 4e-6);
    let mut worst_seen = 0f32;
    for step in 0..=2 {
        for l in 0..n_layer {
            let input = if l == 0 { get(&c, step, None, Stage::Embed) } else { get(&c, step, Some(l - 1), Stage::LayerOut) };
            let expect = rms_norm(input, &weight(&format!("blk.{l}.attn_norm.weight")), eps);
            let (w, i) = worst(&get(&c, step, Some(l), Stage::AttnNorm).data, &expect, atol, rtol);
            assert!(w <= 1.0, "attn_norm step {step} layer {l} element {i}");
            worst_seen = worst_seen.max(w);
            let expect = rms_norm(get(&c, step, Some(l), Stage::AttnResidual), &weight(&format!("blk.{l}.ffn_norm.weight")), eps);
            let (w, i) = worst(&get(&c, step, Some(l), Stage::FfnNorm).data, &expect, atol, rtol);
            assert!(w <= 1.0, "ffn_norm step {step} layer {l} element {i}");
        }
        let expect = rms_norm(get(&c, step, Some(n_layer - 1), Stage::LayerOut), &weight("output_norm.weight"), eps);
        let (w, i) = worst(&get(&c, step, None, Stage::FinalNorm).data, &expect, atol, rtol);
        assert!(w <= 1.0, "final_norm step {step} element {i}");
    }
    println!("worst attn_norm error / tolerance: {worst_seen}");

    // embed: GET_ROWS dequantizes with ggml's to_float, which our gguf
    // dequantization matches bit for bit; decode step k embeds generated[k-1]
    let embd = weight("token_embd.weight");
    for step in 0..=2 {
        let inputs: Vec<i32> = if step == 0 { c.tokens.clone() } else { vec![c.generated[step - 1]] };
        let e = get(&c, step, None, Stage::Embed);
        for (t, &tok) in inputs.iter().enumerate() {
            let row = &embd[tok as usize * n_embd..][..n_embd];
            let got = &e.data[t * n_embd..][..n_embd];
            assert!(row.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()), "embed step {step} token {t} ({tok})");
        }
    }
}
