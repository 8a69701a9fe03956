// The native walk: the same sum as random_walk.py's _walk (offset 0 first, then k = 1..K-1, one multiply-add
// each), over tiles of TILE pixels × CB channels held in registers. Buffers are [C, L] with
// row stride L; `base` is the flat index of the first interior row's padded start; m is a
// multiple of TILE and the weights are 0 past the map, so the tail tile writes zeros there.
// Compiled on first use by random_walk._native_library (ctypes; extern "C" entry points below).
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
namespace {
constexpr int64_t TILE = 32;
template <typename T, int CB>
inline void tile_group(const T* src, T* dst, const T* weights, const int64_t* shifts, int64_t K,
                       int64_t L, int64_t m, int64_t j0) {
  T acc[CB][TILE];
  const T* w = weights + j0;
  for (int c = 0; c < CB; ++c) {
    const T* x = src + c * L + j0 + shifts[0];
    for (int64_t t = 0; t < TILE; ++t) acc[c][t] = w[t] * x[t];
  }
  for (int64_t k = 1; k < K; ++k) {
    w = weights + k * m + j0;
    const int64_t s = j0 + shifts[k];
    for (int c = 0; c < CB; ++c) {
      const T* x = src + c * L + s;
      for (int64_t t = 0; t < TILE; ++t) acc[c][t] += w[t] * x[t];
    }
  }
  for (int c = 0; c < CB; ++c) memcpy(dst + c * L + j0, acc[c], sizeof(acc[c]));
}
// A reusable barrier that spins briefly, then sleeps: on a busy machine a waiting thread
// must not burn the time slice of the one it waits for (OpenMP's spinning barrier did).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      gen_ = gen + 1;
      flag_.store(gen + 1, std::memory_order_release);
      lock.unlock();
      cv_.notify_all();
      return;
    }
    lock.unlock();
    for (int i = 0; i < 20000; ++i)
      if (flag_.load(std::memory_order_acquire) != gen) return;
    lock.lock();
    cv_.wait(lock, [&] { return gen_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int64_t> flag_{0};
  const int n_;
  int count_ = 0;
  int64_t gen_ = 0;
};
template <typename T>
void walk_range(T* buf0, T* buf1, const T* weights, const int64_t* shifts, int64_t K, int64_t C,
                int64_t L, int64_t base, int64_t m, int64_t steps, int64_t tile_lo, int64_t tile_hi,
                Barrier* barrier) {
  for (int64_t step = 0; step < steps; ++step) {
    const T* src = ((step & 1) ? buf1 : buf0) + base;
    T* dst = ((step & 1) ? buf0 : buf1) + base;
    for (int64_t i = tile_lo; i < tile_hi; ++i) {
      const int64_t j0 = i * TILE;
      int64_t c = 0;
      for (; c + 4 <= C; c += 4) tile_group<T, 4>(src + c * L, dst + c * L, weights, shifts, K, L, m, j0);
      switch (C - c) {
        case 3: tile_group<T, 3>(src + c * L, dst + c * L, weights, shifts, K, L, m, j0); break;
        case 2: tile_group<T, 2>(src + c * L, dst + c * L, weights, shifts, K, L, m, j0); break;
        case 1: tile_group<T, 1>(src + c * L, dst + c * L, weights, shifts, K, L, m, j0); break;
        default: break;
      }
    }
    if (barrier != nullptr) barrier->wait();  // step done everywhere before anyone reads it
  }
}
template <typename T>
void walk(T* buf0, T* buf1, const T* weights, const int64_t* shifts, int64_t K, int64_t C,
          int64_t L, int64_t base, int64_t m, int64_t steps, int64_t nthreads) {
  const int64_t ntiles = m / TILE;
  if (nthreads > ntiles) nthreads = ntiles;
  if (nthreads <= 1) {
    walk_range<T>(buf0, buf1, weights, shifts, K, C, L, base, m, steps, 0, ntiles, nullptr);
    return;
  }
  if (C >= 2 * nthreads) {  // channels are independent walks: split them (>= 2 each), no barrier at all
    std::vector<std::thread> workers;
    for (int64_t t = 1; t < nthreads; ++t) {
      const int64_t c0 = C * t / nthreads, c1 = C * (t + 1) / nthreads;
      workers.emplace_back(walk_range<T>, buf0 + c0 * L, buf1 + c0 * L, weights, shifts, K, c1 - c0, L,
                           base, m, steps, 0, ntiles, nullptr);
    }
    walk_range<T>(buf0, buf1, weights, shifts, K, C / nthreads, L, base, m, steps, 0, ntiles, nullptr);
    for (auto& w : workers) w.join();
    return;
  }
  Barrier barrier(static_cast<int>(nthreads));
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < nthreads; ++t)
    workers.emplace_back(walk_range<T>, buf0, buf1, weights, shifts, K, C, L, base, m, steps,
                         ntiles * t / nthreads, ntiles * (t + 1) / nthreads, &barrier);
  walk_range<T>(buf0, buf1, weights, shifts, K, C, L, base, m, steps, 0, ntiles / nthreads, &barrier);
  for (auto& w : workers) w.join();
}
// The transition stencil W [K, m] in the walk's padded flat layout (row width wp, the map's
// pixel (y, x) at J = y * wp + pad + x), K = 1 + 2P: row 0 the self loop, rows 1..P the
// half-plane offsets o_p = (dy_p, dx_p) (A(j, j + o_p)^beta), rows P+1..2P their mirror
// images (A(j, j - o_p)^beta = the value stored at source j - o_p), each column divided by
// its sum; 0 at pad pixels and wherever the pair leaves the map. Phase 1 writes
// aff [P, n0] = A^beta at every source pixel of the unpadded map (features [D, h*w] read in
// place, no padded copy); phase 2 assembles and normalises W's columns from it.
template <typename T>
void affinity_range(const T* feat, T* aff, const int64_t* dys, const int64_t* dxs, int64_t P,
                    int64_t D, int64_t h, int64_t w, int64_t n0, T scale, int64_t tile_lo,
                    int64_t tile_hi) {
  const int64_t n = h * w;
  std::vector<int64_t> shifts(static_cast<size_t>(P));
  int64_t lo_shift = 0, hi_shift = 0;
  for (int64_t p = 0; p < P; ++p) {
    shifts[p] = dys[p] * w + dxs[p];
    lo_shift = std::min(lo_shift, shifts[p]);
    hi_shift = std::max(hi_shift, shifts[p]);
  }
  std::vector<T> acc(static_cast<size_t>(P * TILE));
  for (int64_t i = tile_lo; i < tile_hi; ++i) {
    const int64_t j0 = i * TILE;
    std::fill(acc.begin(), acc.end(), T(0));
    if (j0 + lo_shift >= 0 && j0 + TILE + hi_shift <= n) {  // every read inside the map's buffer
      for (int64_t d = 0; d < D; ++d) {  // sum_d |f_j - f_(j+o)|, TILE pixels x P offsets at a time
        const T* c = feat + d * n + j0;
        for (int64_t p = 0; p < P; ++p) {
          const T* x = c + shifts[p];
          T* a = acc.data() + p * TILE;
          for (int64_t t = 0; t < TILE; ++t) a[t] += std::fabs(c[t] - x[t]);
        }
      }
    } else {  // border tiles: only the reads that exist
      for (int64_t d = 0; d < D; ++d) {
        const T* c = feat + d * n;
        for (int64_t p = 0; p < P; ++p)
          for (int64_t t = 0; t < TILE; ++t) {
            const int64_t j = j0 + t, k = j + shifts[p];
            if (j < n && k >= 0 && k < n) acc[p * TILE + t] += std::fabs(c[j] - c[k]);
          }
      }
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t t = 0; t < TILE; ++t) {
        const int64_t j = j0 + t, y = j / w, x = j % w;
        const bool valid = j < n && y + dys[p] < h && x + dxs[p] >= 0 && x + dxs[p] < w;
        aff[p * n0 + j] = valid ? std::exp(acc[p * TILE + t] * scale) : T(0);
      }
  }
}
template <typename T>
void assemble_range(const T* aff, T* weights, const int64_t* dys, const int64_t* dxs, int64_t P,
                    int64_t h, int64_t w, int64_t wp, int64_t pad, int64_t m, int64_t n0,
                    int64_t tile_lo, int64_t tile_hi) {
  const int64_t K = 2 * P + 1;
  for (int64_t J = tile_lo * TILE; J < tile_hi * TILE; ++J) {
    const int64_t y = J / wp, x = J % wp - pad;
    if (y >= h || x < 0 || x >= w) {
      for (int64_t k = 0; k < K; ++k) weights[k * m + J] = T(0);
      continue;
    }
    const int64_t j = y * w + x;
    for (int64_t p = 0; p < P; ++p) {
      weights[(1 + p) * m + J] = aff[p * n0 + j];
      const int64_t ys = y - dys[p], xs = x - dxs[p];
      weights[(1 + P + p) * m + J] = ys >= 0 && xs >= 0 && xs < w ? aff[p * n0 + ys * w + xs] : T(0);
    }
    T sum = T(1);  // the self loop, then k = 1..K-1 in order (as torch's sum over dim 0)
    for (int64_t k = 1; k < K; ++k) sum += weights[k * m + J];
    weights[J] = T(1) / sum;
    for (int64_t k = 1; k < K; ++k) weights[k * m + J] /= sum;
  }
}
template <typename T>
void stencil(const T* feat, T* aff, T* weights, const int64_t* dys, const int64_t* dxs, int64_t P,
             int64_t D, int64_t h, int64_t w, int64_t wp, int64_t pad, int64_t m, int64_t n0,
             T scale, int64_t nthreads) {
  for (int phase = 0; phase < 2; ++phase) {  // phase 2 reads other tiles' phase-1 results: join between
    const int64_t ntiles = (phase == 0 ? n0 : m) / TILE;
    const int64_t nt = std::max<int64_t>(1, std::min(nthreads, ntiles));
    std::vector<std::thread> workers;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t lo = ntiles * t / nt, hi = ntiles * (t + 1) / nt;
      auto run = [=] {
        if (phase == 0)
          affinity_range<T>(feat, aff, dys, dxs, P, D, h, w, n0, scale, lo, hi);
        else
          assemble_range<T>(aff, weights, dys, dxs, P, h, w, wp, pad, m, n0, lo, hi);
      };
      if (t + 1 < nt) workers.emplace_back(run); else run();
    }
    for (auto& wk : workers) wk.join();
  }
}
}  // namespace
extern "C" {
int64_t rw_tile(void) { return TILE; }
void rw_walk_f32(float* b0, float* b1, const float* w, const int64_t* s, int64_t K, int64_t C,
                 int64_t L, int64_t base, int64_t m, int64_t steps, int64_t nthreads) {
  walk<float>(b0, b1, w, s, K, C, L, base, m, steps, nthreads);
}
void rw_walk_f64(double* b0, double* b1, const double* w, const int64_t* s, int64_t K, int64_t C,
                 int64_t L, int64_t base, int64_t m, int64_t steps, int64_t nthreads) {
  walk<double>(b0, b1, w, s, K, C, L, base, m, steps, nthreads);
}
void rw_stencil_f32(const float* f, float* aff, float* out, const int64_t* dy, const int64_t* dx, int64_t P,
                    int64_t D, int64_t h, int64_t w, int64_t wp, int64_t pad, int64_t m, int64_t n0,
                    double scale, int64_t nthreads) {
  stencil<float>(f, aff, out, dy, dx, P, D, h, w, wp, pad, m, n0, static_cast<float>(scale), nthreads);
}
void rw_stencil_f64(const double* f, double* aff, double* out, const int64_t* dy, const int64_t* dx, int64_t P,
                    int64_t D, int64_t h, int64_t w, int64_t wp, int64_t pad, int64_t m, int64_t n0,
                    double scale, int64_t nthreads) {
  stencil<double>(f, aff, out, dy, dx, P, D, h, w, wp, pad, m, n0, scale, nthreads);
}
}
