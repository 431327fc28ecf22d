// Few-row float32 matrix product for decoding on AVX-512 CPUs: out = x @ weight.T + bias for x of 1 to a few dozen
// rows, streaming a weight packed once into panels of 32 output columns (packed[p][k][c] = weight[32p + c][k]).
// Each output sums its inputs in chunks of 64 (one fused multiply-add chain each, then added in order): the same
// order for every row, so a row's result does not depend on the other rows, and a rounding error below F.linear's.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack", &pack, "pack a [out, in] float32 weight into panels of 32 output columns");
    m.def("linear", &linear, "input @ weight.T + bias with a packed weight");
}
