// The CPU kernel of `dcft::mixed_linear` (adapters/kernels/ops.py): the frozen layer's GEMM, then
// each token's DCFT update added in place, its slot's A, B, C and scale read straight from the banks.
// One dispatched op per wrapped layer: in eager mode the per-op host cost (~2-3 us each), not the
// math, is what a mixed layer paid on top of the bare one (27 ops per layer before this kernel).
//
// Shapes (N tokens, S bank slots, k rank, s kernel, n = in/s, m = out/s; stride == kernel):
//   x: (..., in)   weight: (out, in), or (in, out) when weight_transposed (GPT-2's Conv1D)
//   A_bank: (S, k, n)   B_bank: (S, m, k)   C_bank: (S, s, s)   scale_bank: (S,)
//   slots: (R,) long, R dividing N: token t uses slot slots[t / (N / R)]; slot 0 (the bare
//   backbone) is skipped, so rows without an adapter cost the bare GEMM alone.
//   u[j*s + a] = scale * sum_b C[a, b] * sum_q A[j, q] * x[q*s + b]
//   out[p*s + a] = x @ W^T + bias + sum_j B[p, j] * u[j*s + a]
// adapters/functional.py is the reference the tests hold this kernel to.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace {

struct Dims {
  int64_t tokens, row_len, in, out, slots, k, s, n, m;
};

// One token's update, added into its output row. S > 0 fixes the kernel size at compile time, so the
// loops over it unroll and vectorise (the common kernels); S == 0 reads it from `d`.
template <typename T, int S>
void add_update(const T* xt, const T* a, const T* b, const T* c, float sc, T* ot, float* z, float* u,
                const Dims& d) {
  const int64_t s = S > 0 ? S : d.s;
  std::fill(z, z + d.k * s, 0.0f);
  for (int64_t j = 0; j < d.k; ++j) {  // Z = A @ X, X = x viewed (n, s)
    float* zj = z + j * s;
    for (int64_t q = 0; q < d.n; ++q) {
      const float aq = static_cast<float>(a[j * d.n + q]);
      const T* xq = xt + q * s;
      for (int64_t col = 0; col < s; ++col) zj[col] += aq * static_cast<float>(xq[col]);
    }
  }
  for (int64_t j = 0; j < d.k; ++j) {  // U = scale * Z @ C^T
    for (int64_t row = 0; row < s; ++row) {
      float acc = 0.0f;
      for (int64_t col = 0; col < s; ++col) acc += static_cast<float>(c[row * s + col]) * z[j * s + col];
      u[j * s + row] = sc * acc;
    }
  }
  for (int64_t p = 0; p < d.m; ++p) {  // out[p*s + a] += sum_j B[p, j] * U[j, a]
    T* op = ot + p * s;
    for (int64_t j = 0; j < d.k; ++j) {
      const float bpj = static_cast<float>(b[p * d.k + j]);
      const float* uj = u + j * s;
      for (int64_t col = 0; col < s; ++col) op[col] = static_cast<T>(static_cast<float>(op[col]) + bpj * uj[col]);
    }
  }
}

template <typename T, int S>
void add_updates(const T* x, const int64_t* slots, const T* A, const T* B, const T* C, const T* scale, T* out,
                 const Dims& d) {
  // A token's update is ~in + out multiply-adds: split across threads only in chunks worth a wake-up.
  const int64_t grain = std::max<int64_t>(1, 16384 / (d.in + d.out));
  at::parallel_for(0, d.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> z(d.k * d.s), u(d.k * d.s);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t / d.row_len];
      if (slot == 0) continue;
      add_update<T, S>(x + t * d.in, A + slot * d.k * d.n, B + slot * d.m * d.k, C + slot * d.s * d.s,
                       static_cast<float>(scale[slot]), out + t * d.out, z.data(), u.data(), d);
    }
  });
}

template <typename T>
void add_updates_for_kernel(const T* x, const int64_t* slots, const T* A, const T* B, const T* C, const T* scale,
                            T* out, const Dims& d) {
  switch (d.s) {
    case 4: return add_updates<T, 4>(x, slots, A, B, C, scale, out, d);
    case 8: return add_updates<T, 8>(x, slots, A, B, C, scale, out, d);
    case 16: return add_updates<T, 16>(x, slots, A, B, C, scale, out, d);
    default: return add_updates<T, 0>(x, slots, A, B, C, scale, out, d);
  }
}

// The bank in x's dtype, contiguous. Checked here first: each avoided call is a dispatch saved per layer.
at::Tensor like(const at::Tensor& bank, const at::Tensor& x) {
  const at::Tensor dense = bank.contiguous();  // no dispatch when it already is
  return dense.scalar_type() == x.scalar_type() ? dense : dense.to(x.scalar_type());
}

at::Tensor mixed_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& A_bank, const at::Tensor& B_bank, const at::Tensor& C_bank,
                            const at::Tensor& scale_bank, const at::Tensor& slots, bool weight_transposed) {
  const int64_t in = x.size(-1);
  const int64_t out_features = weight_transposed ? weight.size(1) : weight.size(0);
  const at::Tensor flat = x.dim() == 2 && x.is_contiguous() ? x : x.reshape({-1, in}).contiguous();
  at::Tensor out = weight_transposed
      ? (bias.has_value() ? at::addmm(*bias, flat, weight) : at::mm(flat, weight))
      : at::linear(flat, weight, bias);
  Dims d{flat.size(0), 0, in, out_features, A_bank.size(0), A_bank.size(1), C_bank.size(-1), A_bank.size(2),
         B_bank.size(1)};
  TORCH_CHECK(slots.scalar_type() == at::kLong, "dcft.mixed_linear: slots must be int64");
  TORCH_CHECK(slots.numel() > 0 && d.tokens % slots.numel() == 0, "dcft.mixed_linear: ", slots.numel(),
              " slots do not divide ", d.tokens, " tokens");
  TORCH_CHECK(d.n * d.s == in && d.m * d.s == out_features, "dcft.mixed_linear: banks of kernel ", d.s,
              " and grid (", d.m, ", ", d.n, ") do not fit a layer of in ", in, ", out ", out_features);
  d.row_len = d.tokens / slots.numel();
  const at::Tensor slot_of_row = slots.contiguous();
  const int64_t* slot_ptr = slot_of_row.data_ptr<int64_t>();
  for (int64_t r = 0; r < slot_of_row.numel(); ++r) {
    TORCH_CHECK(slot_ptr[r] >= 0 && slot_ptr[r] < d.slots, "dcft.mixed_linear: slot ", slot_ptr[r],
                " is outside the bank's ", d.slots, " slots");
  }
  const at::Tensor A = like(A_bank, x), B = like(B_bank, x), C = like(C_bank, x), scale = like(scale_bank, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dcft_mixed_linear_cpu", [&] {
    add_updates_for_kernel<scalar_t>(flat.data_ptr<scalar_t>(), slot_ptr, A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                          C.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
  });
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcft, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }
