// How fast can the host take in every checkpoint of a pass? A checkpoint
// copied off the GPU lands in a fresh vector (crates/engine/src/cuda/host.rs),
// so a pass with every stage captured costs at least its bytes over the rate
// at which fresh memory is filled; this measures that rate on the machine it
// runs on, for the real mix of one pass, without a GPU.
//
//   cc -O2 -pthread -o /tmp/host_fill bench/host_fill.c && /tmp/host_fill [TOKENS] [PASSES] [THREADS]
//
// The mix is every stage of the stage catalogue for a prefill of TOKENS
// (default 512) on Qwen2.5-Coder-0.5B (24 layers, 896 wide, 14 heads, 2 KV
// heads of 64, FFN 4864, vocabulary 151936): 17 tensors a layer (the
// attention scores and probabilities [14, TOKENS, TOKENS] among them), then
// the embedding, final norm and logits. Each pass allocates every tensor on
// the main thread (each of 4 MiB or more advised as huge pages), copies a
// source into them in pieces of 4 MiB shared by THREADS threads (default:
// every core; 1 copies on the main thread), as host.rs does, and frees them
// all at the end (as a run drops its capture). Two heap policies:
//   default: glibc's (large blocks mapped afresh, freed memory returned);
//   kept:    freed memory kept in the heap (M_MMAP_THRESHOLD 32 MiB, the most
//            glibc allows, and M_TRIM_THRESHOLD 2 GB: what host.rs asks), so a
//            later pass reuses pages already mapped; tensors above 32 MiB
//            (the logits) are still mapped afresh.
// Prints each pass's rate and the median of passes 2 on (the first pass
// maps everything in both policies; with an even count of the rest, the
// upper of the two middle values).
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { LAYERS = 24, EMBD = 896, HEADS = 14, KV = 128, FF = 4864, VOCAB = 151936, PER_LAYER = 17 };
static const size_t HUGE_PAGE = 2u << 20;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Values a piece copies (4 MiB), as PIECE in host.rs.
static const size_t PIECE = 1u << 20;

// The pieces of one pass, taken in turn by the copying threads.
struct fill {
    float **dst;
    const size_t *sizes;
    int n;
    const float *src;
    int next_tensor;
    size_t next_value;
    pthread_mutex_t lock;
};

static void *copy_pieces(void *arg) {
    struct fill *f = arg;
    for (;;) {
        pthread_mutex_lock(&f->lock);
        while (f->next_tensor < f->n && f->next_value >= f->sizes[f->next_tensor]) {
            f->next_tensor++;
            f->next_value = 0;
        }
        if (f->next_tensor == f->n) {
            pthread_mutex_unlock(&f->lock);
            return NULL;
        }
        int t = f->next_tensor;
        size_t at = f->next_value, len = f->sizes[t] - at < PIECE ? f->sizes[t] - at : PIECE;
        f->next_value += len;
        pthread_mutex_unlock(&f->lock);
        memcpy(f->dst[t] + at, f->src + at, len * sizeof(float));
    }
}

// One pass: every tensor of `sizes` (values) allocated on this thread, filled
// from `src` by `threads` threads, then all freed. Returns the fill rate in GB/s.
static double pass(const size_t *sizes, int n, const float *src, int threads) {
    float **live = malloc(n * sizeof *live);
    size_t bytes = 0;
    double t0 = now();
    for (int i = 0; i < n; i++) {
        size_t len = sizes[i] * sizeof(float);
        float *p = malloc(len);
        if (!p) {
            fprintf(stderr, "host_fill: out of memory\n");
            exit(2);
        }
        uintptr_t a = (uintptr_t)p, first = (a + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE, end = (a + len) / HUGE_PAGE * HUGE_PAGE;
        if (len >= 2 * HUGE_PAGE && end > first) madvise((void *)first, end - first, MADV_HUGEPAGE);
        live[i] = p;
        bytes += len;
    }
    struct fill f = {live, sizes, n, src, 0, 0, PTHREAD_MUTEX_INITIALIZER};
    pthread_t *workers = malloc(threads * sizeof *workers);
    for (int k = 1; k < threads; k++) pthread_create(&workers[k], NULL, copy_pieces, &f);
    copy_pieces(&f);
    for (int k = 1; k < threads; k++) pthread_join(workers[k], NULL);
    double t = now() - t0;
    free(workers);
    for (int i = 0; i < n; i++) free(live[i]);
    free(live);
    return bytes / 1e9 / t;
}

int main(int argc, char **argv) {
    size_t tokens = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
    int passes = argc > 2 ? atoi(argv[2]) : 8;
    int threads = argc > 3 ? atoi(argv[3]) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (tokens == 0 || passes < 2 || threads < 1) {
        fprintf(stderr, "usage: host_fill [TOKENS > 0] [PASSES >= 2] [THREADS >= 1]\n");
        return 2;
    }
    int n = 0;
    size_t *sizes = malloc((LAYERS * PER_LAYER + 3) * sizeof *sizes), total = 0, largest = 0;
    sizes[n++] = tokens * EMBD;  // embed
    for (int l = 0; l < LAYERS; l++) {
        // attn_norm, q, k, v, q_rope, k_rope, scores, probs, ctx, attn_out,
        // attn_residual, ffn_norm, gate, up, act, down, layer_out
        size_t layer[PER_LAYER] = {tokens * EMBD, tokens * EMBD, tokens * KV, tokens * KV, tokens * EMBD,
                                   tokens * KV, HEADS * tokens * tokens, HEADS * tokens * tokens, tokens * EMBD,
                                   tokens * EMBD, tokens * EMBD, tokens * EMBD, tokens * FF, tokens * FF,
                                   tokens * FF, tokens * EMBD, tokens * EMBD};
        for (int i = 0; i < PER_LAYER; i++) sizes[n++] = layer[i];
    }
    sizes[n++] = tokens * EMBD;   // final norm
    sizes[n++] = tokens * VOCAB;  // logits
    for (int i = 0; i < n; i++) {
        total += sizes[i];
        if (sizes[i] > largest) largest = sizes[i];
    }
    float *src = malloc(largest * sizeof(float));
    memset(src, 0x3c, largest * sizeof(float));
    printf("%d checkpoints of a %zu-token prefill: %.2f GB a pass, filled by %d thread%s\n", n, tokens, total * 4 / 1e9, threads, threads == 1 ? "" : "s");
    // The default policy first: mallopt below changes the process for good.
    for (int kept = 0; kept <= 1; kept++) {
        if (kept && !(mallopt(M_MMAP_THRESHOLD, 32 << 20) && mallopt(M_TRIM_THRESHOLD, 2000000000))) {
            fprintf(stderr, "host_fill: mallopt refused\n");
            return 1;
        }
        double *rate = malloc(passes * sizeof *rate);
        printf("%-8s", kept ? "kept" : "default");
        for (int p = 0; p < passes; p++) {
            rate[p] = pass(sizes, n, src, threads);
            printf(" %.2f", rate[p]);
        }
        qsort(rate + 1, passes - 1, sizeof *rate, by_value);
        printf(" GB/s; median of passes 2-%d: %.2f GB/s (%.0f ms a pass)\n", passes, rate[1 + (passes - 1) / 2], total * 4 / 1e9 / rate[1 + (passes - 1) / 2] * 1e3);
        free(rate);
    }
    return 0;
}
