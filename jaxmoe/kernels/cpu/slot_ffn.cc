// One pool slot's whole expert for XLA's CPU backend, reading the slot's weights in place:
//   SwiGLU  y = (silu(x w_in[slot]) * (x w_gate[slot])) w_out[slot]
//   ReLU    y = relu(x w_in[slot]) w_out[slot]
//
// XLA:CPU copies a dynamically indexed matmul operand out of its array before
// the product; for a decode step's few rows that copy costs as much as the
// product. This XLA FFI handler takes the whole pool leaves and the slot, and
// runs the expert's three (or two) products in one call.
//
//   x       f32 [R, D]     activations (few rows: decode chunks)
//   w_in    [X, D, F]      f32, or u16 holding bfloat16 bit patterns (as every weight)
//   w_gate  [X, D, F]      (w_in again for ReLU, unread)
//   w_out   [X, F, D]
//   slot    s32 [1]
//   y       f32 [R, D]
//   gated   attribute: 1 SwiGLU, 0 ReLU
//
// Every sum is float32 in a fixed order that depends on D and F only, so a
// row's result depends on that row and the slot, never on R or the other rows.
// Built at first use by jaxmoe/kernels/cpu/slot_ffn.py (g++ -O3 -march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;        // floats per vector
constexpr int kTile = 2 * kLanes;  // columns per register tile
constexpr int kRows = 4;          // rows per register tile
constexpr int kBlock = 16;        // weight rows per k block (kept in cache while every row uses them)

inline float scalar(float w) { return w; }
inline float scalar(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline f32x16 vector(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 vector(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Adds one k block (kb weight rows starting at w, row stride ldw) into R rows of y (row stride ldy), columns
// [j0, j1); x's rows are ldx apart.
template <typename W, int R>
void block_rows(const float* __restrict__ x, int64_t ldx, const W* __restrict__ w, int64_t ldw, float* __restrict__ y,
                int64_t ldy, int64_t kb, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + kTile <= j1; j += kTile) {
    f32x16 a0[R], a1[R];
    for (int r = 0; r < R; ++r) {
      a0[r] = vector(y + r * ldy + j);
      a1[r] = vector(y + r * ldy + j + kLanes);
    }
    for (int64_t i = 0; i < kb; ++i) {
      const f32x16 w0 = vector(w + i * ldw + j), w1 = vector(w + i * ldw + j + kLanes);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * ldx + i];
        a0[r] = a0[r] + xv * w0;
        a1[r] = a1[r] + xv * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(y + r * ldy + j, &a0[r], sizeof(f32x16));
      std::memcpy(y + r * ldy + j + kLanes, &a1[r], sizeof(f32x16));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t jj = j; jj < j1; ++jj) {
      float acc = y[r * ldy + jj];
      for (int64_t i = 0; i < kb; ++i) acc = acc + x[r * ldx + i] * scalar(w[i * ldw + jj]);
      y[r * ldy + jj] = acc;
    }
  }
}

// y[:, j0:j1] = x[:, :k] @ w[:k, j0:j1], with row strides ldx, ldw and ldy.
template <typename W>
void matmul(const float* x, int64_t ldx, const W* w, int64_t ldw, float* y, int64_t ldy, int64_t rows, int64_t k,
            int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < rows; ++r) std::memset(y + r * ldy + j0, 0, sizeof(float) * (j1 - j0));
  for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
    const int64_t kb = std::min<int64_t>(kBlock, k - k0);
    const W* wb = w + k0 * ldw;
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) {
      block_rows<W, kRows>(x + r * ldx + k0, ldx, wb, ldw, y + r * ldy, ldy, kb, j0, j1);
    }
    const float* xr = x + r * ldx + k0;
    float* yr = y + r * ldy;
    switch (rows - r) {
      case 0: break;
      case 1: block_rows<W, 1>(xr, ldx, wb, ldw, yr, ldy, kb, j0, j1); break;
      case 2: block_rows<W, 2>(xr, ldx, wb, ldw, yr, ldy, kb, j0, j1); break;
      default: block_rows<W, 3>(xr, ldx, wb, ldw, yr, ldy, kb, j0, j1); break;
    }
  }
}

inline f32x16 splat(float v) { return f32x16{} + v; }

// exp(v) to about an ulp in float32, 16 lanes: v = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial, times 2^n built in the exponent bits (n rounded to nearest by the 1.5 * 2^23 trick).
inline f32x16 exp_approx(f32x16 v) {
  v = v < -87.0f ? splat(-87.0f) : v;
  v = v > 88.0f ? splat(88.0f) : v;
  const f32x16 n = (v * 1.44269504f + 12582912.0f) - 12582912.0f;
  const f32x16 r = v - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts
  const f32x16 p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const u32x16 bits = (u32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
  f32x16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Each lane rounded to the nearest bfloat16 (ties to even), NaN kept.
inline f32x16 round_bf16(f32x16 f) {
  u32x16 b;
  std::memcpy(&b, &f, sizeof b);
  const u32x16 rounded = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
  b = (b & 0x7fffffffu) > 0x7f800000u ? b : rounded;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// act(a + b [, c + e]) on 16 lanes: SwiGLU's silu(a + b) * (c + e), or relu(a + b).
inline f32x16 activation(f32x16 a, f32x16 b, f32x16 c, f32x16 e, bool gated, bool bf16) {
  const f32x16 z = a + b;
  const f32x16 h = gated ? z / (1.0f + exp_approx(-z)) * (c + e) : (z > 0.0f ? z : splat(0.0f));
  return bf16 ? round_bf16(h) : h;
}

// h[j] = act(g0[j] + g1[j] [, u0[j] + u1[j]]) for j < n, into g0 (rounded to bfloat16 if asked); 16 lanes at a
// time, the last partial group through a padded copy.
void activate(float* g0, const float* g1, const float* u0, const float* u1, bool gated, bool bf16, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f32x16 h = activation(vector(g0 + j), vector(g1 + j), gated ? vector(u0 + j) : f32x16{},
                                gated ? vector(u1 + j) : f32x16{}, gated, bf16);
    std::memcpy(g0 + j, &h, sizeof h);
  }
  if (j < n) {
    float in[4][kLanes] = {};
    const int64_t m = n - j;
    for (int64_t i = 0; i < m; ++i) {
      in[0][i] = g0[j + i];
      in[1][i] = g1[j + i];
      in[2][i] = gated ? u0[j + i] : 0.0f;
      in[3][i] = gated ? u1[j + i] : 0.0f;
    }
    const f32x16 h = activation(vector(in[0]), vector(in[1]), vector(in[2]), vector(in[3]), gated, bf16);
    std::memcpy(in[0], &h, sizeof h);
    for (int64_t i = 0; i < m; ++i) g0[j + i] = in[0][i];
  }
}

// Two phases of parts, claimed by the calling thread and by a task on XLA's intra-op pool: every part of the
// first phase is done before any of the second starts. A thread waits only for parts another thread has
// claimed, so a task that starts late (or never) costs nothing but time; one that starts after the caller
// has returned finds no part left.
struct Phases {
  Phases(int64_t first, int64_t second) : count{first, second} {}
  const int64_t count[2];
  std::atomic<int64_t> next[2] = {0, 0};
  std::atomic<int64_t> done[2] = {0, 0};
  template <typename F, typename G>
  void work(const F& first, const G& second) {
    for (int64_t p; (p = next[0].fetch_add(1)) < count[0]; done[0].fetch_add(1)) first(p);
    while (done[0].load() < count[0]) std::this_thread::yield();
    for (int64_t p; (p = next[1].fetch_add(1)) < count[1]; done[1].fetch_add(1)) second(p);
  }
};

// One slot's expert: y = act(x w_in[slot] [, x w_gate[slot]]) w_out[slot], the gated form SwiGLU
// (silu(x w_in) * (x w_gate)), the other ReLU; the hidden activations h are rounded to bfloat16 before w_out
// when the weights are bfloat16, as the jnp experts round h to x's dtype. Every weight is read once, in
// contiguous runs of whole rows, in two parts (the second on XLA's intra-op pool):
//   phase 1, part p: rows [k_p, k_p+1) of w_in and w_gate -> partial sums of x w_in and x w_gate;
//   phase 2, part p: hidden columns [f_p, f_p+1): h = act(partial 0 + partial 1), and h's rows of w_out
//   -> share p of y;  y = share 0 + share 1.
// The splits depend on D and F only, so a row's bits depend on that row and the slot only.
template <ffi::DataType T>
ffi::Error ffn(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w_in, ffi::Buffer<T> w_gate,
               ffi::Buffer<T> w_out, ffi::Buffer<ffi::S32> slot, ffi::ResultBuffer<ffi::F32> y, int32_t gated) {
  const auto xd = x.dimensions();
  const auto id = w_in.dimensions();
  const auto od = w_out.dimensions();
  const bool shapes = xd.size() == 2 && id.size() == 3 && od.size() == 3 && xd[1] == id[1] && od[0] == id[0] &&
                      od[1] == id[2] && od[2] == xd[1] && w_gate.element_count() == w_in.element_count();
  if (!shapes) return ffi::Error::InvalidArgument("slot_ffn: x [R, D], w_in [X, D, F], w_out [X, F, D] do not match");
  const int64_t s = slot.typed_data()[0];
  if (s < 0 || s >= id[0]) return ffi::Error::InvalidArgument("slot_ffn: slot outside the pool");
  const int64_t rows = xd[0], d = xd[1], f = id[2];
  using W = ffi::NativeType<T>;
  constexpr bool kBf16 = sizeof(W) == 2;
  const float* xp = x.typed_data();
  const W* wi = w_in.typed_data() + s * d * f;
  const W* wg = gated ? w_gate.typed_data() + s * d * f : nullptr;
  const W* wo = w_out.typed_data() + s * f * d;
  float* yp = y->typed_data();
  thread_local std::vector<float> scratch;
  scratch.resize(4 * rows * f + rows * d);
  float* g[2] = {scratch.data(), scratch.data() + rows * f};  // partial x w_in of each k part
  float* u[2] = {g[1] + rows * f, g[1] + 2 * rows * f};      // partial x w_gate
  float* share = u[1] + rows * f;
  const int64_t ks[3] = {0, d / 2, d};
  const int64_t split = f / kTile / 2 * kTile;  // hidden columns of phase 2's first part, whole tiles
  const int64_t fs[3] = {0, split > 0 ? split : f, f};
  auto first = [=](int64_t p) {
    const int64_t k0 = ks[p], kn = ks[p + 1] - ks[p];
    matmul(xp + k0, d, wi + k0 * f, f, g[p], f, rows, kn, 0, f);
    if (wg != nullptr) matmul(xp + k0, d, wg + k0 * f, f, u[p], f, rows, kn, 0, f);
  };
  auto second = [=](int64_t p) {
    const int64_t f0 = fs[p], f1 = fs[p + 1];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = r * f + f0;
      activate(g[0] + at, g[1] + at, u[0] + at, u[1] + at, wg != nullptr, kBf16, f1 - f0);
    }
    matmul(g[0] + f0, f, wo + f0 * d, d, p == 0 ? yp : share, d, rows, f1 - f0, 0, d);
  };
  auto phases = std::make_shared<Phases>(2, fs[1] < f ? 2 : 1);
  if (threads.num_threads() > 0) threads.Schedule([phases, first, second] { phases->work(first, second); });
  phases->work(first, second);
  while (phases->done[1].load() < phases->count[1]) std::this_thread::yield();
  if (phases->count[1] == 2) {
    for (int64_t i = 0; i < rows * d; ++i) yp[i] = yp[i] + share[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmoeSlotFfnF32, ffn<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("gated"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmoeSlotFfnBF16Bits, ffn<ffi::U16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("gated"));
