// Native glue for batch norm and group norm (layer and instance norm too) on CPU inputs of any size: the
// autograd nodes and the calls into normlab's numba loops (their C entry points,
// normlab.kernels.cpu_numba.c_entry_points), without Python in between, split over torch's threads from a few
// ten thousand elements (runs_for).
//
// On a (256, 120) layer the loops take ~5 us forward and ~11 us backward, while the Python glue around them
// (tensor -> numpy views, allocations, checks, a Python autograd node) took ~25 us per step; torch's own layer
// runs its C++ path. This file is that path for normlab: checks, allocation, the loop call, the running
// statistics' update and a C++ autograd node. Every input it does not take (dtype, layout, size, device) returns
// "unsupported" and the Python glue handles it, so this file can stay small.
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#ifndef _WIN32
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// the numba loops' C signatures (normlab.kernels.cpu_numba.C_ENTRY_ORDER), S the storage type of the activations
// (x, y, dy, dx) and A the compute type of everything else (weights, statistics, running statistics, partial sums):
// float32 and float64 compute in themselves, bfloat16 (int16_t bits) and float16 (uint16_t bits) in float32; the
// batch-norm mean is always float64
constexpr int kLoopsNotSet = 0, kLoopsReady = 1, kLoopsDeclined = 2;  // Loops::state

template <typename S, typename A>
struct Loops {
  // fwd_*: the last argument is the mode (kModeTrain: statistics and y; kModeStats: mean and biased variance)
  // *_rows: (rows, ld, cols, c): `rows` rows ld elements apart, of which the call covers the first cols (ld for
  // all; a block of c channels otherwise, channel_runs)
  int64_t (*fwd_rows)(const S*, S*, const A*, const A*, double*, A*, int64_t, int64_t, int64_t, int64_t, double,
                      int64_t, int64_t) = nullptr;
  // eval_*, dx_*: the last argument is the bytes of the whole output a run writes a part of (its streaming stores
  // are chosen by that size, as for the whole output in one call)
  int64_t (*eval_rows)(const S*, S*, const A*, const A*, const A*, const A*, int64_t, int64_t, int64_t, int64_t,
                       double, int64_t, int64_t) = nullptr;
  int64_t (*fwd_ncs)(const S*, S*, const A*, const A*, double*, A*, int64_t, int64_t, int64_t, double, int64_t,
                     int64_t) = nullptr;
  int64_t (*eval_ncs)(const S*, S*, const A*, const A*, const A*, const A*, int64_t, int64_t, int64_t, double,
                      int64_t, int64_t) = nullptr;
  int64_t (*bwd_rows)(const S*, const S*, const A*, const A*, const double*, const A*, S*, A*, A*, int64_t,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) = nullptr;
  int64_t (*bwd_ncs)(const S*, const S*, const A*, const A*, const double*, const A*, S*, A*, A*, int64_t,
                     int64_t, int64_t, int64_t, int64_t, int64_t) = nullptr;
  int64_t (*running)(A*, A*, const double*, const A*, int64_t, double, int64_t, double) = nullptr;
  // group norm on (N, C, S), statistics (N, G); layer norm on (M, K), statistics (M); the last argument as eval_*'s
  int64_t (*gn_fwd)(const S*, S*, const A*, const A*, A*, A*, int64_t, int64_t, int64_t, int64_t, double,
                    int64_t) = nullptr;
  int64_t (*gn_bwd)(const S*, const S*, const A*, const A*, const A*, S*, A*, A*, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t) = nullptr;
  int64_t (*ln_fwd)(const S*, S*, const A*, const A*, A*, A*, int64_t, int64_t, double, int64_t) = nullptr;
  int64_t (*ln_bwd)(const S*, const S*, const A*, const A*, const A*, S*, A*, A*, int64_t, int64_t, int64_t,
                    int64_t, int64_t) = nullptr;
  // batch norm's training dx alone, from the whole batch's dweight and dbias (float64) over cnt values a channel
  int64_t (*dx_rows)(const S*, const S*, const A*, const A*, const double*, const A*, const double*, const double*,
                     S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) = nullptr;
  int64_t (*dx_ncs)(const S*, const S*, const A*, const A*, const double*, const A*, const double*, const double*,
                    S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) = nullptr;
  // y = act((x - ref) * a + bb) with the per-channel ref, a, bb given (the split training forward's second pass);
  // the last argument as eval_*'s
  int64_t (*apply_rows)(const S*, S*, const A*, const A*, const A*, int64_t, int64_t, int64_t, int64_t,
                        int64_t) = nullptr;
  int64_t (*apply_ncs)(const S*, S*, const A*, const A*, const A*, int64_t, int64_t, int64_t, int64_t,
                       int64_t) = nullptr;
  // kLoopsNotSet until set_loops, then kLoopsReady, or kLoopsDeclined where the host's loops do not take the
  // dtype (float16 without F16C); stored after the pointers: a thread that sees kLoopsReady sees them
  std::atomic<int> state{kLoopsNotSet};

  void set(const std::vector<int64_t>& a) {
    if (a.empty()) {
      state.store(kLoopsDeclined, std::memory_order_release);
      return;
    }
    TORCH_CHECK(a.size() == 15, "normlab native: expected 15 loop addresses, got ", a.size());
    fwd_rows = reinterpret_cast<decltype(fwd_rows)>(a[0]);
    eval_rows = reinterpret_cast<decltype(eval_rows)>(a[1]);
    fwd_ncs = reinterpret_cast<decltype(fwd_ncs)>(a[2]);
    eval_ncs = reinterpret_cast<decltype(eval_ncs)>(a[3]);
    bwd_rows = reinterpret_cast<decltype(bwd_rows)>(a[4]);
    bwd_ncs = reinterpret_cast<decltype(bwd_ncs)>(a[5]);
    running = reinterpret_cast<decltype(running)>(a[6]);
    gn_fwd = reinterpret_cast<decltype(gn_fwd)>(a[7]);
    gn_bwd = reinterpret_cast<decltype(gn_bwd)>(a[8]);
    ln_fwd = reinterpret_cast<decltype(ln_fwd)>(a[9]);
    ln_bwd = reinterpret_cast<decltype(ln_bwd)>(a[10]);
    dx_rows = reinterpret_cast<decltype(dx_rows)>(a[11]);
    dx_ncs = reinterpret_cast<decltype(dx_ncs)>(a[12]);
    apply_rows = reinterpret_cast<decltype(apply_rows)>(a[13]);
    apply_ncs = reinterpret_cast<decltype(apply_ncs)>(a[14]);
    state.store(kLoopsReady, std::memory_order_release);
  }
};

Loops<float, float> loops32;
Loops<double, double> loops64;
Loops<int16_t, float> loops_bf16;  // torch's bfloat16 bits
Loops<uint16_t, float> loops_f16;  // IEEE half bits

// the dtypes this glue takes as activations
bool storage_ok(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

// the compute dtype of activations of dtype st: weights, statistics and running statistics are read in it
at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// f(loops) with the loops of x's dtype (one of storage_ok's)
template <typename F>
void with_loops(const Tensor& x, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat:
      f(loops32);
      break;
    case at::kDouble:
      f(loops64);
      break;
    case at::kBFloat16:
      f(loops_bf16);
      break;
    default:
      f(loops_f16);
  }
}

// inputs of this many bytes and more stay with the Python glue (the channel-by-channel loops): batch norm's
// rows layout ((N, C), (N, C, L) with L = 1, channels_last) and (N, C, S) layout; group, layer and instance norm
int64_t bn_rows_below = 0, bn_ncs_below = 0, group_below = 0;
// the rows layout as rows of up to lanes_max values (k rows of C as one of k * C) from lanes_from elements
int64_t lanes_from = std::numeric_limits<int64_t>::max(), lanes_max = 0;
// inputs of this many elements and more are split over torch's threads: group, layer and instance norm (forward,
// backward); batch norm
int64_t parallel_from = std::numeric_limits<int64_t>::max(), backward_parallel_from = parallel_from,
        bn_parallel_from = parallel_from;

constexpr int64_t kUnsupported = -1;  // status: the Python glue takes this call
constexpr int64_t kNoLoops = -2;      // status: load this dtype's loops (set_loops), then call again
constexpr int64_t kModeTrain = 0, kModeStats = 1;  // normlab.kernels.cpu_numba.MODE_TRAIN, MODE_STATS

// 0 where the loops for x's dtype are ready, kNoLoops before set_loops, kUnsupported where it declined the dtype
int64_t loops_status(const Tensor& x) {
  int state = kLoopsNotSet;
  with_loops(x, [&](const auto& k) { state = k.state.load(std::memory_order_acquire); });
  return state == kLoopsReady ? 0 : state == kLoopsDeclined ? kUnsupported : kNoLoops;
}

// A child forked after this process ran a parallel region stays on one thread: GNU OpenMP's pool does not survive
// fork(), and a parallel region in such a child hangs (as torch's own operators there).
std::atomic<bool> ran_parallel{false}, forked_after_parallel{false};

// ---------------------------------------------------------------------------------------------------------------
// Reused memory for the large outputs of this glue (y, dx, a relaid dy), as normlab.kernels.pool for the Python
// glue's: glibc's heap gives a freed block back to the system whenever the free space at its top passes its trim
// threshold (twice the largest block it has mapped and freed, up to 64 MiB), and two freed 25.7 MB outputs, a
// training step's y and the previous step's dx, pass it: the next step's output then faults in page by page, each
// 4 KiB page zeroed by the kernel (6,272 faults, ~12 ms on this VM, for a (32, 64, 56, 56) float32 layer whose
// forward+backward takes 6.5 ms at one thread). Outputs come from anonymous maps instead (sizes rounded up to 2 MiB,
// transparent huge pages requested), kept when their tensor dies for the next output of the same rounded size, at
// most pool_cap bytes of free maps, the least recently freed dropped first: from pool_kept_from bytes where the
// output outlives the call (a training forward that records its autograd node, whose y the next layers and the
// backward read; the backward's dx), from pool_from bytes otherwise (evaluation, no grad: below that, the heap's
// block that the caller's dead tensors just left, still in cache, served a 4.8 MB evaluation output faster than a
// map last written a few layers before; see normlab.kernels.native).
// ---------------------------------------------------------------------------------------------------------------
// set by configure from normlab.kernels.pool (its grain: sizes are rounded up to a multiple of it)
int64_t pool_from = std::numeric_limits<int64_t>::max(), pool_kept_from = pool_from, pool_grain = 1, pool_cap = 0;

struct OutputPool {
  std::mutex lock;
  std::vector<std::pair<size_t, void*>> free;  // (size, map), least recently freed first
  size_t free_bytes = 0;

  void* take(size_t size) {
    std::lock_guard<std::mutex> guard(lock);
    for (size_t i = free.size(); i-- > 0;) {  // the most recently freed first: its lines may still be cached
      if (free[i].first == size) {
        void* p = free[i].second;
        free.erase(free.begin() + static_cast<std::ptrdiff_t>(i));
        free_bytes -= size;
        return p;
      }
    }
    return nullptr;
  }

  void give(size_t size, void* p) {
    std::vector<std::pair<size_t, void*>> dropped;
    {
      std::lock_guard<std::mutex> guard(lock);
      free.emplace_back(size, p);
      free_bytes += size;
      size_t n = 0;
      while (free_bytes > static_cast<size_t>(std::max<int64_t>(pool_cap, 0)) && n < free.size()) {
        free_bytes -= free[n].first;
        dropped.push_back(free[n++]);
      }
      free.erase(free.begin(), free.begin() + static_cast<std::ptrdiff_t>(n));
    }
    unmap(dropped);
  }

  size_t clear() {
    std::vector<std::pair<size_t, void*>> dropped;
    {
      std::lock_guard<std::mutex> guard(lock);
      dropped.swap(free);
      free_bytes = 0;
    }
    unmap(dropped);
    return dropped.size();
  }

  size_t held() {
    std::lock_guard<std::mutex> guard(lock);
    return free_bytes;
  }

  static void unmap(const std::vector<std::pair<size_t, void*>>& maps) {
#ifndef _WIN32
    for (const auto& [size, p] : maps) munmap(p, size);
#endif
  }
};

// never destroyed: an output may die after static destruction began (a tensor kept by Python until exit)
OutputPool& output_pool() {
  static auto* pool = new OutputPool();
  return *pool;
}

struct PooledMap {
  void* base;
  size_t size;
};

void give_back(void* ctx) {
  auto* map = static_cast<PooledMap*>(ctx);
  output_pool().give(map->size, map->base);
  delete map;
}

// at::empty_like(x) for the outputs of the loops (x dense: the same strides), from the pool from pool_from bytes,
// or pool_kept_from where the output outlives the call (`kept`)
Tensor empty_output(const Tensor& x, bool kept) {
#ifndef _WIN32
  const int64_t nbytes = static_cast<int64_t>(x.nbytes());
  if (nbytes >= (kept ? pool_kept_from : pool_from) && pool_cap > 0 && x.is_non_overlapping_and_dense()) {
    const size_t grain = static_cast<size_t>(pool_grain);
    const size_t size = (static_cast<size_t>(nbytes) + grain - 1) / grain * grain;
    void* p = output_pool().take(size);
    if (p == nullptr) {
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return at::empty_like(x);
#ifdef MADV_HUGEPAGE
      madvise(p, size, MADV_HUGEPAGE);  // where refused, plain pages serve as well
#endif
    }
    // a resizable storage, as empty_like's: resizing it moves the tensor to the CPU allocator's memory
    return at::for_blob(p, x.sizes())
        .strides(x.strides())
        .context(new PooledMap{p, size}, &give_back)
        .options(x.options())
        .allocator(at::getCPUAllocator())
        .resizeable_storage()
        .make_tensor();
  }
#endif
  return at::empty_like(x);
}

void after_fork_in_child() {
  if (ran_parallel.load()) forked_after_parallel.store(true);
  new (&output_pool().lock) std::mutex();  // another thread may have held it at the fork
}

// How many runs to split n rows (numel elements) into: one per torch thread from `from` elements, else one. Each
// run is a call of the single-threaded loops on torch's own thread pool (at::parallel_for, over_runs).
int64_t runs_for(int64_t n, int64_t numel, int64_t from) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || numel < from || at::in_parallel_region() || forked_after_parallel.load()) return 1;
  return std::min(threads, n);
}

// f(t, lo, hi) for every run t of `runs`, run t taking rows [t * n / runs, (t + 1) * n / runs)
template <typename F>
void over_runs(int64_t n, int64_t runs, const F& f) {
  if (runs == 1) {
    f(0, 0, n);
    return;
  }
  ran_parallel.store(true, std::memory_order_relaxed);
  at::parallel_for(0, runs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) f(t, t * n / runs, (t + 1) * n / runs);
  });
}

// which memory layout the loops see: rows (M, C), C innermost; or ncs (N, C, S), S innermost
struct Geometry {
  bool rows = true;
  int64_t n = 0, c = 0, s = 1;  // rows: n is M, or M / k with lanes
  int64_t width = 0;            // rows: k * C
};

// the loops' view of the rows layout: k rows as one of k * C lanes, k the largest power of two dividing M with
// k * C <= lanes_max (normlab.kernels.cpu._lanes)
void set_lanes(Geometry& g) {
  int64_t k = 1;
  if (g.n * g.c >= lanes_from) {
    while (2 * k * g.c <= lanes_max && g.n % (2 * k) == 0) k *= 2;
  }
  g.n /= k;
  g.width = k * g.c;
}

// a tensor subclass that handles torch's operators itself (__torch_dispatch__, the Python key: DTensor, a wrapper
// of other tensors): its storage, where it has one, is not its values (normlab.kernels.dispatched)
bool dispatches(const Tensor& t) { return t.key_set().has(c10::DispatchKey::Python); }

// memory the loops can read as it is: a dense CPU tensor, not a lazy negation or conjugate, nor one that
// dispatches (those take the Python glue, which hands them to torch.nn.functional)
bool readable(const Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.is_neg() && !t.is_conj() && !dispatches(t);
}

bool geometry(const Tensor& x, Geometry& g) {
  if (!readable(x)) return false;
  if (!storage_ok(x.scalar_type())) return false;
  const int64_t d = x.dim(), numel = x.numel();
  if (d < 2 || numel == 0) return false;
  g.c = x.size(1);
  if (x.is_contiguous()) {
    g.n = x.size(0);
    g.s = numel / (g.n * g.c);
    g.rows = d == 2 || g.s == 1;
    if (g.rows) {
      g.s = 1;
      set_lanes(g);
    }
    return true;
  }
  if ((d == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (d == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    g.rows = true;
    g.n = numel / g.c;
    g.s = 1;
    set_lanes(g);
    return true;
  }
  return false;
}

// a per-channel vector the loops can read: absent, or CPU, contiguous, C values of the compute dtype of inputs of
// dtype st (read in place) or of st itself where that is a 16-bit type (a model converted with .bfloat16() or
// .half(): converted per call, in_dtype)
bool vector_ok(const Tensor& t, int64_t c, at::ScalarType st) {
  return !t.defined() ||
         (readable(t) && (t.scalar_type() == acc_type(st) || t.scalar_type() == st) && t.numel() == c &&
          t.is_contiguous());
}

// Conversions of a 16-bit model's per-channel vectors (contiguous, checked by vector_ok) by loops here, outside
// autograd: Tensor::to costs a few microseconds a call (dispatch, an iterator, an autograd check), more than
// converting a few thousand values; a small layer's call converts up to six such vectors. Rounding as torch's: to
// nearest even.
template <typename To, typename From>
void convert(const Tensor& from, const Tensor& to) {
  const From* src = static_cast<const From*>(from.data_ptr());
  To* dst = static_cast<To*>(to.data_ptr());
  const int64_t n = from.numel();
#pragma omp simd  // vectorized at -O2 too (its cost model leaves loops of unknown length scalar)
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<To>(src[i]);
}

// From this many values a float16 vector is converted by ATen's kernel (vectorized with F16C where the CPU has it):
// this file is built for any x86-64, so its own float16 conversion is a scalar one, about 1.5 ns a value, where
// ATen's call costs a few microseconds in all. A (16, 4096) layer norm's forward at one thread, warm, native call
// (us): float32 parameters 17.3, float16 ones converted here 29.3, by ATen 21.1; bfloat16 ones here 22.3 (20.7)
constexpr int64_t kHalfByAtenFrom = 4096;

// from's values into `to` (as many values), one of the two float32 and the other bfloat16 or float16
void convert_into(const Tensor& from, const Tensor& to) {
  if ((from.scalar_type() == at::kHalf || to.scalar_type() == at::kHalf) && from.numel() >= kHalfByAtenFrom) {
    to.copy_(from.detach());
    return;
  }
  switch (from.scalar_type()) {
    case at::kBFloat16:
      return convert<float, at::BFloat16>(from, to);
    case at::kHalf:
      return convert<float, at::Half>(from, to);
    default:
      return to.scalar_type() == at::kBFloat16 ? convert<at::BFloat16, float>(from, to)
                                                : convert<at::Half, float>(from, to);
  }
}

// t in dtype st (itself when it already is, or undefined): a 16-bit vector in the compute dtype, or a
// compute-dtype gradient in its 16-bit parameter's dtype
Tensor in_dtype(const Tensor& t, at::ScalarType st) {
  if (!t.defined() || t.scalar_type() == st) return t;
  Tensor out = at::empty(t.sizes(), t.options().dtype(st));
  convert_into(t, out);
  return out;
}

// num_batches_tracked as this glue counts it: a CPU int64 scalar, in place (an inference tensor has no version)
bool counter_ok(const Tensor& t) {
  return readable(t) && t.scalar_type() == at::kLong && t.numel() == 1 && !t.requires_grad() && !t.is_inference();
}

Tensor or_filled(const Tensor& t, int64_t c, const at::TensorOptions& opts, double fill) {
  return t.defined() ? t : at::full({c}, fill, opts);
}

// the output gradient laid out as the input (dtype, strides), copied only where it is not: the loops walk both
// in the same order (sum().backward() hands over an expanded, stride-0 gradient)
Tensor laid_out_like(const Tensor& dy, const Tensor& x) {
  if (dy.scalar_type() == x.scalar_type() && readable(dy) && dy.strides().equals(x.strides())) {
    return dy;
  }
  Tensor matched = empty_output(x, /*kept=*/true);
  matched.copy_(dy);
  return matched;
}

// a tensor's data as T: the storage type S of the loops for activations (bfloat16 and float16 as their bits), the
// compute type A or double for the rest; the dtypes are checked where a call is taken
template <typename T>
const T* cp(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

template <typename T>
T* mp(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// what a call needs to know besides its tensors
struct Call {
  Geometry g;
  Tensor running_mean, running_var;  // training: updated when defined; evaluation: the statistics used
  bool training = true;
  double momentum = 0.1, eps = 1e-5;
  int64_t act = 0;
  int64_t nonfinite = 0;  // training: channels whose running statistics kept their values
};

// A batch split into runs (runs_for): the rows layout by rows of its lanes view, ncs by samples.
int64_t row_size(const Geometry& g) { return g.rows ? g.width : g.c * g.s; }  // elements of one of the g.n rows

int64_t bn_runs(const Geometry& g) { return runs_for(g.n, g.n * row_size(g), bn_parallel_from); }

// A rows-layout input of few rows (kChannelSplitRows at most, C values a row: no lanes) splits by channels
// instead: each run takes a block of channels over all rows, its statistics, y, dweight, dbias and dx whole, in one
// call of the loops: no merge of the runs' sums, no second pass, no per-channel step done once per run, which on
// such inputs cost more than the rows' own work. Split by rows (float32, 2 threads, median us, torch's beside,
// 2026-12-06): 16x8192 forward 135 (torch 112), forward+backward 303 (249); 32x2048 47 (50), 133 (135); 16x16384
// 344 (374), 977 (714). By channels: 71, 163; 25, 85; 189, 329; 64x2048 forward+backward 162 -> 121, 128x1024 at
// parity, evaluation within a few us either way. From 256 rows the blocks' rows, half a row each, read slower than
// whole rows (256x1024 forward 86 -> 127 us, 2048x512 111 -> 269). At least kChannelBlock channels a run; 1 where
// it does not apply (the rows split, bn_runs, then decides).
constexpr int64_t kChannelSplitRows = 64, kChannelBlock = 64;

int64_t channel_runs(const Geometry& g) {
  if (!g.rows || g.width != g.c || g.n > kChannelSplitRows) return 1;
  return std::min(bn_runs(g), g.c / kChannelBlock);
}

// f(lo, hi) for run t's block of channels [lo, hi), the blocks' edges on 64-byte lines of S (runs write no line in
// common where a row's bytes are a multiple of 64)
template <typename S, typename F>
void over_channel_blocks(int64_t c, int64_t runs, const F& f) {
  const int64_t unit = 64 / static_cast<int64_t>(sizeof(S));
  auto edge = [&](int64_t t) { return t == runs ? c : t * c / runs / unit * unit; };
  over_runs(runs, runs, [&](int64_t t, int64_t, int64_t) { f(edge(t), edge(t + 1)); });
}

// One run's training pass (mode kModeTrain: statistics and y; kModeStats: mean and biased variance only) on rows
// [lo, hi): the loops see the run as a batch of its own.
template <typename S, typename A>
void forward_run(const Loops<S, A>& k, const Geometry& g, const S* x, S* y, const A* w, const A* b, double* mean,
                 A* second, int64_t lo, int64_t hi, double eps, int64_t act, int64_t mode) {
  const int64_t off = lo * row_size(g);
  if (g.rows) {
    k.fwd_rows(x + off, y + off, w, b, mean, second, hi - lo, g.width, g.width, g.c, eps, act, mode);
  } else {
    k.fwd_ncs(x + off, y + off, w, b, mean, second, hi - lo, g.c, g.s, eps, act, mode);
  }
}

// One run's evaluation pass: y = act((x - mean) * w / sqrt(var + eps) + b) on rows [lo, hi); whole: the bytes of
// all of y (its streaming stores are chosen by them; y has x's size)
template <typename S, typename A>
void eval_run(const Loops<S, A>& k, const Geometry& g, const S* x, S* y, const A* w, const A* b, const A* mean,
              const A* var, int64_t lo, int64_t hi, double eps, int64_t act, int64_t whole) {
  const int64_t off = lo * row_size(g);
  if (g.rows) {
    k.eval_rows(x + off, y + off, w, b, mean, var, hi - lo, g.width, g.width, g.c, eps, act, whole);
  } else {
    k.eval_ncs(x + off, y + off, w, b, mean, var, hi - lo, g.c, g.s, eps, act, whole);
  }
}

// The training forward split into runs: each run's mean and biased variance (kModeStats), merged here in float64
// (Chan et al.: the runs' second moments about the batch mean), then each run normalized (apply_*) with the
// coefficients computed here once for all runs. Its reference point is the mean rounded to the compute type A and
// the rounding's remainder goes into the bias, as in the single-run loops, so a channel with a large mean keeps its
// precision.
template <typename S, typename A>
void forward_split(const Loops<S, A>& k, const Call& call, int64_t runs, const S* x, S* y, const A* w, const A* b,
                   double* mean, A* invstd, int64_t whole) {
  const Geometry& g = call.g;
  const int64_t c = g.c, per_channel = g.rows ? g.width / g.c : g.s;
  std::vector<double> means(runs * c);
  std::vector<A> vars(runs * c), ref(c), a(c), bias(c);
  over_runs(g.n, runs, [&](int64_t t, int64_t lo, int64_t hi) {
    forward_run(k, g, x, y, w, b, &means[t * c], &vars[t * c], lo, hi, call.eps, call.act, kModeStats);
  });
  std::vector<double> counts(runs);
  for (int64_t t = 0; t < runs; ++t) {
    counts[t] = static_cast<double>(((t + 1) * g.n / runs - t * g.n / runs) * per_channel);
  }
  // the merge, a step at a time over all channels, each step's loop vectorized (channel by channel, with the runs
  // in an inner loop, (256, 512) spent 4.8 us of its 21.5 us forward at 2 threads here); a channel's values are
  // added in run order either way
  const double total = static_cast<double>(g.n * per_channel);
  std::vector<double> m(c, 0.0), m2(c, 0.0);
  for (int64_t t = 0; t < runs; ++t) {
    const double n_t = counts[t];
    const double* mt = &means[t * c];
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) m[ch] += n_t * mt[ch];
  }
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) m[ch] /= total;
  for (int64_t t = 0; t < runs; ++t) {
    const double n_t = counts[t];
    const double* mt = &means[t * c];
    const A* vt = &vars[t * c];
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) {
      const double d = mt[ch] - m[ch];
      m2[ch] += n_t * (static_cast<double>(vt[ch]) + d * d);
    }
  }
  const A eps_a = static_cast<A>(call.eps);
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = m[ch];
    // as the loops' _invstd: var + eps rounded to A, the root in float64
    const A var_t = static_cast<A>(m2[ch] / total);
    const double inv = 1.0 / std::sqrt(static_cast<double>(static_cast<A>(var_t + eps_a)));
    invstd[ch] = static_cast<A>(inv);
    ref[ch] = static_cast<A>(m[ch]);
    const A a_ch = static_cast<A>(inv * static_cast<double>(w[ch]));
    a[ch] = a_ch;
    bias[ch] = static_cast<A>(static_cast<double>(b[ch]) - (m[ch] - static_cast<double>(ref[ch])) *
                              static_cast<double>(a_ch));
  }
  over_runs(g.n, runs, [&](int64_t, int64_t lo, int64_t hi) {
    const int64_t off = lo * row_size(g);
    if (g.rows) {
      k.apply_rows(x + off, y + off, ref.data(), a.data(), bias.data(), hi - lo, g.width, c, call.act, whole);
    } else {
      k.apply_ncs(x + off, y + off, ref.data(), a.data(), bias.data(), hi - lo, c, g.s, call.act, whole);
    }
  });
}

// Forward: y (allocated here), and in training the batch's mean (float64) and invstd into the given tensors;
// the running statistics are updated when the call has them.
template <typename S, typename A>
void forward_loops(const Loops<S, A>& k, Call& call, const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& b,
                   const Tensor& mean, const Tensor& invstd) {
  const Geometry& g = call.g;
  const int64_t runs = bn_runs(g), blocks = channel_runs(g);
  const S* xp = cp<S>(x);
  S* yp = mp<S>(y);
  const A *wp = cp<A>(w), *bp = cp<A>(b);
  if (blocks > 1) {
    over_channel_blocks<S>(g.c, blocks, [&](int64_t lo, int64_t hi) {
      if (call.training) {
        k.fwd_rows(xp + lo, yp + lo, wp + lo, bp + lo, mp<double>(mean) + lo, mp<A>(invstd) + lo, g.n, g.width,
                   hi - lo, hi - lo, call.eps, call.act, kModeTrain);
      } else {
        k.eval_rows(xp + lo, yp + lo, wp + lo, bp + lo, cp<A>(call.running_mean) + lo, cp<A>(call.running_var) + lo,
                    g.n, g.width, hi - lo, hi - lo, call.eps, call.act, x.nbytes());
      }
    });
  } else if (!call.training) {
    over_runs(g.n, runs, [&](int64_t, int64_t lo, int64_t hi) {
      eval_run(k, g, xp, yp, wp, bp, cp<A>(call.running_mean), cp<A>(call.running_var), lo, hi, call.eps, call.act,
               x.nbytes());
    });
  } else if (runs > 1) {
    forward_split(k, call, runs, xp, yp, wp, bp, mp<double>(mean), mp<A>(invstd), x.nbytes());
  } else {
    forward_run(k, g, xp, yp, wp, bp, mp<double>(mean), mp<A>(invstd), 0, g.n, call.eps, call.act, kModeTrain);
  }
  if (call.training && call.running_mean.defined()) {
    const int64_t count = x.numel() / g.c;
    call.nonfinite = k.running(mp<A>(call.running_mean), mp<A>(call.running_var), cp<double>(mean), cp<A>(invstd),
                               g.c, call.eps, count, call.momentum);
  }
}

// Runs' dweight/dbias partials: run t writes its c values of each at partial_dw(t), partial_db(t) of a vector of
// 2 * runs * c; sum_runs adds them in float64 into dw and db (T), and into dw64/db64 where given.
template <typename T>
struct RunPartials {
  int64_t c;
  std::vector<T> values;
  RunPartials(int64_t runs, int64_t channels) : c(channels), values(runs > 1 ? 2 * runs * channels : 0) {}
  T* dw(int64_t t) { return &values[2 * t * c]; }
  T* db(int64_t t) { return &values[(2 * t + 1) * c]; }

  // a run's whole row at a time, in float64, in run order: a channel at a time (a loop over the runs for each
  // channel) did not vectorize, which on layer norm's K-wide partials (K in the thousands) cost more than the rows
  void sum_runs(int64_t runs, T* dw_out, T* db_out, double* dw64 = nullptr, double* db64 = nullptr) const {
    std::vector<double> sw(c, 0.0), sb(c, 0.0);
    for (int64_t t = 0; t < runs; ++t) {
      const T* pw = &values[2 * t * c];
      const T* pb = &values[(2 * t + 1) * c];
      for (int64_t ch = 0; ch < c; ++ch) sw[ch] += pw[ch];
      for (int64_t ch = 0; ch < c; ++ch) sb[ch] += pb[ch];
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      dw_out[ch] = static_cast<T>(sw[ch]);
      db_out[ch] = static_cast<T>(sb[ch]);
    }
    if (dw64 != nullptr) {
      std::copy(sw.begin(), sw.end(), dw64);
      std::copy(sb.begin(), sb.end(), db64);
    }
  }
};

// Backward. Split into runs, each run's dweight/dbias are partial sums, added here in float64; in training dx
// needs the whole batch's sums, so a second pass over the runs computes it (dx_rows/dx_ncs), while in evaluation
// dx comes with the first pass.
template <typename S, typename A>
void backward_loops(const Loops<S, A>& k, const Geometry& g, const Tensor& dy, const Tensor& x, const Tensor& w,
                    const Tensor& b, const Tensor& mean, const Tensor& invstd, bool training, int64_t act,
                    const Tensor& dx, const Tensor& dw, const Tensor& db) {
  const bool need_dx = dx.defined();
  const int64_t runs = bn_runs(g), c = g.c, per = row_size(g);
  const S *dyp = cp<S>(dy), *xp = cp<S>(x);
  const A *wp = cp<A>(w), *bp = cp<A>(b), *ip = cp<A>(invstd);
  const double* mp_ = cp<double>(mean);
  S* dxp = need_dx ? mp<S>(dx) : const_cast<S*>(xp);  // not written without need_dx
  const int64_t blocks = channel_runs(g);
  if (blocks > 1) {
    over_channel_blocks<S>(c, blocks, [&](int64_t lo, int64_t hi) {
      k.bwd_rows(dyp + lo, xp + lo, wp + lo, bp + lo, mp_ + lo, ip + lo, dxp + lo, mp<A>(dw) + lo, mp<A>(db) + lo, g.n,
                 g.width, hi - lo, hi - lo, act, training, need_dx);
    });
    return;
  }
  RunPartials<A> partial(runs, c);
  const bool dx_with_sums = need_dx && (runs == 1 || !training);
  over_runs(g.n, runs, [&](int64_t t, int64_t lo, int64_t hi) {
    A* dwt = runs == 1 ? mp<A>(dw) : partial.dw(t);
    A* dbt = runs == 1 ? mp<A>(db) : partial.db(t);
    const int64_t off = lo * per;
    if (g.rows) {
      k.bwd_rows(dyp + off, xp + off, wp, bp, mp_, ip, dxp + off, dwt, dbt, hi - lo, g.width, g.width, c, act,
                 training, dx_with_sums);
    } else {
      k.bwd_ncs(dyp + off, xp + off, wp, bp, mp_, ip, dxp + off, dwt, dbt, hi - lo, c, g.s, act, training,
                dx_with_sums);
    }
  });
  if (runs == 1) return;
  std::vector<double> dw64(c), db64(c);
  partial.sum_runs(runs, mp<A>(dw), mp<A>(db), dw64.data(), db64.data());
  if (!need_dx || dx_with_sums) return;
  const int64_t count = x.numel() / c, whole = x.nbytes();  // dx has x's size
  over_runs(g.n, runs, [&](int64_t, int64_t lo, int64_t hi) {
    const int64_t off = lo * per;
    if (g.rows) {
      k.dx_rows(dyp + off, xp + off, wp, bp, mp_, ip, dw64.data(), db64.data(), dxp + off, hi - lo, g.width, c, act,
                count, whole);
    } else {
      k.dx_ncs(dyp + off, xp + off, wp, bp, mp_, ip, dw64.data(), db64.data(), dxp + off, hi - lo, c, g.s, act,
               count, whole);
    }
  });
}

// The forward's statistics: the batch's in training; in evaluation the running ones, as the backward takes them.
void forward_any(Call& call, const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& b, Tensor& mean,
                 Tensor& invstd, bool keep_stats) {
  const auto opts = x.options();
  if (call.training) {
    mean = at::empty({call.g.c}, opts.dtype(at::kDouble));
    invstd = at::empty({call.g.c}, opts.dtype(acc_type(x.scalar_type())));
  } else if (keep_stats) {
    mean = call.running_mean.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
    invstd = (call.running_var + call.eps).rsqrt();
  }
  with_loops(x, [&](const auto& k) { forward_loops(k, call, x, y, w, b, mean, invstd); });
}

// y = act(z): the activation codes of normlab.kernels.cpu_numba (IDENTITY, RELU, SILU, SIGMOID)
Tensor activation(const Tensor& z, int64_t act) {
  switch (act) {
    case 1:
      return at::relu(z);
    case 2:
      return at::silu(z);
    case 3:
      return at::sigmoid(z);
    default:
      return z;
  }
}

// The autograd nodes are written as torch's generated ones: saved inputs as members, the backward as apply().
// torch::autograd::Function keeps saved values in a map of IValues and wraps each call and output, which took
// ~2.5 us of a (64, 256) layer norm's ~10 us forward.
using NodePtr = decltype(torch::autograd::Edge::function);  // std::shared_ptr<Node> in older torch, else intrusive

template <typename N>
std::pair<NodePtr, N*> new_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    N* raw = new N();
    return {std::shared_ptr<N>(raw, [](N* n) { deleteNode(n); }), raw};  // deleteNode: found by ADL
  } else {
    auto p = c10::make_intrusive<N>();
    N* raw = p.get();
    return {NodePtr(std::move(p)), raw};
  }
}

// A node that hands no gradient back (undefined: allow_unused's None) to the inputs it links, for the gradients
// below that depend on none of them.
struct Unconnected : Node {
  std::string name() const override { return "NormlabUnconnectedBackward"; }
  variable_list apply(variable_list&&) override { return variable_list(num_outputs()); }
};

// The gradients (dx, dweight, dbias) of the recomputed output y with respect to those of (x, weight, bias) that
// need one, the rest undefined; with create_graph, as a differentiable graph (double backward), where, as in
// torch's double-backward nodes, each requires grad when dy, x, weight or bias does, even one that depends on
// none of them (evaluation's dx = dy * invstd * weight for a constant dy, the bias's sum of dy): differentiated
// again it gives None (allow_unused) where an error would say it does not require grad.
variable_list differentiate(const Tensor& y, const Tensor& dy, const Tensor& x, const Tensor& weight,
                            const Tensor& bias, bool need_dx, bool need_dw, bool need_db, bool create_graph) {
  variable_list wrt;
  if (need_dx) wrt.push_back(x);
  if (need_dw) wrt.push_back(weight);
  if (need_db) wrt.push_back(bias);
  const variable_list g = torch::autograd::grad({y}, wrt, {dy}, /*retain_graph=*/create_graph, create_graph,
                                                /*allow_unused=*/true);
  variable_list out(3);
  size_t i = 0;
  if (need_dx) out[0] = g[i++];
  if (need_dw) out[1] = g[i++];
  if (need_db) out[2] = g[i++];
  if (!create_graph || !(dy.requires_grad() || x.requires_grad() || weight.requires_grad() || bias.requires_grad())) {
    return out;
  }
  NodePtr self;
  for (Tensor& t : out) {
    if (!t.defined() || t.requires_grad()) continue;
    if (!self) {
      Unconnected* raw;
      std::tie(self, raw) = new_node<Unconnected>();
      raw->set_next_edges(torch::autograd::collect_next_edges(dy, x, weight, bias));
    }
    t = t.detach();  // an alias of its own: the graph's tensor (dy itself, perhaps) keeps no history
    torch::autograd::set_history(t, self);
  }
  return out;
}

// Whether a call records an autograd node: grad mode on and an input (x, weight or bias, each may be undefined)
// that requires a gradient.
bool records_node(const Tensor& x, const Tensor& w, const Tensor& b) {
  return torch::autograd::GradMode::is_enabled() &&
         (x.requires_grad() || (w.defined() && w.requires_grad()) || (b.defined() && b.requires_grad()));
}

// Forward-mode AD is not implemented by these nodes: inputs with tangents go to the Python glue (torch ops).
bool has_forward_grad(const Tensor& x, const Tensor& w, const Tensor& b) {
  for (const Tensor* t : {&x, &w, &b}) {
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// What both nodes keep for the backward: the inputs (weight and bias defined: ones and zeros stand in for absent
// ones, as the next edges need an input each), the forward's statistics, and a 16-bit model's weight and bias in
// the compute dtype as the forward converted them (the loops read them so; undefined where they read the
// parameters in place). Next edges: x, weight, bias.
struct NormNode : Node {
  SavedVariable x_, weight_, bias_;
  Tensor mean_, invstd_, weight_acc_, bias_acc_;

  // the next edges to the inputs, y's history on this node, and what the backward needs; weight_acc and bias_acc:
  // weight and bias as the loops read them
  void record(const NodePtr& self, const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y,
              const Tensor& mean, const Tensor& invstd, const Tensor& weight_acc, const Tensor& bias_acc) {
    set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
    torch::autograd::set_history(y, self);
    x_ = SavedVariable(x, /*is_output=*/false);
    weight_ = SavedVariable(weight, /*is_output=*/false);
    bias_ = SavedVariable(bias, /*is_output=*/false);
    mean_ = mean;
    invstd_ = invstd;
    if (!weight_acc.is_same(weight)) weight_acc_ = weight_acc;
    if (!bias_acc.is_same(bias)) bias_acc_ = bias_acc;
  }

  // weight or bias (unpacked, checked against in-place changes) as the loops read them
  Tensor weight_acc(const Tensor& weight) const { return weight_acc_.defined() ? weight_acc_ : weight; }
  Tensor bias_acc(const Tensor& bias) const { return bias_acc_.defined() ? bias_acc_ : bias; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    weight_.reset_data();
    bias_.reset_data();
    mean_.reset();
    invstd_.reset();
    weight_acc_.reset();
    bias_acc_.reset();
  }

  variable_list apply(variable_list&& grads) final {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    const bool need_dx = task_should_compute_output(0), need_dw = task_should_compute_output(1),
               need_db = task_should_compute_output(2);
    const bool create_graph = torch::autograd::GradMode::is_enabled();
    // Double backward (create_graph), or a dy that wraps another tensor and has no storage for the loops to read
    // (torch.func's vmap over this backward: a vectorized jacobian, gradcheck's batched gradients) or one that
    // dispatches: the differentiable form, in ATen ops (its recomputed forward recorded, the gradients a graph
    // only where one was asked for).
    if (create_graph || !dy.has_storage() || dispatches(dy)) {
      at::AutoGradMode grad_mode(true);
      return differentiable_backward(dy, x_.unpack(), weight_.unpack(), bias_.unpack(), need_dx, need_dw, need_db,
                                     create_graph);
    }
    return backward(dy, x_.unpack(), weight_.unpack(), bias_.unpack(), need_dx, need_dw, need_db);
  }

  // (dx, dweight, dbias), each undefined where not needed: by the loops
  virtual variable_list backward(Tensor dy, const Tensor& x, const Tensor& weight, const Tensor& bias, bool need_dx,
                                 bool need_dw, bool need_db) = 0;
  // the same through the forward recomputed with ATen ops, then autograd.grad (with create_graph: a graph of its
  // own)
  virtual variable_list differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                const Tensor& bias, bool need_dx, bool need_dw, bool need_db,
                                                bool create_graph) const = 0;
};

struct BatchNormBackward : NormNode {
  bool training = true;
  double eps = 1e-5;
  int64_t act = 0;

  std::string name() const override { return "NormlabBatchNormBackward"; }

  variable_list backward(Tensor dy, const Tensor& x, const Tensor& weight, const Tensor& bias, bool need_dx,
                         bool need_dw, bool need_db) override {
    Geometry g;
    geometry(x, g);
    dy = laid_out_like(dy, x);
    const auto acc = acc_type(x.scalar_type());
    Tensor dx = need_dx ? empty_output(x, /*kept=*/true) : Tensor();
    Tensor dw = at::empty({g.c}, x.options().dtype(acc)), db = at::empty({g.c}, x.options().dtype(acc));
    with_loops(x, [&](const auto& k) {
      backward_loops(k, g, dy, x, weight_acc(weight), bias_acc(bias), mean_, invstd_, training, act, dx, dw, db);
    });
    // the parameters' gradients in their own dtype (a 16-bit model's: rounded once)
    return {dx, need_dw ? in_dtype(dw, weight.scalar_type()) : Tensor(),
            need_db ? in_dtype(db, bias.scalar_type()) : Tensor()};
  }

  // statistics from x in training
  variable_list differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                        bool need_dx, bool need_dw, bool need_db, bool create_graph) const override {
    std::vector<int64_t> dims{0}, shape(x.dim(), 1);
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    shape[1] = x.size(1);
    Tensor z;
    if (training) {
      Tensor mu = x.mean(dims, /*keepdim=*/true);
      Tensor centred = x - mu;
      z = centred * (centred.pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt();
    } else {
      z = (x - mean_.to(x.scalar_type()).view(shape)) * invstd_.view(shape);
    }
    // in x's dtype, as the forward's output (16-bit inputs with float32 parameters promote)
    const Tensor y = activation(z * weight.view(shape) + bias.view(shape), act).to(x.scalar_type());
    return differentiate(y, dy, x, weight, bias, need_dx, need_dw, need_db, create_graph);
  }
};

// Batch norm of x, fused with an activation, when this glue takes the call: (y, status). status >= 0: done, the
// number of channels whose running statistics kept their values (non-finite batch statistics); kUnsupported:
// y is None and nothing happened (the Python glue takes the call); kNoLoops: load the loops for x's dtype.
// training: normalize with the batch's statistics and update running_mean/var (when given) with weight momentum
// on the batch; evaluation: normalize with running_mean/var.
// counter (training, a module's num_batches_tracked: a CPU int64 scalar): counted here once the call is taken, as
// torch's layer counts before its forward; cumulative: the running statistics' weight is 1 / count instead of
// momentum (momentum=None). A module's whole forward is then this one call: the counting alone, through Python,
// cost as much as the rest of a small layer's forward once its code had left the caches.
std::tuple<Tensor, int64_t> batch_norm(const Tensor& x, const c10::optional<Tensor>& weight,
                                       const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                                       const c10::optional<Tensor>& running_var, bool training, double momentum,
                                       double eps, int64_t act, const c10::optional<Tensor>& counter,
                                       bool cumulative) {
  Call call;
  // the Python glue takes larger inputs, and says what is wrong with bad ones
  if (!geometry(x, call.g) || x.numel() * x.element_size() >= (call.g.rows ? bn_rows_below : bn_ncs_below) ||
      !(eps > 0.0) || std::isinf(eps) || (training && x.numel() == x.size(1))) {
    return {Tensor(), kUnsupported};
  }
  const auto st = x.scalar_type(), acc = acc_type(st);
  if (const int64_t status = loops_status(x); status != 0) return {Tensor(), status};
  const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  call.running_mean = running_mean.value_or(Tensor());
  call.running_var = running_var.value_or(Tensor());
  const int64_t c = call.g.c;
  if (!vector_ok(w, c, st) || !vector_ok(b, c, st) || !vector_ok(call.running_mean, c, st) ||
      !vector_ok(call.running_var, c, st) || call.running_mean.defined() != call.running_var.defined() ||
      (!training && !call.running_mean.defined()) ||
      (call.running_mean.defined() && (call.running_mean.requires_grad() || call.running_var.requires_grad()))) {
    return {Tensor(), kUnsupported};
  }
  call.training = training;
  call.momentum = momentum;
  call.eps = eps;
  call.act = act;
  const bool grad = records_node(x, w, b);
  if (grad && has_forward_grad(x, w, b)) return {Tensor(), kUnsupported};
  const Tensor count = training ? counter.value_or(Tensor()) : Tensor();  // evaluation counts nothing
  if (count.defined() && !counter_ok(count)) return {Tensor(), kUnsupported};
  if (training && cumulative && !count.defined()) return {Tensor(), kUnsupported};  // 1 / count needs a count
  if (count.defined()) {
    const int64_t batches = ++*count.data_ptr<int64_t>();
    count.unsafeGetTensorImpl()->bump_version();  // as add_(1)
    if (cumulative) call.momentum = 1.0 / static_cast<double>(batches);
  }
  const auto opts = x.options().dtype(acc);
  const Tensor w_or_ones = or_filled(w, c, opts, 1.0), b_or_zeros = or_filled(b, c, opts, 0.0);
  // 16-bit running statistics (a converted model's) are read and updated in float32 copies, rounded back after
  const Tensor running_mean16 = call.running_mean, running_var16 = call.running_var;
  call.running_mean = in_dtype(running_mean16, acc);
  call.running_var = in_dtype(running_var16, acc);
  Tensor y = empty_output(x, grad), mean, invstd;
  const Tensor w_acc = in_dtype(w_or_ones, acc), b_acc = in_dtype(b_or_zeros, acc);
  forward_any(call, x, y, w_acc, b_acc, mean, invstd, /*keep_stats=*/grad);
  if (training && running_mean16.defined() && !running_mean16.is_same(call.running_mean)) {
    convert_into(call.running_mean, running_mean16);
    convert_into(call.running_var, running_var16);
    running_mean16.unsafeGetTensorImpl()->bump_version();  // written in place, as copy_ would
    running_var16.unsafeGetTensorImpl()->bump_version();
  }
  if (grad) {
    auto [self, node] = new_node<BatchNormBackward>();
    node->record(self, x, w_or_ones, b_or_zeros, y, mean, invstd, w_acc, b_acc);
    node->training = training;
    node->eps = eps;
    node->act = act;
  }
  return {y, call.nonfinite};
}

// ---------------------------------------------------------------------------------------------------------------
// group norm (layer norm: G = 1 on (M, K, 1); instance norm: G = C), on a contiguous (N, C, S) input
// ---------------------------------------------------------------------------------------------------------------
struct GroupCall {
  int64_t n = 0, c = 0, s = 0, groups = 1;
  double eps = 1e-5;
  bool layer = false;  // G = 1 and S = 1: the layer-norm loops on (M, K)
};

// Samples are independent: with more than one torch thread, inputs of `from` elements and more (parallel_from
// forward, backward_parallel_from backward) are split into one run of samples (rows, for layer norm) per thread
// (see runs_for).
int64_t group_runs(const GroupCall& g, int64_t from) { return runs_for(g.n, g.n * g.c * g.s, from); }

// Layer norm's backward splits only where each run gets this many rows or more: every run adds dweight and dbias
// partials of K values, merged afterwards, which on few long rows cost more than the split saves (2 threads, in a
// rotation with torch and a 4 MB copy, fwd+bwd us split -> one run: 16x4096 184 -> 157 and 103 -> 103, 8x8192
// 164 -> 144; 32x2048, 128x512, 256x256 within 1-2 % either way; 64x1024 115 -> 119, 128x1024 199 -> 211)
constexpr int64_t kLayerBackwardRowsPerRun = 16;

int64_t group_backward_runs(const GroupCall& g) {
  const int64_t runs = group_runs(g, backward_parallel_from);
  return g.layer && g.n < runs * kLayerBackwardRowsPerRun ? 1 : runs;
}

template <typename S, typename A>
void group_forward_loops(const Loops<S, A>& k, const GroupCall& g, const Tensor& x, const Tensor& y, const Tensor& w,
                         const Tensor& b, const Tensor& mean, const Tensor& invstd) {
  // whole: the bytes of all of y (x's size), which each run's streaming stores follow
  const int64_t per = g.c * g.s, stats = g.layer ? 1 : g.groups, whole = x.nbytes();
  const S* xp = cp<S>(x);
  S* yp = mp<S>(y);
  const A *wp = cp<A>(w), *bp = cp<A>(b);
  A *mp_ = mp<A>(mean), *ip = mp<A>(invstd);
  over_runs(g.n, group_runs(g, parallel_from), [&](int64_t, int64_t lo, int64_t hi) {
    if (g.layer) {
      k.ln_fwd(xp + lo * per, yp + lo * per, wp, bp, mp_ + lo, ip + lo, hi - lo, g.c, g.eps, whole);
    } else {
      k.gn_fwd(xp + lo * per, yp + lo * per, wp, bp, mp_ + lo * stats, ip + lo * stats, hi - lo, g.c, g.s, g.groups,
               g.eps, whole);
    }
  });
}

// dw and db: one run writes them, several write partials (RunPartials), summed here in float64
template <typename S, typename A>
void group_backward_loops(const Loops<S, A>& k, const GroupCall& g, const Tensor& dy, const Tensor& x,
                          const Tensor& w, const Tensor& mean, const Tensor& invstd, const Tensor& dx,
                          const Tensor& dw, const Tensor& db, bool need_wb) {
  const bool need_dx = dx.defined();
  const int64_t runs = group_backward_runs(g), per = g.c * g.s, stats = g.layer ? 1 : g.groups,
                whole = x.nbytes();  // as the forward's, for dx
  RunPartials<A> partial(runs, g.c);
  const S *dyp = cp<S>(dy), *xp = cp<S>(x);
  const A *wp = cp<A>(w), *mp_ = cp<A>(mean), *ip = cp<A>(invstd);
  S* dxp = need_dx ? mp<S>(dx) : const_cast<S*>(xp);  // not written without need_dx
  over_runs(g.n, runs, [&](int64_t t, int64_t lo, int64_t hi) {
    const int64_t off = lo * per;
    A* dwt = runs == 1 ? mp<A>(dw) : partial.dw(t);
    A* dbt = runs == 1 ? mp<A>(db) : partial.db(t);
    if (g.layer) {
      k.ln_bwd(dyp + off, xp + off, wp, mp_ + lo, ip + lo, dxp + off, dwt, dbt, hi - lo, g.c, need_dx, need_wb,
               whole);
    } else {
      k.gn_bwd(dyp + off, xp + off, wp, mp_ + lo * stats, ip + lo * stats, dxp + off, dwt, dbt, hi - lo, g.c, g.s,
               g.groups, need_dx, whole);
    }
  });
  if (runs > 1 && (need_wb || !g.layer)) partial.sum_runs(runs, mp<A>(dw), mp<A>(db));
}

struct GroupNormBackward : NormNode {
  int64_t groups = 1, s = 1;
  double eps = 1e-5;

  std::string name() const override { return "NormlabGroupNormBackward"; }

  // the call's geometry (weight stands for the channels: ones where the layer has none)
  GroupCall call(const Tensor& x, const Tensor& weight) const {
    GroupCall g;
    g.groups = groups;
    g.eps = eps;
    g.c = weight.numel();
    g.s = s;
    g.n = x.numel() / (g.c * g.s);
    g.layer = g.groups == 1 && g.s == 1;
    return g;
  }

  variable_list differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                        bool need_dx, bool need_dw, bool need_db, bool create_graph) const override {
    const GroupCall g = call(x, weight);
    const Tensor xr = x.reshape({g.n, g.groups, -1});
    const Tensor centred = xr - xr.mean({2}, /*keepdim=*/true);
    const Tensor xhat = (centred * (centred.pow(2).mean({2}, /*keepdim=*/true) + g.eps).rsqrt());
    const Tensor y = (xhat.view({g.n, g.c, g.s}) * weight.reshape({1, g.c, 1}) + bias.reshape({1, g.c, 1}))
                         .view(x.sizes())
                         .to(x.scalar_type());
    return differentiate(y, dy, x, weight, bias, need_dx, need_dw, need_db, create_graph);
  }

  variable_list backward(Tensor dy, const Tensor& x, const Tensor& weight, const Tensor& bias, bool need_dx,
                         bool need_dw, bool need_db) override {
    const GroupCall g = call(x, weight);
    dy = laid_out_like(dy, x);
    const auto acc = acc_type(x.scalar_type());
    Tensor dx = need_dx ? empty_output(x, /*kept=*/true) : Tensor();
    // the parameters' shapes (layer norm: any), in the compute dtype; returned in their own
    Tensor dw = at::empty(weight.sizes(), weight.options().dtype(acc)),
           db = at::empty(bias.sizes(), bias.options().dtype(acc));
    with_loops(x, [&](const auto& k) {
      group_backward_loops(k, g, dy, x, weight_acc(weight), mean_, invstd_, dx, dw, db, need_dw || need_db);
    });
    return {dx, need_dw ? in_dtype(dw, weight.scalar_type()) : Tensor(),
            need_db ? in_dtype(db, bias.scalar_type()) : Tensor()};
  }
};

// Group norm of a contiguous (N, C, *) input, or, with a non-empty `layer_shape`, layer norm over x's trailing
// dimensions, which must equal it (statistics per leading index; weight and bias of that shape), when this glue
// takes the call: (y, mean, invstd, status). y has x's shape; statistics (N, G), layer norm (M, 1); status as
// batch_norm's (y None unless 0). Bad arguments are declined too: the Python glue's checks say what is wrong.
std::tuple<Tensor, Tensor, Tensor, int64_t> group_norm(const Tensor& x, const c10::optional<Tensor>& weight,
                                                       const c10::optional<Tensor>& bias, int64_t groups,
                                                       double eps, const std::vector<int64_t>& layer_shape) {
  const Tensor none;
  if (!readable(x) || x.dim() < 2 || !x.is_contiguous() || !(eps > 0.0) || std::isinf(eps)) {
    return {none, none, none, kUnsupported};
  }
  const auto st = x.scalar_type(), acc = acc_type(st);
  const int64_t numel = x.numel();
  if (!storage_ok(st) || numel == 0 || numel * x.element_size() >= group_below) {
    return {none, none, none, kUnsupported};
  }
  if (const int64_t status = loops_status(x); status != 0) return {none, none, none, status};
  GroupCall g;
  const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  if (!layer_shape.empty()) {
    const int64_t k = static_cast<int64_t>(layer_shape.size());
    if (k > x.dim() || !x.sizes().slice(x.dim() - k).equals(layer_shape) ||
        (w.defined() && !w.sizes().equals(layer_shape)) || (b.defined() && !b.sizes().equals(layer_shape))) {
      return {none, none, none, kUnsupported};
    }
    int64_t layer_k = 1;
    for (const int64_t v : layer_shape) layer_k *= v;
    g.n = numel / layer_k;
    g.c = layer_k;
    g.s = 1;
    groups = 1;
  } else {
    g.n = x.size(0);
    g.c = x.size(1);
    g.s = numel / (g.n * g.c);
  }
  g.groups = groups;
  g.eps = eps;
  g.layer = groups == 1 && g.s == 1;
  // numel == groups: one value in all per group over the batch, which torch.nn.functional.group_norm rejects
  // (the Python glue raises its error)
  if (groups <= 0 || g.c % groups != 0 || (layer_shape.empty() && numel == groups) || !vector_ok(w, g.c, st) ||
      !vector_ok(b, g.c, st)) {
    return {none, none, none, kUnsupported};
  }
  const auto opts = x.options().dtype(acc);
  const Tensor w_or_ones = or_filled(w, g.c, opts, 1.0);
  const Tensor b_or_zeros = b.defined() ? b : at::zeros_like(w_or_ones);  // the weight's shape (layer norm: any)
  const bool grad = records_node(x, w, b);
  if (grad && has_forward_grad(x, w, b)) return {none, none, none, kUnsupported};
  Tensor y = empty_output(x, grad), mean = at::empty({g.n, groups}, opts), invstd = at::empty({g.n, groups}, opts);
  const Tensor w_acc = in_dtype(w_or_ones, acc), b_acc = in_dtype(b_or_zeros, acc);
  with_loops(x, [&](const auto& k) { group_forward_loops(k, g, x, y, w_acc, b_acc, mean, invstd); });
  if (grad) {
    auto [self, node] = new_node<GroupNormBackward>();
    node->record(self, x, w_or_ones, b_or_zeros, y, mean, invstd, w_acc, b_acc);
    node->groups = g.groups;
    node->s = g.s;
    node->eps = g.eps;
  }
  return {y, mean, invstd, 0};
}

// no addresses: the host's loops do not take this dtype, and calls with it go to the Python glue
void set_loops(const std::string& dtype, const std::vector<int64_t>& addresses) {
  if (dtype == "float32") {
    loops32.set(addresses);
  } else if (dtype == "float64") {
    loops64.set(addresses);
  } else if (dtype == "bfloat16") {
    loops_bf16.set(addresses);
  } else if (dtype == "float16") {
    loops_f16.set(addresses);
  } else {
    TORCH_CHECK(false, "normlab native: no loops for dtype ", dtype,
                "; expected float32, float64, bfloat16 or float16");
  }
}

void configure(int64_t bn_rows_bytes, int64_t bn_ncs_bytes, int64_t group_bytes, int64_t lanes_from_numel,
               int64_t lanes, int64_t split_from, int64_t backward_split_from, int64_t bn_split_from,
               int64_t pool_from_bytes, int64_t pool_kept_from_bytes, int64_t pool_grain_bytes,
               int64_t pool_cap_bytes) {
  TORCH_CHECK(pool_grain_bytes > 0, "normlab native: the output pool's grain must be positive, got ",
              pool_grain_bytes);
  pool_from = pool_from_bytes;
  pool_kept_from = pool_kept_from_bytes;
  pool_grain = pool_grain_bytes;
  pool_cap = pool_cap_bytes;
  bn_rows_below = bn_rows_bytes;
  bn_ncs_below = bn_ncs_bytes;
  group_below = group_bytes;
  lanes_from = lanes_from_numel;
  lanes_max = lanes;
  parallel_from = split_from;
  backward_parallel_from = backward_split_from;
  bn_parallel_from = bn_split_from;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifndef _WIN32
  pthread_atfork(nullptr, nullptr, &after_fork_in_child);
#endif
  m.doc() = "normlab's native glue: the norm layers on CPU inputs without Python between the calls";
  // without the GIL while they run, as torch's own operators (the backward runs in autograd's engine without it
  // anyway): other Python threads go on meanwhile
  m.def("batch_norm", &batch_norm, "batch norm, fused with an activation: (y, status)",
        py::call_guard<py::gil_scoped_release>());
  m.def("group_norm", &group_norm,
        "group norm of a contiguous (N, C, *) input, or layer norm over its trailing layer_shape: (y, mean, invstd, "
        "status)",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_loops", &set_loops, "the numba loops' C entry points for one dtype (none: not on this host)");
  m.def("configure", &configure,
        "configure(bn_rows_below, bn_ncs_below, group_below, lanes_from, lanes_max, parallel_from, "
        "backward_parallel_from, bn_parallel_from, pool_from, pool_kept_from, pool_grain, pool_cap): the bytes below "
        "which this "
        "glue takes batch norm's rows and (N, C, S) layouts and group norm's inputs, the lanes of the rows layout, "
        "the sizes (elements) from which group norm's forward and backward and batch norm's inputs are split over "
        "torch's threads, the bytes from which outputs come from the output pool (any; those that outlive the "
        "call), the multiple its sizes are rounded up to and the most it keeps free");
  m.def("pool_clear", [] { return output_pool().clear(); }, "unmap the output pool's free maps; how many");
  m.def("pool_free_bytes", [] { return output_pool().held(); }, "bytes held in the output pool's free maps");
  m.attr("UNSUPPORTED") = kUnsupported;
  m.attr("NO_LOOPS") = kNoLoops;
}
