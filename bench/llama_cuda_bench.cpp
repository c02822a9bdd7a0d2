// llama.cpp's own speed on a GGUF, for the side-by-side table of
// scripts/llama-cuda-bench: prefill of each prompt length and greedy decode
// steps after it, with flash attention off and on, every layer offloaded.
//
//   llama_cuda_bench MODEL N_DECODE REPEAT N_PROMPT...
//
// Prints one JSON object per (flash attention, prompt length) on stdout:
// the times of every timed run and their medians. The prompt is the same
// synthetic token ids `parity bench` feeds our engine ((i * 7919 + 13) mod
// n_vocab), each run starts from an empty KV cache, and one untimed run
// comes first. Prefill is one llama_decode of the whole prompt (logits of
// the last token only), synchronized; a decode step is the argmax of the
// last logits on the host and one llama_decode of that token, as our
// engine's greedy decode does.
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

std::string json_list(const std::vector<double> & v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%s%.4f", i ? "," : "", v[i]);
        s += buf;
    }
    return s + "]";
}

int argmax(const float * logits, int n) {
    return static_cast<int>(std::max_element(logits, logits + n) - logits);
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s MODEL N_DECODE REPEAT N_PROMPT...\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    const int n_decode = std::atoi(argv[2]);
    const int repeat = std::atoi(argv[3]);
    std::vector<int> prompts;
    for (int i = 4; i < argc; i++) {
        prompts.push_back(std::atoi(argv[i]));
    }
    if (n_decode < 0 || repeat < 1 || std::any_of(prompts.begin(), prompts.end(), [](int p) { return p < 1; })) {
        std::fprintf(stderr, "N_DECODE must be >= 0, REPEAT and every N_PROMPT >= 1\n");
        return 2;
    }
    const int max_prompt = *std::max_element(prompts.begin(), prompts.end());

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 999;
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", model_path);
        return 2;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    // A build without a GPU backend runs on the CPU: say so in every record.
    const char * backend = llama_supports_gpu_offload() ? "cuda" : "cpu";

    for (const bool flash : {false, true}) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = static_cast<uint32_t>(max_prompt + n_decode + 16);
        cp.n_batch = static_cast<uint32_t>(max_prompt);
        cp.n_ubatch = static_cast<uint32_t>(max_prompt);
        cp.flash_attn_type = flash ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) {
            std::fprintf(stderr, "cannot create a context (flash attention %s)\n", flash ? "on" : "off");
            return 1;
        }
        for (const int n_prompt : prompts) {
            std::vector<llama_token> tokens(n_prompt);
            for (int i = 0; i < n_prompt; i++) {
                tokens[i] = static_cast<llama_token>((static_cast<long long>(i) * 7919 + 13) % n_vocab);
            }
            std::vector<double> prefill_ms, decode_ms;
            for (int run = 0; run <= repeat; run++) {
                llama_memory_clear(llama_get_memory(ctx), true);
                auto t0 = std::chrono::steady_clock::now();
                if (llama_decode(ctx, llama_batch_get_one(tokens.data(), n_prompt)) != 0) {
                    std::fprintf(stderr, "prefill of %d tokens failed\n", n_prompt);
                    return 1;
                }
                llama_synchronize(ctx);
                const double prefill = ms_since(t0);
                t0 = std::chrono::steady_clock::now();
                for (int step = 0; step < n_decode; step++) {
                    llama_token next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
                    if (llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) {
                        std::fprintf(stderr, "decode step %d failed\n", step);
                        return 1;
                    }
                }
                llama_synchronize(ctx);
                const double decode = n_decode ? ms_since(t0) / n_decode : 0.0;
                if (run > 0) {  // run 0 warms up
                    prefill_ms.push_back(prefill);
                    decode_ms.push_back(decode);
                }
            }
            std::printf(
                "{\"engine\":\"llama.cpp\",\"backend\":\"%s\",\"flash_attn\":%s,\"n_prompt\":%d,\"n_decode\":%d,"
                "\"prefill_ms\":%s,\"decode_ms_per_token\":%s,\"prefill_ms_median\":%.4f,\"decode_ms_per_token_median\":%.4f}\n",
                backend, flash ? "true" : "false", n_prompt, n_decode, json_list(prefill_ms).c_str(), json_list(decode_ms).c_str(),
                median(prefill_ms), median(decode_ms));
            std::fflush(stdout);
        }
        llama_free(ctx);
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
