// qwen2_parity_dump.hpp: write an engine's intermediate tensors as a
// qwen2-parity dump, for `parity diff` to compare with llama.cpp's capture
// stage by stage. Single header, C++17, standard library only.
//
//   qwen2_parity_dump::Run run;
//   run.engine = "my-engine"; run.model_sha256 = sha; run.prompt = prompt; run.tokens = ids;
//   run.dims = {24, 896, 14, 2, 64, 4864, 151936};  // layers, embd, heads, kv heads, head dim, ff, vocab
//   qwen2_parity_dump::Writer dump("dumps/mine", run);
//   dump.add(0, 0, "q_proj", q, {n_tokens, 14, 64});  // step 0 = prefill, layer 0
//   dump.add(0, std::nullopt, "logits", logits, {n_tokens, 151936});
//   dump.finish(generated);
//
// The format is what `read_dump` (crates/capture/src/dump.rs) reads: one
// .npy (format 1.0, '<f4', C order) per checkpoint at
// step{S}/layer{LL}/{stage}.npy or step{S}/{stage}.npy, and manifest.json
// listing each file with its size and CRC-32. As on the Rust side, nothing
// half-written is ever read as a dump: the constructor removes an old
// manifest before any file is written, each file is written under a
// temporary name and renamed, and the manifest is written last, the same
// way; a program that stops before finish() leaves no dump.
//
// Every mistake (an unknown stage, a shape other than the catalogue's, a
// layer out of range, a checkpoint added twice, a file that cannot be
// written) throws qwen2_parity_dump::Error naming it.
#pragma once

#include <array>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace qwen2_parity_dump {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The canonical layouts (row-major, outermost first), for a pass of
// n_tokens tokens that leaves n_kv positions in the KV cache.
enum class Layout {
    Hidden,     // [n_tokens, n_embd]
    QHeads,     // [n_tokens, n_head, head_dim]
    KvHeads,    // [n_tokens, n_head_kv, head_dim]
    Attention,  // [n_head, n_tokens, n_kv]
    Ffn,        // [n_tokens, n_ff]
    Vocab,      // [n_tokens, n_vocab]
};

struct StageEntry {
    const char* name;
    Layout layout;
    bool global;  // written once per step with no layer
};

// The stage catalogue of crates/capture/src/stage.rs (CATALOGUE), in its
// execution order. crates/parity/tests/writers.rs reads this table from this
// file and compares it with the Rust catalogue: a stage added or changed
// there fails that test until it is changed here (and in the Python writer).
inline constexpr StageEntry kStages[] = {
    {"embed", Layout::Hidden, true},
    {"attn_norm", Layout::Hidden, false},
    {"q_proj", Layout::QHeads, false},
    {"k_proj", Layout::KvHeads, false},
    {"v_proj", Layout::KvHeads, false},
    {"q_rope", Layout::QHeads, false},
    {"k_rope", Layout::KvHeads, false},
    {"attn_scores", Layout::Attention, false},
    {"attn_probs", Layout::Attention, false},
    {"attn_ctx", Layout::QHeads, false},
    {"attn_out", Layout::Hidden, false},
    {"attn_residual", Layout::Hidden, false},
    {"ffn_norm", Layout::Hidden, false},
    {"ffn_gate", Layout::Ffn, false},
    {"ffn_up", Layout::Ffn, false},
    {"ffn_act", Layout::Ffn, false},
    {"ffn_down", Layout::Hidden, false},
    {"layer_out", Layout::Hidden, false},
    {"final_norm", Layout::Hidden, true},
    {"logits", Layout::Vocab, true},
};

struct Dims {
    std::size_t n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab;
};

// What the dump is of. model_sha256: the GGUF file's sha256 in hex, or ""
// when not known (the diff then cannot check both dumps ran the same model).
// kv_type ("f16", "f32", ...) and threads are recorded for the reports; ""
// and 0 mean not recorded.
struct Run {
    std::string engine;
    std::string model_sha256;
    std::string prompt;  // UTF-8
    bool chat = false;
    std::vector<std::int32_t> tokens;  // the prompt's token ids (the prefill, step 0)
    Dims dims{};
    std::string kv_type;
    bool flash_attn = false;
    std::size_t threads = 0;
};

// The shape `layout` has in a pass of n_tokens tokens leaving n_kv cache positions.
inline std::vector<std::size_t> canonical_shape(Layout layout, const Dims& d, std::size_t n_tokens, std::size_t n_kv) {
    switch (layout) {
        case Layout::Hidden: return {n_tokens, d.n_embd};
        case Layout::QHeads: return {n_tokens, d.n_head, d.head_dim};
        case Layout::KvHeads: return {n_tokens, d.n_head_kv, d.head_dim};
        case Layout::Attention: return {d.n_head, n_tokens, n_kv};
        case Layout::Ffn: return {n_tokens, d.n_ff};
        case Layout::Vocab: return {n_tokens, d.n_vocab};
    }
    throw Error("unknown layout");
}

// CRC-32 (IEEE, reflected, as zlib and the Rust reader's crc32fast).
inline std::uint32_t crc32(const std::string& bytes) {
    static const std::array<std::uint32_t, 256> table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    std::uint32_t crc = 0xFFFFFFFFu;
    for (unsigned char b : bytes) crc = table[(crc ^ b) & 0xFFu] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

namespace detail {

inline std::string shape_text(const std::vector<std::size_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// The .npy encoding: format 1.0, '<f4', C order, the header padded with
// spaces and a newline so that the data starts at a multiple of 64 bytes.
inline std::string npy_bytes(const float* data, const std::vector<std::size_t>& shape, std::size_t count) {
    std::string dims;
    for (std::size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
    if (shape.size() == 1) dims += ",";
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
    std::size_t unpadded = 10 + header.size() + 1;  // magic, version, length, header, newline
    header.append((64 - unpadded % 64) % 64, ' ');
    header += '\n';
    std::string out = std::string("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(header.size() & 0xFF);
    out += static_cast<char>(header.size() >> 8);
    out += header;
    out.reserve(out.size() + 4 * count);
    for (std::size_t i = 0; i < count; ++i) {
        std::uint32_t bits;
        std::memcpy(&bits, &data[i], 4);  // little-endian whatever the host's order
        for (int k = 0; k < 4; ++k) out += static_cast<char>((bits >> (8 * k)) & 0xFF);
    }
    return out;
}

// Write through a temporary name beside `path`, then rename over it.
inline void write_atomically(const std::filesystem::path& path, const std::string& bytes) {
    thread_local std::mt19937_64 names{std::random_device{}()};  // no two writers share a temporary name
    std::filesystem::path tmp = path;
    tmp += ".tmp" + std::to_string(names());
    {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        f.close();
        if (!f) {
            std::error_code ignored;
            std::filesystem::remove(tmp, ignored);
            throw Error(path.string() + ": cannot write");
        }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
        std::string why = ec.message();
        std::filesystem::remove(tmp, ec);
        throw Error(path.string() + ": cannot rename the temporary file over it: " + why);
    }
}

// The manifest is JSON that serde reads: strings must be valid UTF-8.
inline bool valid_utf8(const std::string& s) {
    std::size_t i = 0;
    while (i < s.size()) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        std::size_t n = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xE ? 2 : (c >> 3) == 0x1E ? 3 : 9;
        if (n == 9 || s.size() - i <= n) return false;  // not a lead byte, or cut short
        std::uint32_t cp = n == 0 ? c : c & (0x3F >> n);
        for (std::size_t k = 1; k <= n; ++k) {
            unsigned char t = static_cast<unsigned char>(s[i + k]);
            if ((t >> 6) != 0x2) return false;
            cp = (cp << 6) | (t & 0x3F);
        }
        static const std::uint32_t smallest[] = {0, 0x80, 0x800, 0x10000};
        if (cp < smallest[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += n + 1;
    }
    return true;
}

inline std::string json_string(const std::string& s, const char* what) {
    if (!valid_utf8(s)) throw Error(std::string(what) + " is not valid UTF-8");
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    return out + "\"";
}

template <typename T>
std::string json_list(const std::vector<T>& values) {
    std::string out = "[";
    for (std::size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
    return out + "]";
}

inline std::string json_layer(std::optional<std::size_t> layer) {
    return layer ? std::to_string(*layer) : "null";
}

}  // namespace detail

class Writer {
public:
    // Opens a dump in `dir` (created if missing); an old manifest there is
    // removed first, so the directory is not a dump until finish().
    Writer(std::filesystem::path dir, Run run) : dir_(std::move(dir)), run_(std::move(run)) {
        const Dims& d = run_.dims;
        for (std::size_t v : {d.n_layer, d.n_embd, d.n_head, d.n_head_kv, d.head_dim, d.n_ff, d.n_vocab})
            if (v == 0) throw Error("Run::dims: every dimension must be positive");
        if (run_.engine.empty()) throw Error("Run::engine: name the engine, e.g. \"my-engine-cuda\"");
        if (!run_.model_sha256.empty() &&
            (run_.model_sha256.size() != 64 || run_.model_sha256.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos))
            throw Error("Run::model_sha256 must be 64 hex digits (or \"\" when not known)");
        if (run_.tokens.empty()) throw Error("Run::tokens must hold the prompt's token ids (at least one)");
        for (std::int32_t t : run_.tokens)
            if (t < 0) throw Error("Run::tokens: token id " + std::to_string(t) + " is negative");
        for (char& c : run_.model_sha256) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        // Strings are checked now rather than at finish(), after the tensors.
        detail::json_string(run_.engine, "Run::engine");
        detail::json_string(run_.prompt, "Run::prompt");
        detail::json_string(run_.kv_type, "Run::kv_type");
        std::error_code ec;
        std::filesystem::create_directories(dir_, ec);
        if (ec) throw Error(dir_.string() + ": cannot create the directory: " + ec.message());
        std::filesystem::remove(dir_ / "manifest.json", ec);
        if (ec) throw Error((dir_ / "manifest.json").string() + ": cannot remove the old manifest: " + ec.message());
    }

    // The canonical shape of `stage` at `step`: step 0 is the prefill of
    // the prompt's tokens; decode step k > 0 feeds one token and attends
    // over tokens.size() + k cache positions.
    std::vector<std::size_t> expected_shape(std::size_t step, const std::string& stage) const {
        std::size_t n_prompt = run_.tokens.size();
        return canonical_shape(entry(stage).layout, run_.dims, step == 0 ? n_prompt : 1, n_prompt + step);
    }

    // Write one checkpoint. `layer` is std::nullopt for the global stages
    // (embed, final_norm, logits). `shape` must be the stage's canonical
    // shape exactly; `data` holds its product of floats, row-major. NaN and
    // Inf are written as they are: the diff fails them.
    void add(std::size_t step, std::optional<std::size_t> layer, const std::string& stage, const float* data,
             const std::vector<std::size_t>& shape, const std::string& provenance = "") {
        Key key = checkpoint(step, layer, stage);
        std::vector<std::size_t> expected = expected_shape(step, stage);
        if (shape != expected)
            throw Error(where(step, layer, stage) + ": shape " + detail::shape_text(shape) + ", the catalogue's layout is " +
                        detail::shape_text(expected) + " for " + std::to_string(run_.tokens.size()) + " prompt tokens");
        std::size_t count = 1;
        for (std::size_t n : shape) count *= n;
        if (data == nullptr && count > 0) throw Error(where(step, layer, stage) + ": no data");
        std::string file = "step" + std::to_string(step) + "/";
        if (layer) file += (*layer < 10 ? "layer0" : "layer") + std::to_string(*layer) + "/";
        file += stage + ".npy";
        std::string provenance_json = detail::json_string(provenance, "provenance");  // refused before any file is written
        std::string bytes = detail::npy_bytes(data, shape, count);
        std::filesystem::path path = dir_ / file;
        std::error_code ec;
        std::filesystem::create_directories(path.parent_path(), ec);
        if (ec) throw Error(path.parent_path().string() + ": cannot create the directory: " + ec.message());
        detail::write_atomically(path, bytes);
        entries_.push_back("{\"step\": " + std::to_string(step) + ", \"layer\": " + detail::json_layer(layer) +
                           ", \"stage\": \"" + stage + "\", \"shape\": " + detail::json_list(shape) + ", \"file\": \"" + file +
                           "\", \"provenance\": " + provenance_json + ", \"bytes\": " + std::to_string(bytes.size()) +
                           ", \"crc32\": " + std::to_string(crc32(bytes)) + "}");
        seen_.insert(key);
        note_step_and_layer(step, layer);
    }

    // The same, from a vector whose size must match the shape.
    void add(std::size_t step, std::optional<std::size_t> layer, const std::string& stage, const std::vector<float>& data,
             const std::vector<std::size_t>& shape, const std::string& provenance = "") {
        std::size_t count = 1;
        for (std::size_t n : shape) count *= n;
        if (data.size() != count)
            throw Error(where(step, layer, stage) + ": " + std::to_string(data.size()) + " values for shape " + detail::shape_text(shape));
        add(step, layer, stage, data.data(), shape, provenance);
    }

    // Record a checkpoint this engine cannot observe (attention scores and
    // probabilities under flash attention): reported, never zeros.
    void mark_unavailable(std::size_t step, std::optional<std::size_t> layer, const std::string& stage) {
        seen_.insert(checkpoint(step, layer, stage));
        unavailable_.push_back("{\"step\": " + std::to_string(step) + ", \"layer\": " + detail::json_layer(layer) +
                               ", \"stage\": \"" + stage + "\"}");
        note_step_and_layer(step, std::nullopt);
    }

    // Write the manifest, last. `generated`: the token each step picked
    // (greedy), one per step, when known. Returns the manifest's path.
    std::filesystem::path finish(const std::vector<std::int32_t>& generated = {}) {
        if (finished_) throw Error("the dump is already finished");
        if (entries_.empty()) throw Error("nothing was added: a dump needs at least one tensor");
        const Dims& d = run_.dims;
        std::vector<std::size_t> layers(layers_.begin(), layers_.end());
        std::ostringstream m;
        m << "{\n \"format\": \"qwen2-parity-capture/1\",\n"
          << " \"engine\": " << detail::json_string(run_.engine, "engine") << ",\n"
          << " \"model_sha256\": \"" << run_.model_sha256 << "\",\n"
          << " \"prompt\": " << detail::json_string(run_.prompt, "prompt") << ",\n"
          << " \"chat\": " << (run_.chat ? "true" : "false") << ",\n"
          << " \"tokens\": " << detail::json_list(run_.tokens) << ",\n"
          << " \"generated\": " << detail::json_list(generated) << ",\n"
          << " \"n_steps\": " << n_steps_ << ",\n"
          << " \"config\": {\"kv_type\": " << detail::json_string(run_.kv_type, "kv_type")
          << ", \"flash_attn\": " << (run_.flash_attn ? "true" : "false") << ", \"n_layer\": " << d.n_layer
          << ", \"n_embd\": " << d.n_embd << ", \"n_head\": " << d.n_head << ", \"n_head_kv\": " << d.n_head_kv
          << ", \"head_dim\": " << d.head_dim << ", \"n_ff\": " << d.n_ff << ", \"n_vocab\": " << d.n_vocab
          << ", \"layers\": " << detail::json_list(layers) << ", \"n_decode\": " << n_steps_ - 1
          << ", \"threads\": " << run_.threads << "},\n"
          << " \"stages\": [\n  ";
        for (std::size_t i = 0; i < entries_.size(); ++i) m << (i ? ",\n  " : "") << entries_[i];
        m << "\n ],\n \"unavailable\": [";
        for (std::size_t i = 0; i < unavailable_.size(); ++i) m << (i ? ", " : "") << unavailable_[i];
        m << "]\n}\n";
        std::filesystem::path path = dir_ / "manifest.json";
        detail::write_atomically(path, m.str());
        finished_ = true;
        return path;
    }

private:
    // (step, layer or SIZE_MAX for a global stage, stage's catalogue index)
    using Key = std::tuple<std::size_t, std::size_t, std::size_t>;

    static const StageEntry& entry(const std::string& stage) {
        for (const StageEntry& e : kStages)
            if (stage == e.name) return e;
        std::string names;
        for (const StageEntry& e : kStages) names += (names.empty() ? "" : ", ") + std::string(e.name);
        throw Error("unknown stage \"" + stage + "\": the catalogue's stages are " + names);
    }

    static std::string where(std::size_t step, std::optional<std::size_t> layer, const std::string& stage) {
        return "step " + std::to_string(step) + (layer ? ", layer " + std::to_string(*layer) : "") + ", " + stage;
    }

    // Check one (step, layer, stage) against the catalogue and the model.
    Key checkpoint(std::size_t step, std::optional<std::size_t> layer, const std::string& stage) const {
        if (finished_) throw Error("the dump is finished: open a new Writer");
        const StageEntry& e = entry(stage);
        if (e.global && layer) throw Error(stage + " is a global stage: pass std::nullopt as its layer");
        if (!e.global && !layer) throw Error(stage + " is a per-layer stage: pass its layer");
        if (layer && *layer >= run_.dims.n_layer)
            throw Error("layer " + std::to_string(*layer) + " is out of range: the model has " + std::to_string(run_.dims.n_layer) + " layers");
        Key key{step, layer.value_or(SIZE_MAX), static_cast<std::size_t>(&e - kStages)};
        if (seen_.count(key)) throw Error(where(step, layer, stage) + " was already added");
        return key;
    }

    void note_step_and_layer(std::size_t step, std::optional<std::size_t> layer) {
        if (step + 1 > n_steps_) n_steps_ = step + 1;
        if (layer) layers_.insert(*layer);
    }

    std::filesystem::path dir_;
    Run run_;
    std::vector<std::string> entries_;      // the manifest's "stages", in the order added
    std::vector<std::string> unavailable_;  // the manifest's "unavailable"
    std::set<Key> seen_;
    std::set<std::size_t> layers_;
    std::size_t n_steps_ = 0;
    bool finished_ = false;
};

}  // namespace qwen2_parity_dump
