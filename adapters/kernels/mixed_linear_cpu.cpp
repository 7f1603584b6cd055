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
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct Dims {
  int64_t tokens, row_len, in, out, slots, k, s, n, m;
};

// One token's update, added into its output row:
//   U[j] = scale * C @ (A[j] @ X), X = x viewed (n, s);   out[p*s + a] += sum_j B[p, j] * U[j, a]
// The generic path reads s at run time (any kernel, any compiler). u: k*s + s floats of scratch.
template <typename T>
void add_update_any(const T* xt, const T* a, const T* b, const T* c, float sc, T* ot, float* u, const Dims& d) {
  const int64_t s = d.s;
  float* z = u + d.k * s;
  for (int64_t j = 0; j < d.k; ++j) {
    std::fill(z, z + s, 0.0f);
    for (int64_t q = 0; q < d.n; ++q) {
      const float aq = static_cast<float>(a[j * d.n + q]);
      for (int64_t col = 0; col < s; ++col) z[col] += aq * static_cast<float>(xt[q * s + col]);
    }
    for (int64_t row = 0; row < s; ++row) {
      float acc = 0.0f;
      for (int64_t col = 0; col < s; ++col) acc += static_cast<float>(c[row * s + col]) * z[col];
      u[j * s + row] = sc * acc;
    }
  }
  for (int64_t p = 0; p < d.m; ++p) {
    for (int64_t j = 0; j < d.k; ++j) {
      const float bpj = static_cast<float>(b[p * d.k + j]);
      for (int64_t col = 0; col < s; ++col)
        ot[p * s + col] = static_cast<T>(static_cast<float>(ot[p * s + col]) + bpj * u[j * s + col]);
    }
  }
}

template <typename T>
using UpdateFn = void (*)(const T*, const T*, const T*, const T*, float, T*, float*, const Dims&);

#if defined(__GNUC__)
// The common kernels (s of 4, 8, 16), one s-wide row of X, Z, U or out per vector (GCC/Clang vector
// extensions). Left to vectorise plain loops, the compiler shuffled lanes: 1.3x slower than these on the
// baseline ISA, 3-4x slower than these built for AVX2+FMA. Z's sum over q runs as LANES independent
// chains, so the adds do not wait on one another's latency.
constexpr int LANES = 4;

template <int S>
struct Row {
  typedef float type __attribute__((vector_size(S * sizeof(float))));
};

template <int S, typename T>
[[gnu::always_inline]] inline typename Row<S>::type load_row(const T* p) {
  typename Row<S>::type v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int i = 0; i < S; ++i) v[i] = static_cast<float>(p[i]);
  }
  return v;
}

template <int S, typename T>
[[gnu::always_inline]] inline void store_row(T* p, typename Row<S>::type v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int i = 0; i < S; ++i) p[i] = static_cast<T>(v[i]);
  }
}

template <typename T, int S>
[[gnu::always_inline]] inline void update_rows(const T* xt, const T* a, const T* b, const T* c, float sc, T* ot,
                                                float* u, const Dims& d) {
  using V = typename Row<S>::type;
  for (int64_t j = 0; j < d.k; ++j) {
    const T* aj = a + j * d.n;
    V lane[LANES] = {};
    int64_t q = 0;
    for (; q + LANES <= d.n; q += LANES)
      for (int l = 0; l < LANES; ++l) lane[l] += static_cast<float>(aj[q + l]) * load_row<S>(xt + (q + l) * S);
    for (; q < d.n; ++q) lane[0] += static_cast<float>(aj[q]) * load_row<S>(xt + q * S);
    const V z = (lane[0] + lane[1]) + (lane[2] + lane[3]);
    V uj = {};
    for (int col = 0; col < S; ++col) {
      for (int row = 0; row < S; ++row) uj[row] += static_cast<float>(c[row * S + col]) * z[col];
    }
    store_row<S>(u + j * S, sc * uj);
  }
  for (int64_t p = 0; p < d.m; ++p) {
    V add = {};
    for (int64_t j = 0; j < d.k; ++j) add += static_cast<float>(b[p * d.k + j]) * load_row<S>(u + j * S);
    store_row<S>(ot + p * S, load_row<S>(ot + p * S) + add);
  }
}

// The same code built twice: for the baseline ISA, and for AVX2 + FMA, the one picked where the CPU has
// them (a 3-4x faster update than the baseline's SSE2; the wheel-style build cannot assume them).
template <typename T, int S>
void update_rows_baseline(const T* xt, const T* a, const T* b, const T* c, float sc, T* ot, float* u, const Dims& d) {
  update_rows<T, S>(xt, a, b, c, sc, ot, u, d);
}

#if defined(__x86_64__)
template <typename T, int S>
__attribute__((target("avx2,fma"))) void update_rows_avx2(const T* xt, const T* a, const T* b, const T* c, float sc,
                                                           T* ot, float* u, const Dims& d) {
  update_rows<T, S>(xt, a, b, c, sc, ot, u, d);
}
#endif
#endif

template <typename T, int S>
UpdateFn<T> pick_update() {
#if defined(__GNUC__)
  if constexpr (S > 0) {
#if defined(__x86_64__)
    static const bool wide = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (wide) return &update_rows_avx2<T, S>;
#endif
    return &update_rows_baseline<T, S>;
  }
#endif
  return &add_update_any<T>;
}

template <typename T, int S>
void add_updates(const T* x, const int64_t* slots, const T* A, const T* B, const T* C, const T* scale, T* out,
                 const Dims& d) {
  // A token's update is ~in + out multiply-adds: split across threads only in chunks worth a wake-up.
  const int64_t grain = std::max<int64_t>(1, 16384 / (d.in + d.out));
  const UpdateFn<T> add_update = pick_update<T, S>();
  at::parallel_for(0, d.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> u((d.k + 1) * d.s);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t / d.row_len];
      if (slot == 0) continue;
      add_update(x + t * d.in, A + slot * d.k * d.n, B + slot * d.m * d.k, C + slot * d.s * d.s,
                 static_cast<float>(scale[slot]), out + t * d.out, u.data(), d);
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

// The eager call from Python, past the dispatcher's boxed call: parsing nine arguments against the
// schema and boxing them cost ~4.7 us a layer (1.5% of a one-row SmolLM2 decode step on the CPU); this
// binding costs ~0.3. It takes the fast path only where the dispatcher would run this very kernel and
// nothing else: plain CPU tensors, no dispatch mode (fake tensors, the dispatch counters), no gradient
// to record. Anything else goes through the dispatcher, as the registered op would.
at::Tensor mixed_linear_from_python(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& A_bank, const at::Tensor& B_bank, const at::Tensor& C_bank,
                                    const at::Tensor& scale_bank, const at::Tensor& slots, bool weight_transposed) {
  const c10::DispatchKeySet subclass{c10::DispatchKey::Python};
  const bool plain = x.is_cpu() && weight.is_cpu() && !c10::impl::dispatch_mode_enabled() &&
                     !x.key_set().has_any(subclass) && !weight.key_set().has_any(subclass) &&
                     !(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad()));
  if (plain) {
    RECORD_FUNCTION("dcft::mixed_linear", std::vector<c10::IValue>());  // the profiler still sees one op
    return mixed_linear_cpu(x, weight, bias, A_bank, B_bank, C_bank, scale_bank, slots, weight_transposed);
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dcft::mixed_linear", "")
                             .typed<decltype(mixed_linear_cpu)>();
  return op.call(x, weight, bias, A_bank, B_bank, C_bank, scale_bank, slots, weight_transposed);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcft, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mixed_linear", &mixed_linear_from_python, "dcft::mixed_linear from eager Python, past the boxed call");
}
