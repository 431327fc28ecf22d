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

// out (rows x out_features, contiguous) = x (rows x k, contiguous) @ weight.T + bias, the weight packed by pack().
void linear_into(const float* x_data, int64_t rows, const torch::Tensor& packed, const float* b_data,
                 int64_t out_features, float* o_data) {
    const int64_t k_size = packed.size(1), panels = packed.size(0);
    const float* w_data = packed.data_ptr<float>();
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
}

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
    auto out_shape = input.sizes().vec();
    out_shape.back() = out_features;
    auto out = torch::empty({x.size(0), out_features}, x.options());
    linear_into(x.data_ptr<float>(), x.size(0), packed, bias.has_value() ? bias->data_ptr<float>() : nullptr,
                out_features, out.data_ptr<float>());
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

// Which keys a query row may see: all (the context), or those up to `causal_offset + row` and, with `data`, those
// where data[row * row_stride + key * key_stride] is true (a decoding step's self-attention).
struct KeyMask {
    int64_t causal_offset = -1;  // < 0: no causal limit
    const bool* data = nullptr;
    int64_t row_stride = 0, key_stride = 0;

    bool hides(int64_t row, int64_t key) const {
        return (causal_offset >= 0 && key > causal_offset + row) ||
               (data != nullptr && !data[row * row_stride + key * key_stride]);
    }
};

// Scores of every query row (`query_stride` floats apart) against every key (each key read once), softmax per row in
// place (a row that sees no key gets zeros); the head vectors are `Chunks` registers of 16 floats (the last one
// masked when the head dimension is not a multiple of 16).
template <int Chunks, bool Partial>
void attention_scores(const float* query, int64_t query_stride, int64_t rows, const float* keys, int64_t key_stride,
                      int64_t length, int64_t dim, float scale, const KeyMask& mask, float* scores) {
    const __mmask16 last = chunk_mask(dim, Chunks - 1);
    for (int64_t j = 0; j < length; ++j) {
        __m512 key[Chunks];
        for (int c = 0; c < Chunks; ++c) key[c] = load_chunk<Chunks, Partial>(keys + j * key_stride, c, last);
        for (int64_t i = 0; i < rows; ++i) {
            __m512 dot = _mm512_setzero_ps();
            for (int c = 0; c < Chunks; ++c) {
                dot = _mm512_fmadd_ps(load_chunk<Chunks, Partial>(query + i * query_stride, c, last), key[c], dot);
            }
            scores[i * length + j] = _mm512_reduce_add_ps(dot) * scale;
        }
    }
    if (mask.causal_offset >= 0 || mask.data != nullptr) {
        for (int64_t i = 0; i < rows; ++i) {
            for (int64_t j = 0; j < length; ++j) {
                if (mask.hides(i, j)) scores[i * length + j] = -INFINITY;
            }
        }
    }
    using Vec = at::vec::Vectorized<float>;
    for (int64_t i = 0; i < rows; ++i) {
        float* row = scores + i * length;
        float max = -INFINITY;
        for (int64_t j = 0; j < length; ++j) max = std::max(max, row[j]);
        if (max == -INFINITY) {
            std::fill(row, row + length, 0.f);
            continue;
        }
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

// out rows (`out_stride` floats apart) = probabilities @ values, every value read once per block of kAttentionRows
// rows.
template <int Chunks, bool Partial>
void attention_values(const float* probabilities, int64_t rows, const float* values, int64_t value_stride,
                      int64_t length, int64_t dim, float* out, int64_t out_stride) {
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
                _mm512_mask_storeu_ps(out + (first + r) * out_stride + 16 * c, c == Chunks - 1 ? last : 0xFFFF,
                                      acc[r][c]);
            }
        }
    }
}

// One head: `rows` query rows over `length` keys/values.
struct HeadTask {
    const float* query;
    int64_t query_stride, rows;
    const float* keys;
    int64_t key_stride;
    const float* values;
    int64_t value_stride, length;
    KeyMask mask;
    float* out;
    int64_t out_stride;
};

template <int Chunks, bool Partial>
void attend_head(const HeadTask& task, int64_t dim, float scale, float* scores) {
    attention_scores<Chunks, Partial>(task.query, task.query_stride, task.rows, task.keys, task.key_stride,
                                      task.length, dim, scale, task.mask, scores);
    attention_values<Chunks, Partial>(scores, task.rows, task.values, task.value_stride, task.length, dim, task.out,
                                      task.out_stride);
}

using HeadFn = void (*)(const HeadTask&, int64_t, float, float*);
// by [partial last chunk][chunks - 1]
constexpr HeadFn kHeads[2][kMaxHeadChunks] = {
    {attend_head<1, false>, attend_head<2, false>, attend_head<3, false>, attend_head<4, false>,
     attend_head<5, false>, attend_head<6, false>, attend_head<7, false>, attend_head<8, false>},
    {attend_head<1, true>, attend_head<2, true>, attend_head<3, true>, attend_head<4, true>, attend_head<5, true>,
     attend_head<6, true>, attend_head<7, true>, attend_head<8, true>}};

// Every task of `task_at(0 .. count - 1)`, spread over the threads.
template <typename TaskAt>
void attend_heads(int64_t count, int64_t dim, float scale, const TaskAt& task_at) {
    const HeadFn head = kHeads[dim % 16 != 0][(dim + 15) / 16 - 1];
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores;
        for (int64_t index = begin; index < end; ++index) {
            const HeadTask task = task_at(index);
            scores.resize(task.rows * task.length);
            head(task, dim, scale, scores.data());
        }
    });
}

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
    attend_heads(batch * heads, dim, static_cast<float>(scale), [&](int64_t index) {
        const int64_t b = index / heads, h = index % heads;
        return HeadTask{q_data + index * rows * dim, dim, rows,
                        k_data + b * key.stride(0) + h * key.stride(1), key.stride(2),
                        v_data + b * value.stride(0) + h * value.stride(1), value.stride(2), length,
                        KeyMask{}, o_data + index * rows * dim, dim};
    });
    return out;
}

// One decoding step of the text tower's layers (BERT layers with cross-attention, GELU, post-LayerNorm): the few new
// token rows of every caption or beam through every layer without returning to Python. Per layer, the weights are
// (in this order) the packed fused query/key/value product and its bias, the self-attention output product, bias and
// LayerNorm weight and bias, the cross-attention query product and bias, its output product, bias and LayerNorm, the
// intermediate product and bias, the output product, bias and LayerNorm. Products, cross-attention, GELU, the residual
// additions and LayerNorms compute what the layer modules compute with `linear`, `attention` and ATen, bit for bit;
// the self-attention over the cached keys/values is this file's kernel (SDPA's result within rounding).
class DecodingStep {
  public:
    static constexpr int64_t kTensorsPerLayer = 18;

    DecodingStep(std::vector<torch::Tensor> weights, int64_t heads, double eps)
        : weights_(std::move(weights)), heads_(heads), eps_(eps) {
        TORCH_CHECK(!weights_.empty() && weights_.size() % kTensorsPerLayer == 0, "DecodingStep: ",
                    kTensorsPerLayer, " tensors per layer expected, got ", weights_.size());
        for (const auto& tensor : weights_) {
            TORCH_CHECK(tensor.scalar_type() == torch::kFloat && tensor.is_contiguous() && tensor.device().is_cpu(),
                        "DecodingStep: weights must be contiguous float32 CPU tensors");
        }
        width_ = weights_[4].size(0);
        TORCH_CHECK(heads > 0 && width_ % heads == 0, "DecodingStep: width ", width_, " is not divisible by ", heads,
                    " heads");
        TORCH_CHECK(width_ / heads <= 16 * kMaxHeadChunks, "DecodingStep: head dimension above ",
                    16 * kMaxHeadChunks);
    }

    int64_t num_layers() const { return static_cast<int64_t>(weights_.size()) / kTensorsPerLayer; }

    // hidden: (rows, tokens, width) embeddings of the new tokens; mask: optional (rows, 1, tokens, past + tokens)
    // booleans (true = may attend) on top of causality; keys/values: per layer (rows, heads, past + tokens, head_dim)
    // views of the self-attention cache whose last `tokens` positions this step writes; context_keys/values: per layer
    // (items, heads, context, head_dim), items dividing rows.
    torch::Tensor forward(const torch::Tensor& hidden, const c10::optional<torch::Tensor>& mask,
                          const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                          const std::vector<torch::Tensor>& context_keys,
                          const std::vector<torch::Tensor>& context_values) const {
        const int64_t layers = num_layers();
        TORCH_CHECK(hidden.dim() == 3 && hidden.size(2) == width_ && hidden.scalar_type() == torch::kFloat,
                    "DecodingStep: hidden must be float32 (rows, tokens, ", width_, "), got ", hidden.sizes());
        TORCH_CHECK(static_cast<int64_t>(keys.size()) == layers && static_cast<int64_t>(values.size()) == layers &&
                        static_cast<int64_t>(context_keys.size()) == layers &&
                        static_cast<int64_t>(context_values.size()) == layers,
                    "DecodingStep: one cache entry per layer (", layers, ") expected");
        const int64_t rows = hidden.size(0), tokens = hidden.size(1), dim = width_ / heads_;
        const int64_t length = keys[0].size(2), past = length - tokens;
        TORCH_CHECK(past >= 0, "DecodingStep: the cache views must include the step's ", tokens, " positions");
        const int64_t items = context_keys[0].size(0);
        TORCH_CHECK(items > 0 && rows % items == 0, "DecodingStep: ", rows, " rows for ", items, " context items");
        for (int64_t layer = 0; layer < layers; ++layer) {
            for (const auto* cache : {&keys[layer], &values[layer]}) {
                TORCH_CHECK(cache->dim() == 4 && cache->size(0) == rows && cache->size(1) == heads_ &&
                                cache->size(2) == length && cache->size(3) == dim && cache->stride(3) == 1 &&
                                cache->scalar_type() == torch::kFloat,
                            "DecodingStep: self-attention cache of layer ", layer, " must be float32 (", rows, ", ",
                            heads_, ", ", length, ", ", dim, "), got ", cache->sizes());
            }
            for (const auto* cache : {&context_keys[layer], &context_values[layer]}) {
                TORCH_CHECK(cache->dim() == 4 && cache->size(0) == items && cache->size(1) == heads_ &&
                                cache->size(2) == context_keys[layer].size(2) && cache->size(3) == dim &&
                                cache->stride(3) == 1 && cache->scalar_type() == torch::kFloat,
                            "DecodingStep: context keys/values of layer ", layer, " must be float32 (", items, ", ",
                            heads_, ", context, ", dim, "), got ", cache->sizes());
            }
        }
        KeyMask self_mask;
        self_mask.causal_offset = past;
        if (mask.has_value()) {
            TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 4 && mask->size(0) == rows &&
                            mask->size(1) == 1 && mask->size(2) == tokens && mask->size(3) == length,
                        "DecodingStep: mask must be boolean (", rows, ", 1, ", tokens, ", ", length, "), got ",
                        mask->sizes());
            self_mask.row_stride = mask->stride(2);
            self_mask.key_stride = mask->stride(3);
        }
        const bool* mask_data = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
        const int64_t mask_batch_stride = mask.has_value() ? mask->stride(0) : 0;
        const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
        const int64_t width = width_, heads = heads_, token_rows = rows * tokens, per_item = rows / items * tokens;

        auto states = hidden.reshape({token_rows, width}).contiguous();
        auto mixed = torch::empty({token_rows, width}, states.options());
        for (int64_t layer = 0; layer < layers; ++layer) {
            const torch::Tensor* w = weights_.data() + layer * kTensorsPerLayer;
            // self-attention: fused query/key/value, the new keys/values written into the cache
            auto qkv = product(states, w[0], w[1]);
            const float* qkv_data = qkv.data_ptr<float>();
            const auto& key_cache = keys[layer];
            const auto& value_cache = values[layer];
            float* key_data = key_cache.data_ptr<float>();
            float* value_data = value_cache.data_ptr<float>();
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t t = 0; t < tokens; ++t) {
                    const float* source = qkv_data + (r * tokens + t) * 3 * width;
                    for (int64_t h = 0; h < heads; ++h) {
                        std::copy_n(source + width + h * dim, dim,
                                    key_data + r * key_cache.stride(0) + h * key_cache.stride(1) +
                                        (past + t) * key_cache.stride(2));
                        std::copy_n(source + 2 * width + h * dim, dim,
                                    value_data + r * value_cache.stride(0) + h * value_cache.stride(1) +
                                        (past + t) * value_cache.stride(2));
                    }
                }
            }
            float* mixed_data = mixed.data_ptr<float>();
            attend_heads(rows * heads, dim, scale, [&](int64_t index) {
                const int64_t r = index / heads, h = index % heads;
                KeyMask row_mask = self_mask;
                row_mask.data = mask_data ? mask_data + r * mask_batch_stride : nullptr;
                return HeadTask{qkv_data + r * tokens * 3 * width + h * dim, 3 * width, tokens,
                                key_data + r * key_cache.stride(0) + h * key_cache.stride(1), key_cache.stride(2),
                                value_data + r * value_cache.stride(0) + h * value_cache.stride(1),
                                value_cache.stride(2), length, row_mask, mixed_data + r * tokens * width + h * dim,
                                width};
            });
            states = residual_norm(product(mixed, w[2], w[3]), states, w[4], w[5]);
            // cross-attention: the rows of an item read its context keys/values together
            auto query = product(states, w[6], w[7]);
            const float* query_data = query.data_ptr<float>();
            const auto& context_key = context_keys[layer];
            const auto& context_value = context_values[layer];
            const float* context_key_data = context_key.data_ptr<float>();
            const float* context_value_data = context_value.data_ptr<float>();
            attend_heads(items * heads, dim, scale, [&](int64_t index) {
                const int64_t item = index / heads, h = index % heads;
                return HeadTask{query_data + item * per_item * width + h * dim, width, per_item,
                                context_key_data + item * context_key.stride(0) + h * context_key.stride(1),
                                context_key.stride(2),
                                context_value_data + item * context_value.stride(0) + h * context_value.stride(1),
                                context_value.stride(2), context_key.size(2), KeyMask{},
                                mixed_data + item * per_item * width + h * dim, width};
            });
            states = residual_norm(product(mixed, w[8], w[9]), states, w[10], w[11]);
            // feed-forward
            auto intermediate = product(states, w[12], w[13]);
            at::gelu_(intermediate);
            states = residual_norm(product(intermediate, w[14], w[15]), states, w[16], w[17]);
        }
        return states.view({rows, tokens, width});
    }

  private:
    static torch::Tensor product(const torch::Tensor& states, const torch::Tensor& packed, const torch::Tensor& bias) {
        auto out = torch::empty({states.size(0), bias.size(0)}, states.options());
        linear_into(states.data_ptr<float>(), states.size(0), packed, bias.data_ptr<float>(), bias.size(0),
                    out.data_ptr<float>());
        return out;
    }

    // LayerNorm(dense + residual), as `MiCoTextResidualOutput` computes it (dropout is the identity in inference)
    torch::Tensor residual_norm(torch::Tensor dense, const torch::Tensor& residual, const torch::Tensor& weight,
                                const torch::Tensor& bias) const {
        dense.add_(residual);
        return at::layer_norm(dense, {width_}, weight, bias, eps_);
    }

    std::vector<torch::Tensor> weights_;
    int64_t heads_, width_;
    double eps_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack", &pack, "pack a [out, in] float32 weight into panels of 32 output columns");
    m.def("linear", &linear, "input @ weight.T + bias with a packed weight");
    m.def("attention", &attention, "softmax(query key^T * scale) value for a few query rows");
    py::class_<DecodingStep>(m, "DecodingStep")
        .def(py::init<std::vector<torch::Tensor>, int64_t, double>())
        .def("num_layers", &DecodingStep::num_layers)
        .def("__call__", &DecodingStep::forward, "one decoding step of every layer");
}
