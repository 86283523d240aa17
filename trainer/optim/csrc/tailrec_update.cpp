// tailrec fused backward + update (CPU): the C++ op behind trainer/optim/kernel.py.
// Compiled on first use by kernel.load_extension (torch.utils.cpp_extension), cached per torch
// install and source hash; the float32 twin of trainer/optim/rules.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

// Layout of the work: tables are independent (disjoint rows, disjoint state), so the op runs
// table by table (in parallel over tables when torch has threads). For one table:
//  1. accumulate: each lookup adds w * grad[bag] into the accumulator of its row; a persistent
//     int32 slot per local row maps row -> accumulator (first-appearance order, no hashing, no
//     sort). The table's accumulators stay in cache while the table is processed.
//  2. update in row order: a walk over a bitmap of touched rows (a sort of the unique rows when
//     very sparse). Row order makes the weight/state traffic nearly sequential for long-tail ids
//     (most touched rows are low ids), which is what a sort buys FBGEMM; the walk also resets
//     the slots.
// The per-row maths (direction, step size) is the float32 twin of rules.py. The per-table code is
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (target_clones), so a
// build made on one machine (the Docker image) runs on any x86-64 CPU.

namespace {

// Hyper-parameters, built by trainer/optim/kernel_params.py (SCALARS + loss scale, SWITCHES + mean
// pooling, in that order) and by the op itself from the step and loss tensors (no host reads in Python).
struct Hyper {
  double lr, eps, halflife, ub, horizon, lr_max, alpha, lam_max, h_clip;
  int64_t adj_iter;
  int64_t adagrad, hl_mode;
  bool paper, has_lr_max, warmup, lexico, has_lam_max, h_clip_on, apply_all;
  bool table_ub;  // ub = ub x the table's running mean of mean_d(d^2) (rules.table_ub_update)
  bool ub_geometric;  // x_t: geometric mean over the rows with d != 0 (ub_rows="geometric")
  bool ub_row_floor;  // per row: ub >= the row's own mean_d(d^2) of this step
  int64_t counter_bytes;  // 4: float32 count; 2 / 1: approximate counter level (int16 / uint8)
  int64_t step;  // global step (already advanced for this backward)
  double loss;   // main loss x scale (lexico only)
};

// Row arithmetic on 8-float vectors (GCC vector extension, unaligned through memcpy) when the
// dimension is a known multiple of 8: the compiler does not vectorise the plain loops here (it
// fully unrolls them into scalar code), and these lower to AVX-512 / AVX2 / SSE per clone below.
typedef float v8f __attribute__((vector_size(32)));
__attribute__((always_inline)) inline v8f ld8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
__attribute__((always_inline)) inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

template <int DT>
constexpr bool kVec = DT > 0 && DT % 8 == 0;

// y += a * x
template <int DT>
__attribute__((always_inline)) inline void axpy(float* __restrict__ y, float a, const float* __restrict__ x, int64_t Drt) {
  if constexpr (kVec<DT>) {
    for (int k = 0; k < DT; k += 8) st8(y + k, ld8(y + k) + a * ld8(x + k));
  } else {
    const int64_t D = DT > 0 ? DT : Drt;
    for (int64_t k = 0; k < D; ++k) y[k] += a * x[k];
  }
}

// y = a * x + b * y
template <int DT>
__attribute__((always_inline)) inline void axpby(float* __restrict__ y, float a, const float* __restrict__ x, float b,
                                                 int64_t Drt) {
  if constexpr (kVec<DT>) {
    for (int k = 0; k < DT; k += 8) st8(y + k, a * ld8(x + k) + b * ld8(y + k));
  } else {
    const int64_t D = DT > 0 ? DT : Drt;
    for (int64_t k = 0; k < D; ++k) y[k] = a * x[k] + b * y[k];
  }
}

// y *= a
template <int DT>
__attribute__((always_inline)) inline void scale(float* __restrict__ y, float a, int64_t Drt) {
  if constexpr (kVec<DT>) {
    for (int k = 0; k < DT; k += 8) st8(y + k, a * ld8(y + k));
  } else {
    const int64_t D = DT > 0 ? DT : Drt;
    for (int64_t k = 0; k < D; ++k) y[k] *= a;
  }
}

template <int DT>
__attribute__((always_inline)) inline void zero(float* __restrict__ y, int64_t Drt) {
  if constexpr (kVec<DT>) {
    const v8f z = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < DT; k += 8) st8(y + k, z);
  } else {
    std::memset(y, 0, sizeof(float) * (DT > 0 ? DT : Drt));
  }
}

// Row reductions with 8 independent partial sums: a single running float sum is a chain of
// dependent adds (the lexico norms cost more than the rest of the row otherwise), and this
// order is still deterministic. D % 8 != 0 falls back to a scalar tail.
template <int DT>
__attribute__((always_inline)) inline float dot(const float* x, const float* y, int64_t Drt) {
  const int64_t D = DT > 0 ? DT : Drt;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const int64_t D8 = D - D % 8;
  if constexpr (kVec<DT>) {
    v8f a = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < DT; k += 8) a += ld8(x + k) * ld8(y + k);
    std::memcpy(acc, &a, sizeof a);
  } else {
    for (int64_t k = 0; k < D8; k += 8)
      for (int j = 0; j < 8; ++j) acc[j] += x[k + j] * y[k + j];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (int64_t k = D8; k < D; ++k) s += x[k] * y[k];
  return s;
}

// Direction d (written into g) for one row; returns lambda (0 when no lexico).
template <int DT>
__attribute__((always_inline)) inline float direction(const Hyper& hp, float* __restrict__ g, const float* __restrict__ h, bool has_h,
                       int64_t Drt) {
  const int64_t D = DT > 0 ? DT : Drt;
  if (!hp.lexico) {
    if (h) axpy<DT>(g, 1.f, h, D);
    return 0.f;
  }
  const float gg = dot<DT>(g, g, D);
  if (gg == 0.f) return 0.f;  // h masked: harmlessness cannot be certified; d = g = 0
  const bool use_h = has_h && h;
  float hs = 1.f, hg = 0.f;
  if (use_h) {
    const float hn2 = dot<DT>(h, h, D);
    hg = dot<DT>(h, g, D);
    if (hp.h_clip_on) {
      float hn = std::sqrt(hn2), cap = (float)hp.h_clip * std::sqrt(gg);
      if (hn > cap) hs = cap / std::max(hn, 1e-30f);
    }
    hg *= hs;
  }
  float phi = (float)hp.alpha * std::min(gg, (float)std::max(hp.loss, 0.0));
  float lam = (phi - hg) / std::max(gg, 1e-30f);
  lam = std::max(lam, 0.f);
  if (hp.has_lam_max) lam = std::min(lam, (float)hp.lam_max);
  if (!has_h && !hp.apply_all) lam = 1.f;
  if (use_h) axpby<DT>(g, hs, h, lam, D);
  else scale<DT>(g, lam, D);
  return lam;
}

template <int DT>
__attribute__((always_inline)) inline float mean_sq(const float* __restrict__ d, int64_t Drt) {
  return dot<DT>(d, d, Drt) / (float)(DT > 0 ? DT : Drt);
}

// rules.counter_hash: 32-bit hash of (table-global row, step), the compact counter's coin
inline uint32_t counter_hash(int64_t row, int64_t step) {
  uint32_t x = (uint32_t)row * 0x27D4EB2Du + (uint32_t)step;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

struct Inputs {
  const int64_t* idx; const int64_t* off; const float* pw; const float* G; int64_t ldg, B;
  const int64_t* fc; const bool* fs; bool mean_pool; int64_t n_idx;
  int32_t* slot; float* W; float* cnt; int32_t* last; float* ada;
  double* ub_stat;  // [table][2]: running sum of x_t and count of steps (table_ub only)
  int16_t* cnt16; uint8_t* cnt8;  // compact counters' levels (counter_bytes 2 / 1)
  const float* ctab; const int32_t* cthr;  // per level: estimated count, raise threshold (rules.counter_tables)
  const int64_t* row_base;  // per table: its first row in the whole table (row_wise shard offset)
};

template <int DT>
__attribute__((always_inline)) inline float step_size(const Hyper& hp, double ub_base, int64_t key, int64_t grow,
                                                      const float* d, int64_t D, const Inputs& in) {
  float* ada = in.ada;
  if (hp.adagrad) {
    ada[key] += mean_sq<DT>(d, D);
    return (float)hp.lr / (std::sqrt(ada[key]) + (float)hp.eps);
  }
  float c;
  if (hp.counter_bytes != 4) {  // approximate counter: raise the level with probability b^-k
    int32_t k = hp.counter_bytes == 2 ? (int32_t)in.cnt16[key] : (int32_t)in.cnt8[key];
    if ((int32_t)(counter_hash(grow, hp.step) >> 8) < in.cthr[k]) ++k;
    if (hp.counter_bytes == 2) in.cnt16[key] = (int16_t)k;
    else in.cnt8[key] = (uint8_t)k;
    c = in.ctab[k];
  } else {
    float* counter = in.cnt;
    int32_t* last = in.last;
    c = counter[key];
    if (hp.hl_mode == 0) c += 1.f;
    else if (hp.hl_mode == 1) c = 1.f;
    else {
      int64_t delta = last[key] > 0 ? hp.step - last[key] : 1;
      c = 1.f + std::exp2(-(float)delta / (float)hp.halflife) * c;
      last[key] = (int32_t)hp.step;
    }
    counter[key] = c;
  }
  // paper form: ub -> ub * T / t (c T / t = T / p_hat), rules.cfsgd_lr
  const double ub = hp.paper ? ub_base * (hp.horizon / (double)std::max<int64_t>(hp.step, 1)) : ub_base;
  float eta = (float)hp.lr / (std::sqrt((float)ub * c) + (float)hp.eps);
  if (hp.has_lr_max) eta = std::min(eta, (float)hp.lr_max);
  if (hp.warmup) {
    ada[key] += mean_sq<DT>(d, D);
    if (hp.step <= hp.adj_iter) eta = (float)hp.lr / (std::sqrt(ada[key]) + (float)hp.eps);
  }
  return eta;
}

struct TableOut {
  std::vector<int64_t> keys;  // global keys (row offset of the table + local row), row order
  std::vector<float> lam;
  std::vector<uint8_t> upd;
  std::string error;
};

// Reused across calls (per thread): after the first steps the op allocates nothing big.
struct Scratch {
  std::vector<float> gacc, hacc;
  std::vector<int32_t> hslot;
  std::vector<int64_t> urow;
  std::vector<uint64_t> bits;  // touched rows of the current table, one bit per row; all zero between tables
};
thread_local Scratch scratch;

template <int DT>
__attribute__((always_inline)) inline void run_table(const Hyper& hp, const Inputs& in, const std::vector<int64_t>& feats, int64_t rows,
               int64_t t, int64_t rof, int64_t wof, int64_t Drt, int64_t n_ids, TableOut& out) {
  const int64_t D = DT > 0 ? DT : Drt;
  Scratch& s = scratch;
  const int64_t max_u = std::min(n_ids, rows);
  if ((int64_t)s.urow.size() < max_u) { s.urow.resize(max_u); s.hslot.resize(max_u); }
  if ((int64_t)s.gacc.size() < max_u * D) s.gacc.resize(max_u * D);
  const int64_t n_words = (rows + 63) / 64;
  if ((int64_t)s.bits.size() < n_words) s.bits.resize(n_words, 0);
  bool any_h = false;
  for (int64_t f : feats) any_h |= in.fs[f];
  if (any_h && (int64_t)s.hacc.size() < max_u * D) s.hacc.resize(max_u * D);
  // raw local pointers: no aliasing with the stores below, so nothing is reloaded per id
  int32_t* __restrict__ sl = in.slot + rof;
  float* __restrict__ gacc = s.gacc.data();
  float* __restrict__ hacc = any_h ? s.hacc.data() : nullptr;
  int64_t* __restrict__ urow = s.urow.data();
  int32_t* __restrict__ hslot = s.hslot.data();  // per unique row: its transfer accumulator, -1 = none
  uint64_t* __restrict__ bits = s.bits.data();
  const int64_t* __restrict__ idx = in.idx;
  const int64_t* __restrict__ off = in.off;
  const float* __restrict__ pw = in.pw;
  const float* __restrict__ G = in.G;
  const int64_t B = in.B, ldg = in.ldg;
  const bool mean_pool = in.mean_pool;
  const int64_t n_idx = in.n_idx;
  int64_t U = 0, H = 0, bad_row = -1, bad_pos = -1;
  std::vector<uint8_t> has_main;  // only needed with shadow features
  if (any_h) has_main.assign(max_u, 0);
  for (int64_t f : feats) {
    const bool shadow = in.fs[f];
    const float* __restrict__ gbase = G + in.fc[f];
    for (int64_t k = f * B; k < (f + 1) * B && bad_pos < 0; ++k) {
      const int64_t s0 = off[k], s1 = off[k + 1];
      if (s1 == s0) continue;
      const float bag_scale = mean_pool ? 1.f / (float)(s1 - s0) : 1.f;
      const float* __restrict__ gr = gbase + (k - f * B) * ldg;
      for (int64_t i = s0; i < s1; ++i) {
        // the slot read is the miss that dominates (random over the table): fetch ahead
        if (i + 16 < n_idx) {
          const int64_t rp = idx[i + 16];
          if (rp >= 0 && rp < rows) __builtin_prefetch(sl + rp, 1);
        }
        const int64_t r = idx[i];
        if (r < 0 || r >= rows) { bad_row = r; bad_pos = i; break; }
        int32_t u = sl[r];
        if (u < 0) {
          u = (int32_t)U++;
          sl[r] = u;
          urow[u] = r; hslot[u] = -1;
          bits[r >> 6] |= uint64_t(1) << (r & 63);
          zero<DT>(gacc + (int64_t)u * D, D);
        }
        const float w = bag_scale * (pw ? pw[i] : 1.f);
        float* __restrict__ dst;
        if (shadow) {
          if (hslot[u] < 0) {
            hslot[u] = (int32_t)H++;
            zero<DT>(hacc + (int64_t)hslot[u] * D, D);
          }
          dst = hacc + (int64_t)hslot[u] * D;
        } else {
          dst = gacc + (int64_t)u * D;
          if (any_h) has_main[u] = 1;
        }
        axpy<DT>(dst, w, gr, D);
      }
    }
  }
  // Tables before this one (in this call) are already updated: the op is not atomic over tables.
  // The forward's embedding_bag rejects such ids first, so this is a guard, not a recovery path.
  if (bad_pos >= 0) {  // leave the slots clean so the module stays usable, then report
    for (int64_t u = 0; u < U; ++u) { sl[urow[u]] = -1; bits[urow[u] >> 6] = 0; }
    out.error = "embedding index " + std::to_string(bad_row) + " out of range [0, " + std::to_string(rows) +
                ") at position " + std::to_string(bad_pos) + " of the local indices";
    return;
  }
  // rows in increasing order: a walk over the touched-row bitmap (64 rows per word) unless the batch
  // is so sparse that sorting the few touched rows is cheaper; both leave the bitmap zeroed
  if (n_words <= 4 * U) {
    int64_t j = 0;
    for (int64_t w = 0; w < n_words; ++w) {
      uint64_t x = bits[w];
      if (!x) continue;
      bits[w] = 0;
      while (x) {
        urow[j++] = w * 64 + __builtin_ctzll(x);
        x &= x - 1;
      }
    }
  } else {
    std::sort(urow, urow + U);
    for (int64_t u = 0; u < U; ++u) bits[urow[u] >> 6] = 0;
  }
  out.keys.resize(U); out.lam.assign(U, 0.f); out.upd.assign(U, 0);
  int64_t* __restrict__ keys = out.keys.data();
  float* __restrict__ lamo = out.lam.data();
  uint8_t* __restrict__ updo = out.upd.data();
  float* __restrict__ W = in.W + wof;
  double ub = hp.ub;
  if (hp.table_ub) {
    // ub_mode="table": every direction first (in place), then x_t = mean over the updated rows of
    // mean_d(d^2) joins the table's running mean, then the steps (the same formula as rules.py)
    double xs = 0.0;
    int64_t nu = 0;
    for (int64_t j = 0; j < U; ++j) {
      const int32_t u = sl[urow[j]];
      if (hp.lexico && any_h && !has_main[u]) continue;
      float* g = gacc + (int64_t)u * D;
      const float* h = hslot[u] >= 0 ? hacc + (int64_t)hslot[u] * D : nullptr;
      lamo[j] = direction<DT>(hp, g, h, h != nullptr, D);
      const double m = (double)mean_sq<DT>(g, D);
      if (!hp.ub_geometric) { xs += m; ++nu; }
      else if (m > 0) { xs += std::log(m); ++nu; }
    }
    double* st = in.ub_stat + 2 * t;
    if (nu > 0) { st[0] += hp.ub_geometric ? std::exp(xs / (double)nu) : xs / (double)nu; st[1] += 1.0; }
    ub = hp.ub * st[0] / std::max(st[1], 1.0);
  }
  constexpr int64_t PF = 8;  // prefetch distance (rows): hides the weight/state misses
  for (int64_t j = 0; j < U; ++j) {
    if (j + PF < U) {
      const int64_t rp = urow[j + PF];
      __builtin_prefetch(W + rp * D, 1);
      if (in.cnt) __builtin_prefetch(in.cnt + rof + rp, 1);
      __builtin_prefetch(gacc + (int64_t)sl[rp] * D, 0);
    }
    const int64_t r = urow[j];
    const int32_t u = sl[r];
    sl[r] = -1;
    keys[j] = rof + r;
    const bool hm = any_h ? has_main[u] != 0 : true;
    if (hp.lexico && !hm) continue;  // transfer-only row: nothing certified, not counted
    float* g = gacc + (int64_t)u * D;
    const float* h = hslot[u] >= 0 ? hacc + (int64_t)hslot[u] * D : nullptr;
    if (!hp.table_ub) lamo[j] = direction<DT>(hp, g, h, h != nullptr, D);
    const double ub_row = hp.ub_row_floor ? std::max(ub, (double)mean_sq<DT>(g, D)) : ub;
    const float eta = step_size<DT>(hp, ub_row, rof + r, in.row_base[t] + r, g, D, in);
    float* __restrict__ w = W + r * D;
    axpy<DT>(w, -eta, g, D);
    updo[j] = 1;
  }
}

// One entry per dimension we specialise (the compiler unrolls the row loops), cloned per ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TAILREC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TAILREC_CLONES
#endif
TAILREC_CLONES
void run_table_any(const Hyper& hp, const Inputs& in, const std::vector<int64_t>& feats, int64_t rows,
                   int64_t t, int64_t rof, int64_t wof, int64_t D, int64_t n_ids, TableOut& out) {
#define TAILREC_CASE(DD) case DD: run_table<DD>(hp, in, feats, rows, t, rof, wof, DD, n_ids, out); break;
  switch (D) {
    TAILREC_CASE(4) TAILREC_CASE(8) TAILREC_CASE(16) TAILREC_CASE(20) TAILREC_CASE(32)
    TAILREC_CASE(36) TAILREC_CASE(64) TAILREC_CASE(68) TAILREC_CASE(128) TAILREC_CASE(132)
    default: run_table<0>(hp, in, feats, rows, t, rof, wof, D, n_ids, out);
  }
#undef TAILREC_CASE
}

}  // namespace

std::vector<torch::Tensor> tailrec_update(
    torch::Tensor indices, torch::Tensor offsets, torch::Tensor psw, torch::Tensor grad,
    torch::Tensor feat_table, torch::Tensor feat_shadow, torch::Tensor feat_col,
    torch::Tensor tab_row_off, torch::Tensor tab_w_off, torch::Tensor tab_dim,
    torch::Tensor slot, torch::Tensor weights, torch::Tensor counter, torch::Tensor last_step,
    torch::Tensor ada, torch::Tensor ub_stat, torch::Tensor step, torch::Tensor loss, torch::Tensor counter_count,
    torch::Tensor counter_thr, torch::Tensor row_base, std::vector<double> hf, std::vector<int64_t> hi) {
  TORCH_CHECK(hf.size() == 11 && hi.size() == 14, "tailrec_update: hyper-parameter lists do not match the op");
  // grad may be a column slice of a wider gradient (TorchRec splits one output among kernels): rows
  // are read through its row stride, so it is used in place
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1, "tailrec_update: grad rows must be contiguous");
  Hyper hp{hf[0], hf[1], hf[2], hf[3], hf[4], hf[5], hf[6], hf[7], hf[8], (int64_t)hf[9],
           hi[0], hi[1], (bool)hi[2], (bool)hi[3], (bool)hi[4], (bool)hi[5], (bool)hi[6], (bool)hi[7], (bool)hi[8],
           (bool)hi[9], (bool)hi[10], (bool)hi[11], hi[12], step.data_ptr<int64_t>()[0], 0.0};
  TORCH_CHECK(!hp.table_ub || (ub_stat.dtype() == torch::kFloat64 && ub_stat.numel() == 2 * tab_dim.size(0)),
              "tailrec kernel: ub_mode=table needs a float64 [tables, 2] ub_stat");
  const int64_t T = tab_dim.size(0);
  TORCH_CHECK(row_base.dtype() == torch::kInt64 && row_base.numel() == T, "tailrec kernel: row_base needs one int64 per table");
  const bool compact = hp.counter_bytes != 4 && !hp.adagrad;
  if (compact) {
    TORCH_CHECK(counter.dtype() == (hp.counter_bytes == 2 ? torch::kInt16 : torch::kUInt8) &&
                counter_count.dtype() == torch::kFloat32 && counter_thr.dtype() == torch::kInt32 &&
                counter_count.numel() == counter_thr.numel() && counter_count.numel() > 0,
                "tailrec kernel: counter_bytes ", hp.counter_bytes, " needs its level dtype and level tables");
  } else {
    TORCH_CHECK(!counter.numel() || counter.dtype() == torch::kFloat32, "tailrec kernel: float32 counter expected");
  }
  if (hp.lexico) {
    TORCH_CHECK(loss.numel() == 1, "tailrec_update: lexico needs the main loss tensor");
    hp.loss = (double)loss.data_ptr<float>()[0] * hf[10];
  }
  const int64_t F = feat_table.size(0), nb = offsets.size(0) - 1, B = F ? nb / F : 0;
  const int64_t *ft = feat_table.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>();
  const int64_t *rof = tab_row_off.data_ptr<int64_t>(), *wof = tab_w_off.data_ptr<int64_t>();
  const int64_t* dim = tab_dim.data_ptr<int64_t>();
  Inputs in{indices.data_ptr<int64_t>(), off, psw.numel() ? psw.data_ptr<float>() : nullptr,
            grad.data_ptr<float>(), grad.stride(0), B, feat_col.data_ptr<int64_t>(),
            feat_shadow.data_ptr<bool>(), hi[13] != 0, indices.size(0), slot.data_ptr<int32_t>(), weights.data_ptr<float>(),
            counter.numel() && !compact ? counter.data_ptr<float>() : nullptr,
            last_step.numel() ? last_step.data_ptr<int32_t>() : nullptr,
            ada.numel() ? ada.data_ptr<float>() : nullptr,
            ub_stat.numel() ? ub_stat.data_ptr<double>() : nullptr,
            compact && hp.counter_bytes == 2 ? counter.data_ptr<int16_t>() : nullptr,
            compact && hp.counter_bytes == 1 ? counter.data_ptr<uint8_t>() : nullptr,
            compact ? counter_count.data_ptr<float>() : nullptr,
            compact ? counter_thr.data_ptr<int32_t>() : nullptr,
            row_base.data_ptr<int64_t>()};
  std::vector<std::vector<int64_t>> feats(T);
  std::vector<int64_t> n_ids(T, 0);
  for (int64_t f = 0; f < F; ++f) {
    feats[ft[f]].push_back(f);
    n_ids[ft[f]] += off[(f + 1) * B] - off[f * B];
  }
  const int64_t total_rows = slot.size(0);
  std::vector<TableOut> outs(T);
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (feats[t].empty() || n_ids[t] == 0) continue;
      const int64_t rows = (t + 1 < T ? rof[t + 1] : total_rows) - rof[t];
      run_table_any(hp, in, feats[t], rows, t, rof[t], wof[t], dim[t], n_ids[t], outs[t]);
    }
  });
  int64_t U = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(outs[t].error.empty(), "tailrec kernel, table ", t, ": ", outs[t].error);
    U += (int64_t)outs[t].keys.size();
  }
  auto keys_t = torch::empty({U}, torch::kInt64);
  auto lam_t = torch::empty({U}, torch::kFloat32);
  auto upd_t = torch::empty({U}, torch::kBool);
  int64_t pos = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = (int64_t)outs[t].keys.size();
    if (!n) continue;
    std::memcpy(keys_t.data_ptr<int64_t>() + pos, outs[t].keys.data(), n * sizeof(int64_t));
    std::memcpy(lam_t.data_ptr<float>() + pos, outs[t].lam.data(), n * sizeof(float));
    std::memcpy(upd_t.data_ptr<bool>() + pos, outs[t].upd.data(), n);
    pos += n;
  }
  return {keys_t, lam_t, upd_t};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tailrec_update", &tailrec_update, "tailrec fused backward + update (CPU)");
}
