// Float32 kernels for the decoding steps of captioning on AVX-512 CPUs (modeling_mico/decoding_kernels.py).
//
// linear: out = x @ weight.T + bias for x of 1 to a few dozen rows, streaming a weight packed once into panels of 32
// output columns (packed[p][k][c] = weight[32p + c][k]).
// Each output sums its inputs in chunks of 64 (one fused multiply-add chain each, then added in order): the same
// order for every row, so a row's result does not depend on the other rows, and a rounding error below F.linear's.
//
// attention: softmax(q k^T * scale) v for a few query rows over a long, never masked context (cross-attention to the
// multimodal context), reading every key and value once for all the rows of a head.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kPanel = 32;  // output columns per panel: two 16-float registers
constexpr int64_t kMaxRows = 6;  // rows per register block: totals and chunk sums take 24 of the 32 registers
constexpr int64_t kChunk = 64;  // inputs summed apart before joining the total (bounds the rounding error)

template <int Rows>
void panel_block(const float* x, int64_t x_stride, const float* panel, int64_t k_size, const float* bias,
                 float* out, int64_t out_stride, int64_t columns) {
    __m512 acc[Rows][2], part[Rows][2];
    for (int r = 0; r < Rows; ++r) {
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    }
    for (int64_t start = 0; start < k_size; start += kChunk) {
        for (int r = 0; r < Rows; ++r) {
            part[r][0] = part[r][1] = _mm512_setzero_ps();
        }
        const int64_t stop = std::min(start + kChunk, k_size);
        for (int64_t k = start; k < stop; ++k) {
            const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel);
            const __m512 w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
            for (int r = 0; r < Rows; ++r) {
                const __m512 xv = _mm512_set1_ps(x[r * x_stride + k]);
                part[r][0] = _mm512_fmadd_ps(xv, w0, part[r][0]);
                part[r][1] = _mm512_fmadd_ps(xv, w1, part[r][1]);
            }
        }
        for (int r = 0; r < Rows; ++r) {
            acc[r][0] = _mm512_add_ps(acc[r][0], part[r][0]);
            acc[r][1] = _mm512_add_ps(acc[r][1], part[r][1]);
        }
    }
    const __mmask16 mask0 = columns >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << columns) - 1);
    const __mmask16 mask1 = columns >= 32 ? 0xFFFF : columns <= 16 ? 0 : static_cast<__mmask16>((1u << (columns - 16)) - 1);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < Rows; ++r) {
        _mm512_mask_storeu_ps(out + r * out_stride, mask0, _mm512_add_ps(acc[r][0], b0));
        _mm512_mask_storeu_ps(out + r * out_stride + 16, mask1, _mm512_add_ps(acc[r][1], b1));
    }
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t);
constexpr BlockFn kBlocks[kMaxRows] = {panel_block<1>, panel_block<2>, panel_block<3>,
                                       panel_block<4>, panel_block<5>, panel_block<6>};

}  // namespace

torch::Tensor pack(const torch::Tensor& weight) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat && weight.device().is_cpu(),
                "pack: weight must be a 2-D float32 CPU tensor, got ", weight.sizes(), " ", weight.scalar_type());
    const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
    auto padded = torch::constant_pad_nd(weight.detach(), {0, 0, 0, panels * kPanel - n});
    return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                     int64_t out_features) {
    TORCH_CHECK(input.scalar_type() == torch::kFloat && input.device().is_cpu(), "linear: input must be float32 on CPU");
    TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                    packed.scalar_type() == torch::kFloat && packed.size(0) * kPanel >= out_features &&
                    out_features > (packed.size(0) - 1) * kPanel,
                "linear: packed must come from pack() of a weight with ", out_features, " outputs");
    const int64_t k_size = packed.size(1);
    TORCH_CHECK(input.size(-1) == k_size, "linear: input has ", input.size(-1), " features, the weight ", k_size);
    TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == out_features && bias->is_contiguous() &&
                                      bias->scalar_type() == torch::kFloat),
                "linear: bias must be a contiguous float32 vector of ", out_features);
    const auto x = input.reshape({-1, k_size}).contiguous();
    const int64_t rows = x.size(0), panels = packed.size(0);
    auto out_shape = input.sizes().vec();
    out_shape.back() = out_features;
    auto out = torch::empty({rows, out_features}, x.options());
    const float* x_data = x.data_ptr<float>();
    const float* w_data = packed.data_ptr<float>();
    const float* b_data = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    float* o_data = out.data_ptr<float>();
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            const int64_t column = p * kPanel, columns = std::min(kPanel, out_features - column);
            for (int64_t row = 0; row < rows; row += kMaxRows) {
                const int64_t block = std::min(kMaxRows, rows - row);
                kBlocks[block - 1](x_data + row * k_size, k_size, w_data + p * k_size * kPanel, k_size,
                                   b_data ? b_data + column : nullptr, o_data + row * out_features + column,
                                   out_features, columns);
            }
        }
    });
    return out.view(out_shape);
}


namespace {

constexpr int64_t kMaxHeadChunks = 8;  // head dimension up to 128: eight 16-float registers
constexpr int64_t kAttentionRows = 6;  // query rows accumulated together over the values

__mmask16 chunk_mask(int64_t dim, int64_t chunk) {
    const int64_t left = dim - 16 * chunk;
    return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
}

// Chunk `c` of a head vector: a plain load but for a partial last chunk (masked loads are much slower on AMD Zen 4).
template <int Chunks, bool Partial>
__m512 load_chunk(const float* vector, int c, __mmask16 last_mask) {
    if (Partial && c == Chunks - 1) return _mm512_maskz_loadu_ps(last_mask, vector + 16 * c);
    return _mm512_loadu_ps(vector + 16 * c);
}

// Scores of every query row against every key (each key read once), softmax per row in place; the head vectors are
// `Chunks` registers of 16 floats (the last one masked when the head dimension is not a multiple of 16).
template <int Chunks, bool Partial>
void attention_scores(const float* query, int64_t rows, const float* keys, int64_t key_stride, int64_t length,
                      int64_t dim, float scale, float* scores) {
    const __mmask16 last = chunk_mask(dim, Chunks - 1);
    for (int64_t j = 0; j < length; ++j) {
        __m512 key[Chunks];
        for (int c = 0; c < Chunks; ++c) key[c] = load_chunk<Chunks, Partial>(keys + j * key_stride, c, last);
        for (int64_t i = 0; i < rows; ++i) {
            __m512 dot = _mm512_setzero_ps();
            for (int c = 0; c < Chunks; ++c) {
                dot = _mm512_fmadd_ps(load_chunk<Chunks, Partial>(query + i * dim, c, last), key[c], dot);
            }
            scores[i * length + j] = _mm512_reduce_add_ps(dot) * scale;
        }
    }
    using Vec = at::vec::Vectorized<float>;
    for (int64_t i = 0; i < rows; ++i) {
        float* row = scores + i * length;
        float max = -INFINITY;
        for (int64_t j = 0; j < length; ++j) max = std::max(max, row[j]);
        Vec sums(0.f);
        int64_t j = 0;
        for (; j + Vec::size() <= length; j += Vec::size()) {
            const Vec e = (Vec::loadu(row + j) - Vec(max)).exp_u20();
            e.store(row + j);
            sums = sums + e;
        }
        float lanes[Vec::size()];
        sums.store(lanes);
        float sum = 0;
        for (float lane : lanes) sum += lane;
        for (; j < length; ++j) {
            row[j] = std::exp(row[j] - max);
            sum += row[j];
        }
        const float inverse = 1.f / sum;
        for (j = 0; j < length; ++j) row[j] *= inverse;
    }
}

// out rows = probabilities @ values, every value read once per block of kAttentionRows rows.
template <int Chunks, bool Partial>
void attention_values(const float* probabilities, int64_t rows, const float* values, int64_t value_stride,
                      int64_t length, int64_t dim, float* out) {
    const __mmask16 last = chunk_mask(dim, Chunks - 1);
    for (int64_t first = 0; first < rows; first += kAttentionRows) {
        const int64_t block = std::min(kAttentionRows, rows - first);
        __m512 acc[kAttentionRows][Chunks];
        for (int r = 0; r < kAttentionRows; ++r) {
            for (int c = 0; c < Chunks; ++c) acc[r][c] = _mm512_setzero_ps();
        }
        for (int64_t j = 0; j < length; ++j) {
            __m512 value[Chunks];
            for (int c = 0; c < Chunks; ++c) value[c] = load_chunk<Chunks, Partial>(values + j * value_stride, c, last);
            for (int r = 0; r < kAttentionRows; ++r) {
                if (r < block) {
                    const __m512 p = _mm512_set1_ps(probabilities[(first + r) * length + j]);
                    for (int c = 0; c < Chunks; ++c) acc[r][c] = _mm512_fmadd_ps(p, value[c], acc[r][c]);
                }
            }
        }
        for (int64_t r = 0; r < block; ++r) {
            for (int c = 0; c < Chunks; ++c) {
                _mm512_mask_storeu_ps(out + (first + r) * dim + 16 * c, c == Chunks - 1 ? last : 0xFFFF, acc[r][c]);
            }
        }
    }
}

template <int Chunks, bool Partial>
void attend_head(const float* query, int64_t rows, const float* keys, int64_t key_stride, const float* values,
                 int64_t value_stride, int64_t length, int64_t dim, float scale, float* scores, float* out) {
    attention_scores<Chunks, Partial>(query, rows, keys, key_stride, length, dim, scale, scores);
    attention_values<Chunks, Partial>(scores, rows, values, value_stride, length, dim, out);
}

using HeadFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, int64_t, int64_t, int64_t, float,
                        float*, float*);
// by [partial last chunk][chunks - 1]
constexpr HeadFn kHeads[2][kMaxHeadChunks] = {
    {attend_head<1, false>, attend_head<2, false>, attend_head<3, false>, attend_head<4, false>,
     attend_head<5, false>, attend_head<6, false>, attend_head<7, false>, attend_head<8, false>},
    {attend_head<1, true>, attend_head<2, true>, attend_head<3, true>, attend_head<4, true>, attend_head<5, true>,
     attend_head<6, true>, attend_head<7, true>, attend_head<8, true>}};

}  // namespace

torch::Tensor attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                        double scale) {
    TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "attention: query, key and value must be 4-D");
    for (const auto* tensor : {&query, &key, &value}) {
        TORCH_CHECK(tensor->scalar_type() == torch::kFloat && tensor->device().is_cpu(),
                    "attention: query, key and value must be float32 on CPU");
    }
    const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2), dim = query.size(3);
    const int64_t length = key.size(2);
    TORCH_CHECK(dim > 0 && dim <= 16 * kMaxHeadChunks, "attention: head dimension ", dim, " outside 1..", 16 * kMaxHeadChunks);
    TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == batch && key.size(1) == heads && key.size(3) == dim,
                "attention: key and value must be (", batch, ", ", heads, ", length, ", dim, "), got ", key.sizes(),
                " and ", value.sizes());
    TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1, "attention: key and value need contiguous head vectors");
    const auto q = query.contiguous();
    auto out = torch::empty({batch, heads, rows, dim}, q.options());
    const float* q_data = q.data_ptr<float>();
    const float* k_data = key.data_ptr<float>();
    const float* v_data = value.data_ptr<float>();
    float* o_data = out.data_ptr<float>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(rows * length);
        for (int64_t index = begin; index < end; ++index) {
            const int64_t b = index / heads, h = index % heads;
            const float* keys = k_data + b * key.stride(0) + h * key.stride(1);
            const float* values = v_data + b * value.stride(0) + h * value.stride(1);
            kHeads[dim % 16 != 0][(dim + 15) / 16 - 1](q_data + index * rows * dim, rows, keys, key.stride(2), values, value.stride(2),
                                        length, dim, static_cast<float>(scale), scores.data(),
                                        o_data + index * rows * dim);
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack", &pack, "pack a [out, in] float32 weight into panels of 32 output columns");
    m.def("linear", &linear, "input @ weight.T + bias with a packed weight");
    m.def("attention", &attention, "softmax(query key^T * scale) value for a few query rows");
}
