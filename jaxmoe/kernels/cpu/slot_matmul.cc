// One pool slot's matmul for XLA's CPU backend: y[r, :] = x[r, :] @ pool[slot], reading the slot in place.
//
// XLA:CPU copies a dynamically indexed matmul operand out of its array before
// the product; for a decode step's few rows that copy costs as much as the
// product. This XLA FFI handler takes the whole pool and the slot instead.
//
//   x     f32 [R, K]     activations (few rows: decode chunks)
//   pool  f32 [X, K, N]  or u16 [X, K, N] holding bfloat16 bit patterns
//   slot  s32 [1]
//   y     f32 [R, N]
//
// Each output is a float32 sum over k in ascending order, so a row's result
// depends on that row and the slot only, never on R or on the other rows.
// Built at first use by jaxmoe/kernels/cpu/slot_matmul.py (g++ -O3 -march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;        // floats per vector
constexpr int kTile = 2 * kLanes;  // columns per register tile
constexpr int kRows = 4;          // rows per register tile
constexpr int kBlock = 16;        // weight rows per k block (kept in cache while every row uses them)
constexpr int kMinTiles = 4;      // column tiles per part, at least

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

// Adds one k block (kb weight rows starting at w) into R rows of y, columns [j0, j1).
template <typename W, int R>
void block_rows(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ y, int64_t k, int64_t n,
                int64_t kb, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + kTile <= j1; j += kTile) {
    f32x16 a0[R], a1[R];
    for (int r = 0; r < R; ++r) {
      a0[r] = vector(y + r * n + j);
      a1[r] = vector(y + r * n + j + kLanes);
    }
    for (int64_t i = 0; i < kb; ++i) {
      const f32x16 w0 = vector(w + i * n + j), w1 = vector(w + i * n + j + kLanes);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * k + i];
        a0[r] = a0[r] + xv * w0;
        a1[r] = a1[r] + xv * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(y + r * n + j, &a0[r], sizeof(f32x16));
      std::memcpy(y + r * n + j + kLanes, &a1[r], sizeof(f32x16));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t jj = j; jj < j1; ++jj) {
      float acc = y[r * n + jj];
      for (int64_t i = 0; i < kb; ++i) acc = acc + x[r * k + i] * scalar(w[i * n + jj]);
      y[r * n + jj] = acc;
    }
  }
}

// y[:, j0:j1] = x @ w[:, j0:j1].
template <typename W>
void slot_matmul(const float* x, const W* w, float* y, int64_t rows, int64_t k, int64_t n, int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < rows; ++r) std::memset(y + r * n + j0, 0, sizeof(float) * (j1 - j0));
  for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
    const int64_t kb = std::min<int64_t>(kBlock, k - k0);
    const W* wb = w + k0 * n;
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) block_rows<W, kRows>(x + r * k + k0, wb, y + r * n, k, n, kb, j0, j1);
    const float* xr = x + r * k + k0;
    float* yr = y + r * n;
    switch (rows - r) {
      case 0: break;
      case 1: block_rows<W, 1>(xr, wb, yr, k, n, kb, j0, j1); break;
      case 2: block_rows<W, 2>(xr, wb, yr, k, n, kb, j0, j1); break;
      case 3: block_rows<W, 3>(xr, wb, yr, k, n, kb, j0, j1); break;
      case 4: block_rows<W, 4>(xr, wb, yr, k, n, kb, j0, j1); break;
      case 5: block_rows<W, 5>(xr, wb, yr, k, n, kb, j0, j1); break;
      case 6: block_rows<W, 6>(xr, wb, yr, k, n, kb, j0, j1); break;
      default: block_rows<W, 7>(xr, wb, yr, k, n, kb, j0, j1); break;
    }
  }
}

// The columns in parts of whole tiles, claimed by the calling thread and by tasks on XLA's intra-op thread
// pool; the caller returns once every part is done. A task that starts after that finds no part left.
struct Parts {
  explicit Parts(int64_t count) : count(count) {}
  const int64_t count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  template <typename F>
  void work(const F& part) {
    for (int64_t p; (p = next.fetch_add(1)) < count; done.fetch_add(1)) part(p);
  }
};

template <ffi::DataType T>
ffi::Error call(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> pool, ffi::Buffer<ffi::S32> slot,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = pool.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || xd[1] != pd[1]) {
    return ffi::Error::InvalidArgument("slot_matmul: x [R, K] and pool [X, K, N] do not match");
  }
  const int64_t s = slot.typed_data()[0];
  if (s < 0 || s >= pd[0]) return ffi::Error::InvalidArgument("slot_matmul: slot outside the pool");
  const int64_t rows = xd[0], k = xd[1], n = pd[2];
  using W = ffi::NativeType<T>;
  const float* xp = x.typed_data();
  const W* wp = pool.typed_data() + s * k * n;
  float* yp = y->typed_data();
  const int64_t tiles = n / kTile;
  // Two parts where the row is wide enough: a second core adds read bandwidth. More parts cost more in
  // scheduling than they saved on two cores.
  const int64_t count = threads.num_threads() > 0 && tiles >= 2 * kMinTiles ? 2 : 1;
  if (count == 1) {
    slot_matmul(xp, wp, yp, rows, k, n, 0, n);
    return ffi::Error::Success();
  }
  auto parts = std::make_shared<Parts>(count);
  auto part = [=](int64_t p) {
    const int64_t j0 = tiles * p / count * kTile;
    const int64_t j1 = p + 1 == count ? n : tiles * (p + 1) / count * kTile;
    slot_matmul(xp, wp, yp, rows, k, n, j0, j1);
  };
  for (int64_t t = 1; t < count; ++t) threads.Schedule([parts, part] { parts->work(part); });
  parts->work(part);
  while (parts->done.load() < count) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmoeSlotMatmulF32, call<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmoeSlotMatmulBF16Bits, call<ffi::U16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
