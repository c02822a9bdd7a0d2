//! The eval-callback capture: which ggml node is which stage (one table),
//! and the conversion of a node's data to the stage's canonical layout.

use capture::{CapturedTensor, Dims, Stage, StageId, Tensor};
use llama_cpp_sys_2 as sys;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// How a rule constrains the node's own name.
#[derive(Clone, Copy, Debug)]
enum NamePat {
    /// Any name (llama.cpp leaves the node unnamed: `node_N`).
    Any,
    /// `{base}-{layer}`, the name `cb(cur, base, il)` gives a per-layer node.
    Layer(&'static str),
    /// An exact global name (`cb(cur, name, -1)`).
    Global(&'static str),
}

/// How a rule constrains one source of the node.
#[derive(Clone, Copy, Debug)]
enum SrcPat {
    Any,
    /// `src[i]` is the model weight `blk.{layer}.{suffix}` (per-layer stages)
    /// or `{suffix}` (global stages).
    Weight(usize, &'static str),
    /// `src[i]` was produced by this op.
    Op(usize, sys::ggml_op),
}

/// One row of the mapping: a node is `stage` when its op, name and source
/// all match. Where several nodes map to one stage (the projection MUL_MAT,
/// then its bias ADD), the highest `rank` seen wins.
#[derive(Clone, Copy, Debug)]
struct Rule {
    stage: Stage,
    op: sys::ggml_op,
    name: NamePat,
    src: SrcPat,
    rank: u8,
}

const fn rule(stage: Stage, op: sys::ggml_op, name: NamePat, src: SrcPat, rank: u8) -> Rule {
    Rule { stage, op, name, src, rank }
}

use NamePat::{Any as AnyName, Global, Layer};
use SrcPat::{Any as AnySrc, Op, Weight};

/// The whole mapping of llama.cpp's Qwen2 graph (llama-cpp-sys-2 0.1.161,
/// `src/models/qwen2.cpp`, `llm_graph_context::build_{qkv,attn,attn_mha,ffn}`)
/// onto the stage catalogue.
const RULES: &[Rule] = &[
    // `embd` (inputs `token_embd.weight`, `inp_tokens`); an unnamed twin on `inp_mixed_tokens` also runs
    rule(Stage::Embed, sys::GGML_OP_GET_ROWS, Global("embd"), Weight(0, "token_embd.weight"), 0),
    rule(Stage::AttnNorm, sys::GGML_OP_MUL, Layer("attn_norm"), Weight(1, "attn_norm.weight"), 0),
    rule(Stage::QProj, sys::GGML_OP_MUL_MAT, Layer("Qcur"), Weight(0, "attn_q.weight"), 0),
    rule(Stage::QProj, sys::GGML_OP_ADD, Layer("Qcur"), Weight(1, "attn_q.bias"), 1),
    rule(Stage::KProj, sys::GGML_OP_MUL_MAT, Layer("Kcur"), Weight(0, "attn_k.weight"), 0),
    rule(Stage::KProj, sys::GGML_OP_ADD, Layer("Kcur"), Weight(1, "attn_k.bias"), 1),
    rule(Stage::VProj, sys::GGML_OP_MUL_MAT, Layer("Vcur"), Weight(0, "attn_v.weight"), 0),
    rule(Stage::VProj, sys::GGML_OP_ADD, Layer("Vcur"), Weight(1, "attn_v.bias"), 1),
    rule(Stage::QRope, sys::GGML_OP_ROPE, Layer("Qcur"), Op(0, sys::GGML_OP_RESHAPE), 0),
    rule(Stage::KRope, sys::GGML_OP_ROPE, Layer("Kcur"), Op(0, sys::GGML_OP_RESHAPE), 0),
    rule(Stage::AttnScores, sys::GGML_OP_MUL_MAT, Layer("kq"), Op(1, sys::GGML_OP_PERMUTE), 0),
    rule(Stage::AttnProbs, sys::GGML_OP_SOFT_MAX, Layer("kq_soft_max"), Op(0, sys::GGML_OP_MUL_MAT), 0),
    // explicit attention: cont_2d of the permuted kqv; flash attention: a
    // reshape of the FLASH_ATTN_EXT result
    rule(Stage::AttnCtx, sys::GGML_OP_CONT, Layer("kqv_out"), Op(0, sys::GGML_OP_PERMUTE), 0),
    rule(Stage::AttnCtx, sys::GGML_OP_RESHAPE, Layer("kqv_out"), Op(0, sys::GGML_OP_FLASH_ATTN_EXT), 0),
    rule(Stage::AttnOut, sys::GGML_OP_MUL_MAT, AnyName, Weight(0, "attn_output.weight"), 0),
    rule(Stage::AttnResidual, sys::GGML_OP_ADD, Layer("ffn_inp"), AnySrc, 0),
    rule(Stage::FfnNorm, sys::GGML_OP_MUL, Layer("ffn_norm"), Weight(1, "ffn_norm.weight"), 0),
    rule(Stage::FfnGate, sys::GGML_OP_MUL_MAT, Layer("ffn_gate"), Weight(0, "ffn_gate.weight"), 0),
    rule(Stage::FfnUp, sys::GGML_OP_MUL_MAT, Layer("ffn_up"), Weight(0, "ffn_up.weight"), 0),
    rule(Stage::FfnAct, sys::GGML_OP_GLU, Layer("ffn_swiglu"), AnySrc, 0),
    rule(Stage::FfnDown, sys::GGML_OP_MUL_MAT, AnyName, Weight(0, "ffn_down.weight"), 0),
    rule(Stage::LayerOut, sys::GGML_OP_ADD, Layer("l_out"), AnySrc, 0),
    rule(Stage::FinalNorm, sys::GGML_OP_MUL, Global("result_norm"), Weight(1, "output_norm.weight"), 0),
    rule(Stage::Logits, sys::GGML_OP_MUL_MAT, Global("result_output"), Weight(0, "output.weight"), 0),
    // tied embeddings: the LM head is token_embd
    rule(Stage::Logits, sys::GGML_OP_MUL_MAT, Global("result_output"), Weight(0, "token_embd.weight"), 0),
];

/// What the mapping needs to know about a node, copied out of the C struct.
#[derive(Clone, Debug)]
pub(crate) struct NodeInfo {
    name: String,
    op: sys::ggml_op,
    ty: sys::ggml_type,
    ne: [i64; 4],
    srcs: [Option<(String, sys::ggml_op)>; 3],
}

fn c_name(raw: &[std::os::raw::c_char; 64]) -> String {
    let bytes: Vec<u8> = raw.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl NodeInfo {
    /// # Safety
    /// `t` must point to a live `ggml_tensor` whose `src` pointers are null
    /// or point to live tensors (true for every node ggml hands the callback).
    unsafe fn read(t: *const sys::ggml_tensor) -> NodeInfo {
        // SAFETY: the caller guarantees `t` is a live tensor.
        let tensor = unsafe { &*t };
        let mut srcs: [Option<(String, sys::ggml_op)>; 3] = [None, None, None];
        for (i, slot) in srcs.iter_mut().enumerate() {
            let s = tensor.src[i];
            if !s.is_null() {
                // SAFETY: non-null sources of a graph node are live tensors of the same graph.
                let src = unsafe { &*s };
                *slot = Some((c_name(&src.name), src.op));
            }
        }
        NodeInfo { name: c_name(&tensor.name), op: tensor.op, ty: tensor.type_, ne: tensor.ne, srcs }
    }

    fn describe(&self) -> String {
        let srcs: Vec<String> = self
            .srcs
            .iter()
            .flatten()
            .map(|(n, op)| format!("{n}:{}", op_name(*op)))
            .collect();
        format!(
            "{} {} {} ne={:?} <- [{}]",
            self.name,
            op_name(self.op),
            type_name(self.ty),
            self.ne,
            srcs.join(", ")
        )
    }
}

pub(crate) fn op_name(op: sys::ggml_op) -> String {
    if op >= sys::GGML_OP_COUNT {
        return format!("op{op}");
    }
    // SAFETY: `op` is a valid ggml_op (checked above); ggml_op_name returns a
    // pointer to a static NUL-terminated string.
    let p = unsafe { sys::ggml_op_name(op) };
    if p.is_null() {
        return format!("op{op}");
    }
    // SAFETY: non-null, static, NUL-terminated (see above).
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

pub(crate) fn type_name(ty: sys::ggml_type) -> String {
    if ty >= sys::GGML_TYPE_COUNT {
        return format!("type{ty}");
    }
    // SAFETY: `ty` is below GGML_TYPE_COUNT; ggml_type_name returns a static string (or null for removed types).
    let p = unsafe { sys::ggml_type_name(ty) };
    if p.is_null() {
        return format!("type{ty}");
    }
    // SAFETY: non-null static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `"attn_norm-12"` -> `("attn_norm", Some(12))`; names without a layer suffix -> `(name, None)`.
fn split_layer(name: &str) -> (&str, Option<usize>) {
    match name.rsplit_once('-') {
        Some((base, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => (base, l.parse().ok()),
        _ => (name, None),
    }
}

/// `"blk.3.attn_q.weight"` -> `(Some(3), "attn_q.weight")`; `"output.weight"` -> `(None, "output.weight")`.
fn split_weight(name: &str) -> (Option<usize>, &str) {
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some((l, suffix)) = rest.split_once('.') {
            if let Ok(l) = l.parse() {
                return (Some(l), suffix);
            }
        }
    }
    (None, name)
}

/// The stage, layer and rank of a node, if the table maps it.
fn classify(node: &NodeInfo) -> Option<(Stage, Option<usize>, u8)> {
    'rules: for r in RULES {
        if node.op != r.op {
            continue;
        }
        let mut layer = None;
        match r.name {
            NamePat::Any => {}
            NamePat::Layer(base) => {
                let (b, l) = split_layer(&node.name);
                if b != base || l.is_none() {
                    continue;
                }
                layer = l;
            }
            NamePat::Global(n) => {
                if node.name != n {
                    continue;
                }
            }
        }
        match r.src {
            SrcPat::Any => {}
            SrcPat::Weight(i, suffix) => {
                let Some((src_name, _)) = &node.srcs[i] else { continue };
                let (wl, ws) = split_weight(src_name);
                if ws != suffix {
                    continue;
                }
                if r.stage.is_global() {
                    if wl.is_some() {
                        continue;
                    }
                } else {
                    match (layer, wl) {
                        (_, None) => continue 'rules,
                        (Some(a), Some(b)) if a != b => continue 'rules,
                        (_, Some(b)) => layer = Some(b),
                    }
                }
            }
            SrcPat::Op(i, op) => match &node.srcs[i] {
                Some((_, src_op)) if *src_op == op => {}
                _ => continue,
            },
        }
        if r.stage.is_global() != layer.is_none() {
            continue;
        }
        return Some((r.stage, layer, r.rank));
    }
    None
}

/// The capture state the callback writes into; owned by `LlamaRef::run`.
pub(crate) struct Hook {
    dims: Dims,
    layer_wanted: Vec<bool>,
    /// Layers of which only `layer_out` is wanted (a layer that only feeds
    /// the next: the input of a teacher-forced layer or of the final norm).
    out_only: Vec<bool>,
    /// End each pass after this layer: nothing past it is computed (no
    /// final norm, no logits).
    stop_after: Option<usize>,
    /// The first node past `stop_after` was reached in this pass.
    stopping: bool,
    /// Current forward pass: step index, cache positions filled before it, tokens in it.
    pub step: usize,
    pub n_past: usize,
    pub n_tokens: usize,
    pub tensors: BTreeMap<StageId, (u8, CapturedTensor)>,
    /// The first thing that went wrong inside the callback.
    pub error: Option<String>,
    log_nodes: bool,
}

impl Hook {
    pub fn new(dims: Dims, layers: &[usize], layer_out_only: &[usize], stop_after: Option<usize>) -> Hook {
        let flags = |ls: &[usize]| {
            let mut v = vec![false; dims.n_layer];
            for &l in ls {
                if let Some(w) = v.get_mut(l) {
                    *w = true;
                }
            }
            v
        };
        Hook {
            dims,
            layer_wanted: flags(layers),
            out_only: flags(layer_out_only),
            stop_after,
            stopping: false,
            step: 0,
            n_past: 0,
            n_tokens: 0,
            tensors: BTreeMap::new(),
            error: None,
            log_nodes: std::env::var_os("PARITY_LLAMA_NODES").is_some(),
        }
    }

    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(msg);
        }
    }

    fn wanted(&self, stage: Stage, layer: Option<usize>) -> bool {
        match layer {
            None => stage.is_global(),
            Some(l) => {
                self.layer_wanted.get(l).copied().unwrap_or(false)
                    && (stage == Stage::LayerOut || !self.out_only.get(l).copied().unwrap_or(false))
            }
        }
    }

    fn ask(&mut self, node: &NodeInfo) -> bool {
        if self.log_nodes {
            eprintln!("[step {}] {}", self.step, node.describe());
        }
        if self.error.is_some() {
            return false;
        }
        match classify(node) {
            // The first stage of a layer past the last one asked: every node
            // before it in the graph (the last layer's output among them)
            // has been computed; its data phase ends the pass.
            Some((_, Some(l), _)) if self.stop_after.is_some_and(|last| l > last) => {
                self.stopping = true;
                true
            }
            Some((stage, layer, _)) => self.wanted(stage, layer),
            None => false,
        }
    }

    /// Whether the pass goes on after the node just observed.
    fn keep_computing(&mut self) -> bool {
        !std::mem::take(&mut self.stopping)
    }

    /// # Safety
    /// `t` must be the live, computed node the scheduler passes with `ask == false`.
    unsafe fn observe(&mut self, t: *mut sys::ggml_tensor, node: &NodeInfo) {
        if self.error.is_some() {
            return;
        }
        let Some((stage, layer, rank)) = classify(node) else { return };
        if !self.wanted(stage, layer) {
            return;
        }
        let id = StageId { step: self.step, layer, stage };
        if let Some((existing, _)) = self.tensors.get(&id) {
            if *existing > rank {
                return;
            }
            if *existing == rank {
                self.fail(format!("two ggml nodes map to {id}: the second is {}", node.describe()));
                return;
            }
        }
        // SAFETY: forwarded from the caller's guarantee.
        let raw = match unsafe { read_f32(t) } {
            Ok(v) => v,
            Err(e) => return self.fail(format!("{id}: {} ({})", e, node.describe())),
        };
        match canonicalize(stage, &self.dims, self.n_tokens, self.n_past, node.ne, raw) {
            Ok(tensor) => {
                let provenance = format!("ggml {}", node.describe());
                self.tensors.insert(id, (rank, CapturedTensor { tensor, provenance }));
            }
            Err(e) => self.fail(format!("{id}: {e} ({})", node.describe())),
        }
    }
}

/// The `cb_eval` callback. `user_data` is the `*mut Hook` the context was created with.
///
/// # Safety
/// Called by ggml's scheduler on the thread running `llama_decode`, with a
/// live node and the `user_data` given in the context params, which must be
/// a valid `*mut Hook` not otherwise borrowed during `llama_decode`.
pub(crate) unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    let hook = user_data as *mut Hook;
    if hook.is_null() || t.is_null() {
        return !ask;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `user_data` is the live Hook owned by `run` (contract above);
        // nothing else touches it while llama_decode runs.
        let hook = unsafe { &mut *hook };
        // SAFETY: ggml passes a live graph node.
        let node = unsafe { NodeInfo::read(t) };
        if ask {
            hook.ask(&node)
        } else {
            if !hook.keep_computing() {
                // The pass ends here (`stop_after`): false makes the
                // scheduler skip the rest of the graph.
                return false;
            }
            // SAFETY: data phase: the node has just been computed.
            unsafe { hook.observe(t, &node) };
            true
        }
    }));
    match result {
        Ok(answer) => answer,
        Err(_) => {
            // SAFETY: as above; the closure's borrow of the hook ended with the unwind.
            unsafe { (*hook).fail("panic inside the eval callback".to_string()) };
            // ask: do not capture; data: keep computing (false would abort the graph).
            !ask
        }
    }
}

/// Copy a node's values out of its backend buffer as f32, in logical order
/// (ne0 fastest), following its strides so permuted views come out right.
///
/// # Safety
/// `t` must be a live, computed tensor.
unsafe fn read_f32(t: *mut sys::ggml_tensor) -> Result<Vec<f32>, String> {
    // SAFETY: caller guarantees `t` is live.
    let tensor = unsafe { &*t };
    let esize = match tensor.type_ {
        sys::GGML_TYPE_F32 => 4,
        sys::GGML_TYPE_F16 | sys::GGML_TYPE_BF16 => 2,
        other => return Err(format!("node type {} cannot be read as f32", type_name(other))),
    };
    if tensor.buffer.is_null() || tensor.data.is_null() {
        return Err("node has no backend buffer".to_string());
    }
    if tensor.ne.iter().any(|&n| n < 0) {
        return Err("negative dimension".to_string());
    }
    // SAFETY: live tensor; ggml_nbytes only reads ne/nb/type.
    let nbytes = unsafe { sys::ggml_nbytes(t) };
    // SAFETY: live tensor; ggml_is_contiguous only reads ne/nb/type.
    if tensor.type_ == sys::GGML_TYPE_F32 && unsafe { sys::ggml_is_contiguous(t) } {
        // Already f32 in logical order: read straight into the result (no
        // byte copy beside it: the logits node is vocabulary-wide).
        let total: usize = tensor.ne.iter().map(|&n| n as usize).product();
        if total * 4 != nbytes {
            return Err(format!("{nbytes} bytes for {total} f32 values"));
        }
        let mut out = vec![0f32; total];
        // SAFETY: the tensor has a buffer (checked) and is contiguous, so
        // [0, nbytes) holds its `total` values; `out` has room for nbytes bytes.
        unsafe { sys::ggml_backend_tensor_get(t, out.as_mut_ptr() as *mut c_void, 0, nbytes) };
        return Ok(out);
    }
    let mut bytes = vec![0u8; nbytes];
    // SAFETY: the tensor has a buffer (checked) and [0, nbytes) is exactly
    // the span ggml_backend_tensor_get accepts; `bytes` holds nbytes bytes.
    unsafe { sys::ggml_backend_tensor_get(t, bytes.as_mut_ptr() as *mut c_void, 0, nbytes) };
    let ne = tensor.ne.map(|n| n as usize);
    let nb = tensor.nb;
    let total: usize = ne.iter().product();
    let mut out = Vec::with_capacity(total);
    for i3 in 0..ne[3] {
        for i2 in 0..ne[2] {
            for i1 in 0..ne[1] {
                let row = i3 * nb[3] + i2 * nb[2] + i1 * nb[1];
                for i0 in 0..ne[0] {
                    let off = row + i0 * nb[0];
                    let b = bytes.get(off..off + esize).ok_or_else(|| format!("element at byte {off} is outside the {nbytes}-byte node"))?;
                    out.push(match tensor.type_ {
                        sys::GGML_TYPE_F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                        sys::GGML_TYPE_F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                        _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// ggml's logical data (ne0 fastest) -> the canonical row-major tensor.
fn canonicalize(stage: Stage, d: &Dims, n_tokens: usize, n_past: usize, ne: [i64; 4], data: Vec<f32>) -> Result<Tensor, String> {
    let ne = ne.map(|n| n as usize);
    let n_kv = n_past + n_tokens;
    let shape = stage.layout().shape(d, n_tokens, n_kv);
    if stage.info().attention_internal {
        // ggml [n_kv_pad, n_tokens, n_head, 1]: rows per query token per head over the cache cells.
        let n_pad = ne[0];
        if ne[1] != n_tokens || ne[2] != d.n_head || ne[3] != 1 || n_pad < n_kv {
            return Err(format!(
                "ggml shape {ne:?}, expected [>= {n_kv}, {n_tokens}, {}, 1]",
                d.n_head
            ));
        }
        if data.len() != n_pad * n_tokens * d.n_head {
            return Err(format!("{} values for ggml shape {ne:?}", data.len()));
        }
        let mut out = vec![0f32; d.n_head * n_tokens * n_kv];
        for h in 0..d.n_head {
            for t in 0..n_tokens {
                let pos = n_past + t;
                let src = &data[(h * n_tokens + t) * n_pad..][..n_pad];
                let dst = &mut out[(h * n_tokens + t) * n_kv..][..n_kv];
                dst[..=pos].copy_from_slice(&src[..=pos]);
                if stage == Stage::AttnProbs {
                    // With a fresh cache the cells are in position order: every
                    // cell past the query's position must be masked to 0.
                    if let Some(c) = (pos + 1..n_pad).find(|&c| src[c] != 0.0) {
                        return Err(format!(
                            "head {h}, query position {pos}: cache cell {c} has probability {} (cells not in position order?)",
                            src[c]
                        ));
                    }
                }
            }
        }
        return Tensor::try_new(shape, out);
    }
    // Row stages: ggml ne is the canonical shape reversed, possibly with the
    // per-head dims merged ([n_head*head_dim, n_tokens] for a projection).
    let mut exact = [1usize; 4];
    for (i, &s) in shape.iter().rev().enumerate() {
        exact[i] = s;
    }
    let merged = [shape[1..].iter().product(), n_tokens, 1, 1];
    if ne != exact && ne != merged {
        return Err(format!("ggml shape {ne:?}, expected {exact:?} or {merged:?}"));
    }
    Tensor::try_new(shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, op: sys::ggml_op, srcs: &[(&str, sys::ggml_op)]) -> NodeInfo {
        let mut s: [Option<(String, sys::ggml_op)>; 3] = [None, None, None];
        for (i, (n, o)) in srcs.iter().enumerate() {
            s[i] = Some((n.to_string(), *o));
        }
        NodeInfo { name: name.into(), op, ty: sys::GGML_TYPE_F32, ne: [1, 1, 1, 1], srcs: s }
    }

    #[test]
    fn qcur_is_told_apart_by_op_and_source() {
        let none = sys::GGML_OP_NONE;
        let mm = node("Qcur-3", sys::GGML_OP_MUL_MAT, &[("blk.3.attn_q.weight", none), ("attn_norm-3", sys::GGML_OP_MUL)]);
        let add = node("Qcur-3", sys::GGML_OP_ADD, &[("Qcur-3", sys::GGML_OP_MUL_MAT), ("blk.3.attn_q.bias", none)]);
        let reshape = node("Qcur-3", sys::GGML_OP_RESHAPE, &[("Qcur-3", sys::GGML_OP_ADD)]);
        let rope = node("Qcur-3", sys::GGML_OP_ROPE, &[("Qcur-3", sys::GGML_OP_RESHAPE), ("inp_pos", none)]);
        assert_eq!(classify(&mm), Some((Stage::QProj, Some(3), 0)));
        assert_eq!(classify(&add), Some((Stage::QProj, Some(3), 1)));
        assert_eq!(classify(&reshape), None);
        assert_eq!(classify(&rope), Some((Stage::QRope, Some(3), 0)));
        // a bias of another layer under this layer's name is not a match
        let wrong = node("Qcur-3", sys::GGML_OP_ADD, &[("Qcur-3", sys::GGML_OP_MUL_MAT), ("blk.4.attn_q.bias", none)]);
        assert_eq!(classify(&wrong), None);
        let attn_out = node("node_57", sys::GGML_OP_MUL_MAT, &[("blk.11.attn_output.weight", none), ("kqv_out-11", sys::GGML_OP_CONT)]);
        assert_eq!(classify(&attn_out), Some((Stage::AttnOut, Some(11), 0)));
        let logits = node("result_output", sys::GGML_OP_MUL_MAT, &[("output.weight", none), ("result_norm", sys::GGML_OP_MUL)]);
        assert_eq!(classify(&logits), Some((Stage::Logits, None, 0)));
    }

    #[test]
    fn attention_rows_are_cut_to_the_real_positions_and_masked() {
        let d = Dims { n_layer: 1, n_embd: 4, n_head: 1, n_head_kv: 1, head_dim: 4, n_ff: 8, n_vocab: 10 };
        // 2 tokens after 1 cached position, padded cache of 4 cells
        let data: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let t = canonicalize(Stage::AttnScores, &d, 2, 1, [4, 2, 1, 1], data).unwrap();
        assert_eq!(t.shape, vec![1, 2, 3]);
        assert_eq!(t.data, vec![1.0, 2.0, 0.0, 5.0, 6.0, 7.0]);
        let bad = vec![0.5, 0.5, 0.0, 0.1, 0.3, 0.3, 0.4, 0.0];
        assert!(canonicalize(Stage::AttnProbs, &d, 2, 1, [4, 2, 1, 1], bad).is_err());
    }
}
