// The header's own checks: test_writer DIR writes small dumps under DIR and
// exits 0 when every check holds, 1 naming the first that does not.
// crates/parity/tests/writers.rs compiles and runs it, then reads the dump it
// leaves in DIR/ok with the Rust reader.
#include "qwen2_parity_dump.hpp"

#include <cmath>
#include <functional>
#include <iostream>
#include <limits>

namespace {

using qwen2_parity_dump::Dims;
using qwen2_parity_dump::Error;
using qwen2_parity_dump::Run;
using qwen2_parity_dump::Writer;

int failures = 0;

void check(bool ok, const std::string& what) {
    if (!ok) {
        std::cerr << "FAILED: " << what << "\n";
        ++failures;
    }
}

// `action` must throw Error with a message containing `expected`.
void refused(const std::function<void()>& action, const std::string& expected, const std::string& what) {
    try {
        action();
        check(false, what + ": not refused");
    } catch (const Error& e) {
        check(std::string(e.what()).find(expected) != std::string::npos, what + ": message \"" + e.what() + "\" lacks \"" + expected + "\"");
    }
}

Run small_run() {
    Run run;
    run.engine = "cpp-test";
    run.model_sha256 = std::string(64, 'A');
    run.prompt = "h\xC3\xA9llo \"quoted\"\n\tline";  // UTF-8, a quote, control characters
    run.tokens = {5, 6, 7};
    run.dims = Dims{2, 12, 4, 2, 3, 20, 30};  // all different, so that a swapped axis shows
    run.kv_type = "f32";
    return run;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: test_writer DIR\n";
        return 2;
    }
    std::filesystem::path dir = argv[1];
    std::vector<float> hidden(3 * 12, 0.25f);

    Writer dump(dir / "ok", small_run());
    refused([&] { dump.add(0, 0, "qk_proj", hidden, {3, 12}); }, "unknown stage \"qk_proj\"", "unknown stage");
    // q_proj as [tokens, heads * head_dim]: the same bytes, not the layout.
    refused([&] { dump.add(0, 0, "q_proj", hidden, {3, 12}); }, "shape [3, 12], the catalogue's layout is [3, 4, 3]", "wrong shape");
    refused([&] { dump.add(1, 0, "attn_probs", std::vector<float>(12), {4, 1, 3}); }, "[4, 1, 4]", "decode attention shape");
    refused([&] { dump.add(0, 0, "attn_norm", std::vector<float>(35), {3, 12}); }, "35 values for shape [3, 12]", "data size");
    refused([&] { dump.add(0, 0, "embed", hidden, {3, 12}); }, "global stage", "layer of a global stage");
    refused([&] { dump.add(0, std::nullopt, "attn_norm", hidden, {3, 12}); }, "per-layer stage", "no layer");
    refused([&] { dump.add(0, 2, "attn_norm", hidden, {3, 12}); }, "layer 2 is out of range", "layer range");

    dump.add(0, 0, "attn_norm", hidden, {3, 12});
    refused([&] { dump.add(0, 0, "attn_norm", hidden, {3, 12}); }, "already added", "added twice");
    std::vector<float> with_nan = hidden;
    with_nan[5] = std::numeric_limits<float>::quiet_NaN();
    with_nan[6] = -std::numeric_limits<float>::infinity();
    dump.add(0, std::nullopt, "embed", with_nan, {3, 12});  // written as is: the diff fails it
    dump.add(1, 1, "attn_scores", std::vector<float>(4 * 1 * 4, -1.5f), {4, 1, 4});
    dump.mark_unavailable(1, 1, "attn_probs");
    check(!std::filesystem::exists(dir / "ok" / "manifest.json"), "no manifest before finish()");
    dump.finish({8, 9});
    check(std::filesystem::exists(dir / "ok" / "manifest.json"), "the manifest after finish()");
    refused([&] { dump.add(1, 0, "attn_norm", std::vector<float>(12), {1, 12}); }, "finished", "add after finish");

    // A second writer over the finished dump removes its manifest first.
    Writer again(dir / "ok2", small_run());
    again.add(0, std::nullopt, "embed", hidden, {3, 12});
    again.finish();
    Writer over(dir / "ok2", small_run());
    check(!std::filesystem::exists(dir / "ok2" / "manifest.json"), "an old manifest removed when a writer opens the directory");

    refused([&] { Writer w(dir / "bad", [] { Run r = small_run(); r.model_sha256 = "abc"; return r; }()); }, "64 hex digits", "bad sha256");
    refused([&] { Writer w(dir / "bad", [] { Run r = small_run(); r.tokens.clear(); return r; }()); }, "at least one", "no tokens");
    refused([&] { Writer w(dir / "bad", [] { Run r = small_run(); r.dims.n_head = 0; return r; }()); }, "positive", "zero dimension");
    refused([&] { Writer w(dir / "bad", [] { Run r = small_run(); r.prompt = "\xC3("; return r; }()); }, "not valid UTF-8", "bad UTF-8");
    refused([&] { Writer w(dir / "bad", [] { Run r = small_run(); r.prompt = "\xED\xA0\x80"; return r; }()); }, "not valid UTF-8", "a surrogate");
    refused([&] { Writer w(dir / "bad", small_run()); w.finish(); }, "nothing was added", "empty dump");

    // CRC-32 of "123456789" is the standard check value.
    check(qwen2_parity_dump::crc32("123456789") == 0xCBF43926u, "CRC-32 check value");

    if (failures) return 1;
    std::cout << "all header checks hold\n";
    return 0;
}
