// raw_to_dump INDEX OUT_DIR: write a qwen2-parity dump from raw
// little-endian f32 files, through qwen2_parity_dump.hpp. For an engine that
// already saves its tensors as raw files; crates/parity/tests/writers.rs
// uses it to write llama.cpp's tensors back through the header.
//
// INDEX is text, one item per line, the first word its key; files are
// relative to the index's directory; "-" is the layer of a global stage:
//   engine my-engine
//   model_sha256 1d9614...ff32
//   prompt Write a haiku about GPU computing   (the rest of the line)
//   chat 0
//   tokens 7985 264 6386 84 ...
//   dims 24 896 14 2 64 4864 151936           (layers embd heads kv-heads head-dim ff vocab)
//   kv_type f16
//   generated 16 ...
//   tensor 0 0 q_proj step0-layer0-q_proj.f32 7 14 64   (step layer stage file shape...)
//   tensor 0 - logits step0-logits.f32 7 151936
#include "qwen2_parity_dump.hpp"

#include <iostream>
#include <iterator>

namespace {

std::vector<float> read_raw_f32(const std::filesystem::path& path, std::size_t count) {
    std::ifstream f(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (!f.good() && !f.eof()) throw qwen2_parity_dump::Error(path.string() + ": cannot read");
    if (bytes.size() != 4 * count)
        throw qwen2_parity_dump::Error(path.string() + ": " + std::to_string(bytes.size()) + " bytes, the shape needs " +
                                       std::to_string(4 * count));
    std::vector<float> values(count);
    for (std::size_t i = 0; i < count; ++i) {
        std::uint32_t bits = 0;
        for (int k = 0; k < 4; ++k) bits |= std::uint32_t(static_cast<unsigned char>(bytes[4 * i + k])) << (8 * k);
        std::memcpy(&values[i], &bits, 4);
    }
    return values;
}

int run(const std::filesystem::path& index_path, const std::filesystem::path& out_dir) {
    std::ifstream index(index_path);
    if (!index) throw qwen2_parity_dump::Error(index_path.string() + ": cannot open");
    qwen2_parity_dump::Run run;
    std::vector<std::int32_t> generated;
    std::vector<std::string> tensor_lines;
    std::string line;
    while (std::getline(index, line)) {
        std::istringstream words(line);
        std::string key;
        words >> key;
        if (key == "engine") words >> run.engine;
        else if (key == "model_sha256") words >> run.model_sha256;
        else if (key == "prompt") run.prompt = line.size() > 7 ? line.substr(7) : "";
        else if (key == "chat") words >> run.chat;
        else if (key == "kv_type") words >> run.kv_type;
        else if (key == "tokens") for (std::int32_t t; words >> t;) run.tokens.push_back(t);
        else if (key == "generated") for (std::int32_t t; words >> t;) generated.push_back(t);
        else if (key == "dims") {
            qwen2_parity_dump::Dims& d = run.dims;
            words >> d.n_layer >> d.n_embd >> d.n_head >> d.n_head_kv >> d.head_dim >> d.n_ff >> d.n_vocab;
        } else if (key == "tensor") tensor_lines.push_back(line);
        else if (!key.empty()) throw qwen2_parity_dump::Error(index_path.string() + ": unknown key \"" + key + "\"");
        if (words.fail() && !words.eof()) throw qwen2_parity_dump::Error(index_path.string() + ": bad line: " + line);
    }
    // The tensors are read after the header lines, wherever those stand.
    qwen2_parity_dump::Writer dump(out_dir, run);
    for (const std::string& tensor_line : tensor_lines) {
        std::istringstream words(tensor_line);
        std::string key, layer_text, stage, file;
        std::size_t step = 0;
        std::vector<std::size_t> shape;
        bool ok = static_cast<bool>(words >> key >> step >> layer_text >> stage >> file);
        for (std::size_t n; ok && words >> n;) shape.push_back(n);
        bool layer_ok = layer_text == "-" || (!layer_text.empty() && layer_text.find_first_not_of("0123456789") == std::string::npos);
        if (!ok || shape.empty() || !words.eof() || !layer_ok)
            throw qwen2_parity_dump::Error(index_path.string() + ": bad tensor line: " + tensor_line);
        std::optional<std::size_t> layer;
        if (layer_text != "-") layer = std::stoul(layer_text);
        std::size_t count = 1;
        for (std::size_t n : shape) count *= n;
        std::vector<float> values = read_raw_f32(index_path.parent_path() / file, count);
        dump.add(step, layer, stage, values, shape, "raw " + file);
    }
    dump.finish(generated);
    std::cout << tensor_lines.size() << " tensors written to " << out_dir.string() << "\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: raw_to_dump INDEX OUT_DIR\n";
        return 2;
    }
    try {
        return run(argv[1], argv[2]);
    } catch (const std::exception& e) {
        std::cerr << "raw_to_dump: " << e.what() << "\n";
        return 1;
    }
}
