/* Quantized products of many input rows on AMX (Intel's tile matrix unit: Sapphire Rapids and later), float32-exact
 * by splitting: y[M, N] = x[M, K] @ W[N, K]^T with W decoded on the fly from 4-bit codes (NF4 / FP4: the table of
 * code values, scaled by each block's absmax) or int8 values (scaled by each row's scale).
 *
 * AMX multiplies bf16 pairs into float32 sums (TDPBF16PS: a 16 x 32 tile by a 32 x 16 one, 8192 products an
 * instruction) about ten times faster than one core's float32 FMAs, but bf16 keeps 8 bits of a float's 24. So every
 * float32 operand is split into three bf16 parts, v = v1 + v2 + v3 (each the rounded remainder of the last: exact to
 * ~2^-25 of v), and the products of parts whose sizes add to at least 2^-16 are summed: a1 b1, a1 b2, a2 b1, a1 b3,
 * a2 b2, a3 b1 (the rest lie below 2^-24 of a b, float32's own rounding). A bf16 x bf16 product is exact in float32,
 * so what remains is float32 summation, as in the float kernels. int8 values are exact in bf16 (one part): three
 * products. The same splitting of float32 into bf16 parts as in "bf16x3" GEMM emulation (Henry, Tang and Heinecke,
 * "Leveraging the bfloat16 Artificial Intelligence Datatype For Higher-Precision Computations", ARITH 2019).
 * A 4-bit product asked for in a lower precision (the config's compute dtype) takes fewer parts: two (a1 b1, a1 b2,
 * a2 b1: ~2^-16 of a b, above float16's 2^-11) or one (bf16 x bf16, as bitsandbytes computes in bfloat16).
 *
 * W is the tiles' A operand (16 output rows x 32 inputs, row-major: a row of codes decodes straight into it with
 * one 16-bit table lookup (vpermw) per 32 weights and part); x is B (32 inputs x 16 input rows in pairs, built once
 * a call). A 4-bit block's 64 inputs are two chunks: its bytes' high nibbles (the even inputs), then the low ones (the
 * odd), and x's chunks are built in that order; int8's chunks are consecutive inputs.
 * Included by quantized.c where the compiler targets AMX-BF16 (-march=native on such a CPU). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(GPT2KIT_AVX512)
#define GPT2KIT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out AMX's 8 KB of tile state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA); a kernel that refuses, or one too old to know the request, leaves the float kernels */
static int amx_permitted(void) {
    static int state = 0;  /* 0 not asked, 1 granted, -1 refused (or GPT2KIT_AMX=0: the AVX-512 kernels, to compare) */
    if (!state) {
        const char *env = getenv("GPT2KIT_AMX");
        state = (env && !strcmp(env, "0")) || syscall(SYS_arch_prctl, 0x1023, 18) != 0 ? -1 : 1;
    }
    return state == 1;
}

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* tiles 0-2: W's parts (A), 3-5: x's parts (B), 6: the sums (C); all 16 rows of 64 bytes */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 7; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* v (16 floats) -> its first `parts` (1-3) bf16 parts, each rounded to nearest from the remainder of the ones before */
static inline void split_parts(__m512 v, int parts, __m256bh *p) {
    for (int i = 0; i < parts; i++) {
        p[i] = _mm512_cvtneps_pbh(v);
        v = _mm512_sub_ps(v, _mm512_cvtpbh_ps(p[i]));
    }
}

#define AMX_CHUNK 32  /* inputs a tile reads */
#define AMX_ROWS 16
/* The decoders prefetch the same inputs of the rows this far on (two blocks of 16 rows: with the threads taking blocks
 * in turn, this thread's next one). Without, the decoding stalled on the codes' loads (perf: ~40% of the kernel's
 * samples on the instruction after the load); a C harness (2 threads, best of 4 interleaved runs, GPT-2 XL's 1600 x
 * 6400 at 16 rows): NF4 5.39 -> 3.52 ms, int8 3.70 -> 2.46 ms, where 4 cache lines ahead in the row took 3.86 / 2.84 */
#define AMX_AHEAD 32

/* x (M, K, rows ldx apart) -> xb: for each group of 16 input rows g, part p (of `parts`) and chunk c, a B tile of 16
 * rows of dwords: row j, column m = the bf16 parts of x[16g + m] at the chunk's inputs 2j and 2j + 1 (lut4: chunk 2b
 * holds block b's even inputs, 2b + 1 its odd ones). Rows past M are zeros. */
static void amx_pack_x(const float *x, int64_t M, int64_t K, int64_t ldx, int lut4, int parts, uint16_t *xb) {
    const int64_t groups = (M + 15) / 16, chunks = K / AMX_CHUNK, tile = AMX_ROWS * 32;  /* bf16s a tile */
    if (M % 16)  /* the last group's columns past M: zeros (every other element is written below) */
        memset(xb + (groups - 1) * parts * chunks * tile, 0, (size_t)(parts * chunks * tile) * sizeof(uint16_t));
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const int64_t g = m / 16, col = m % 16;
        for (int64_t c = 0; c < chunks; c++) {
            __m512 lo, hi;  /* the chunk's 32 inputs in its order */
            const float *row = x + m * ldx;
            if (lut4) {  /* chunk c: block c / 2's even (c even) or odd inputs */
                const float *b = row + (c / 2) * 64;
                const __m512i pick = c % 2 ? odd : even;
                lo = _mm512_permutex2var_ps(_mm512_loadu_ps(b), pick, _mm512_loadu_ps(b + 16));
                hi = _mm512_permutex2var_ps(_mm512_loadu_ps(b + 32), pick, _mm512_loadu_ps(b + 48));
            } else {
                lo = _mm512_loadu_ps(row + c * AMX_CHUNK);
                hi = _mm512_loadu_ps(row + c * AMX_CHUNK + 16);
            }
            __m256bh pl[3], ph[3];
            split_parts(lo, parts, pl);
            split_parts(hi, parts, ph);
            for (int p = 0; p < parts; p++) {
                uint16_t *t = xb + ((g * parts + p) * chunks + c) * tile;
                uint16_t e[32];
                _mm256_storeu_si256((__m256i *)e, (__m256i)pl[p]);
                _mm256_storeu_si256((__m256i *)(e + 16), (__m256i)ph[p]);
                for (int j = 0; j < 16; j++) {  /* row j: inputs 2j, 2j + 1 of the chunk, at column col */
                    t[j * 32 + 2 * col] = e[2 * j];
                    t[j * 32 + 2 * col + 1] = e[2 * j + 1];
                }
            }
        }
    }
}

/* 16 output rows from n0, decoded for 64 inputs from k0 into a (parts x 2 chunks of 16 x 32 bf16) */
static inline void amx_decode_lut4(const uint8_t *w, int64_t K, int64_t n0, int64_t k0, const __m512i *tables,
                                   int parts, uint16_t *a) {
    for (int r = 0; r < AMX_ROWS; r++) {
        const uint8_t *src = w + (n0 + r) * (K / 2) + k0 / 2;
        _mm_prefetch((const char *)(src + AMX_AHEAD * (K / 2)), _MM_HINT_T0);
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
        const __m512i high = _mm512_srli_epi16(bytes, 4);  /* vpermw reads the low 5 bits: the 16 entries twice */
        for (int p = 0; p < parts; p++) {
            _mm512_store_si512(a + (p * 2 + 0) * 512 + r * 32, _mm512_permutexvar_epi16(high, tables[p]));
            _mm512_store_si512(a + (p * 2 + 1) * 512 + r * 32, _mm512_permutexvar_epi16(bytes, tables[p]));
        }
    }
}

static inline void amx_decode_int8(const int8_t *w, int64_t K, int64_t n0, int64_t k0, uint16_t *a) {
    for (int r = 0; r < AMX_ROWS; r++)
        for (int c = 0; c < 2; c++) {
            const int8_t *src = w + (n0 + r) * K + k0 + c * AMX_CHUNK;
            _mm_prefetch((const char *)(src + AMX_AHEAD * K), _MM_HINT_T0);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
            _mm512_store_si512(a + c * 512 + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
}

/* y (M, N, rows ldy apart) = x @ W^T (+ bias). lut4: codes (N, K / 2) with the 16-entry table code and per-block
 * scale (blocks of bs inputs, bs % 64 == 0), in `parts` bf16 parts (3: float32's precision, 2, 1: bf16's); else int8
 * (N, K) with row_scale (x in three parts: exact). N % 16 == 0, K % 64 == 0. 0 when it ran, -1 where AMX is not
 * granted. */
static int amx_product(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *codes, const float *code,
                       const float *scale, int64_t bs, int parts, const int8_t *int8, const float *row_scale,
                       int64_t N, const float *bias, float *y, int64_t ldy) {
    if (N % AMX_ROWS || K % 64 || (codes && bs % 64) || parts < 1 || parts > 3 || !amx_permitted()) return -1;
    const int lut4 = codes != NULL;
    if (!lut4) parts = 3;
    const int64_t groups = (M + 15) / 16, chunks = K / AMX_CHUNK, tile = AMX_ROWS * 32;
    uint16_t *xb = (uint16_t *)aligned_alloc(64, (size_t)(groups * parts * chunks * tile) * sizeof(uint16_t));
    amx_pack_x(x, M, K, ldx, lut4, parts, xb);
    __m512i tables[3];  /* the code table's bf16 parts, its 16 entries twice */
    if (lut4) {
        __m256bh split[3];
        split_parts(_mm512_loadu_ps(code), parts, split);
        for (int p = 0; p < parts; p++) {
            const __m256i t = (__m256i)split[p];
            tables[p] = _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);
        }
    }
    #pragma omp parallel
    {
        amx_configure();
        uint16_t *a = (uint16_t *)aligned_alloc(64, (size_t)(parts * 2 * 512) * sizeof(uint16_t));  /* parts x 2 chunks */
        float *c = (float *)aligned_alloc(64, 256 * sizeof(float));
        float *acc = (float *)aligned_alloc(64, (size_t)(groups * 256) * sizeof(float));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t n0 = 0; n0 < N; n0 += AMX_ROWS) {
            memset(acc, 0, (size_t)(groups * 256) * sizeof(float));
            for (int64_t k0 = 0; k0 < K; k0 += 64) {  /* a block of 64 inputs: two chunks */
                if (lut4) amx_decode_lut4(codes, K, n0, k0, tables, parts, a);
                else amx_decode_int8(int8, K, n0, k0, a);
                for (int64_t g = 0; g < groups; g++) {
                    _tile_zero(6);
                    for (int h = 0; h < 2; h++) {
                        /* the products of W's part i (tile i) and x's part j (tile 3 + j) with i + j < parts; int8's
                         * W has one part. Tile numbers are immediates, hence the branches. */
                        const uint16_t *xg = xb + (g * parts * chunks + k0 / AMX_CHUNK + h) * tile;
                        _tile_loadd(3, xg, 64);
                        _tile_loadd(0, a + (0 * 2 + h) * 512, 64);
                        _tile_dpbf16ps(6, 0, 3);
                        if (parts > 1) {
                            _tile_loadd(4, xg + chunks * tile, 64);
                            _tile_dpbf16ps(6, 0, 4);
                            if (lut4) {
                                _tile_loadd(1, a + (1 * 2 + h) * 512, 64);
                                _tile_dpbf16ps(6, 1, 3);
                            }
                        }
                        if (parts > 2) {
                            _tile_loadd(5, xg + 2 * chunks * tile, 64);
                            _tile_dpbf16ps(6, 0, 5);
                            if (lut4) {
                                _tile_loadd(2, a + (2 * 2 + h) * 512, 64);
                                _tile_dpbf16ps(6, 1, 4);
                                _tile_dpbf16ps(6, 2, 3);
                            }
                        }
                    }
                    _tile_stored(6, c, 64);  /* c[r][m]: output row n0 + r, input row 16g + m */
                    float *ag = acc + g * 256;
                    for (int r = 0; r < AMX_ROWS; r++) {
                        const float s = lut4 ? scale[(n0 + r) * (K / bs) + k0 / bs] : 1.0f;
                        _mm512_store_ps(ag + r * 16, _mm512_fmadd_ps(_mm512_load_ps(c + r * 16), _mm512_set1_ps(s),
                                                                     _mm512_load_ps(ag + r * 16)));
                    }
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < AMX_ROWS; r++) {
                    const float sum = acc[(m / 16) * 256 + r * 16 + m % 16];
                    y[m * ldy + n0 + r] = (lut4 ? sum : sum * row_scale[n0 + r]) + (bias ? bias[n0 + r] : 0.0f);
                }
        }
        free(acc);
        free(c);
        free(a);
        _tile_release();
    }
    free(xb);
    return 0;
}
#endif
