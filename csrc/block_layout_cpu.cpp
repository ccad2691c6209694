// CPU block-sparse layout ops (see block_layout.h), threaded with at::parallel_for (OpenMP: it
// shares torch's thread pool and torch.set_num_threads).
//
// block_layout: contiguous mask rows are turned into bit masks 8 bytes at a time and only the set
// bits are visited, so a sparse mask costs little more than reading it. The transpose is built
// straight from the mask, 64 key blocks at a time, so that the mask is read row by row (cache
// lines) and not column by column.
//
// select_blocks: a row's scores become unique 64-bit keys that sort in rank order (higher score
// first, then lower column), so ranking is integer selection: std::nth_element for ratio mode,
// and for mass mode a partial sort that grows until the kept mass is reached (rows of peaked
// softmax stop after a few blocks instead of sorting all Mk).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "block_layout.h"

namespace kdlib {
namespace {

// Below about this many elements of work a task runs on one thread: waking the team costs more.
constexpr int64_t kGrainElems = 1 << 15;
// Key blocks per task of the transpose: 64 output lists are filled at once while the mask is
// streamed row by row.
constexpr int64_t kColumnsPerTask = 64;

// A 4-D tensor as raw memory: element (a, b, c, d) is at data + a*stride[0] + ... + d*stride[3].
template <typename T>
struct View4 {
  const T* data;
  int64_t size[4];
  int64_t stride[4];

  explicit View4(const at::Tensor& t) : data(static_cast<const T*>(t.const_data_ptr())) {
    for (int k = 0; k < 4; ++k) {
      size[k] = t.size(k);
      stride[k] = t.stride(k);
    }
  }
  // The start of row (b, h, i) for a flat row number over [dim0, dim1, dim2].
  const T* row(int64_t flat) const {
    const int64_t i = flat % size[2], bh = flat / size[2];
    return data + (bh / size[1]) * stride[0] + (bh % size[1]) * stride[1] + i * stride[2];
  }
};

// ---- block_layout ------------------------------------------------------------------------------

// Bit k set iff byte p[k] (k < 8) is non-zero: SWAR on one 64-bit word, any byte values.
inline uint32_t nonzero_bytes(const uint8_t* p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t word;
  std::memcpy(&word, p, sizeof(word));
  constexpr uint64_t low7 = 0x7F7F7F7F7F7F7F7Full, high = 0x8080808080808080ull;
  const uint64_t top = (((word & low7) + low7) | word) & high;  // the top bit of each non-zero byte
  // Gathers bit 8k + 7 into bit 56 + k: the multiplier's partial products never overlap there.
  return static_cast<uint32_t>(((top >> 7) * 0x0102040810204080ull) >> 56);
#else
  uint32_t bits = 0;
  for (int k = 0; k < 8; ++k) bits |= static_cast<uint32_t>(p[k] != 0) << k;
  return bits;
#endif
}

// Bit k set iff byte p[k] (k < 64) is non-zero.
inline uint64_t nonzero_bytes64(const uint8_t* p) {
  uint64_t bits = 0;
  for (int k = 0; k < 8; ++k) bits |= static_cast<uint64_t>(nonzero_bytes(p + 8 * k)) << (8 * k);
  return bits;
}

// The ascending columns j < n with row[j * step] set, into list[0, count); returns count.
// Contiguous rows are read 8 bytes at a time and only the set bits are visited.
int32_t compact_row(const uint8_t* row, int64_t step, int64_t n, int32_t* list) {
  int32_t count = 0;
  int64_t j = 0;
  if (step == 1) {
    // 64 columns per bit mask: the loop over set bits mispredicts about once per mask, not per word.
    for (; j + 64 <= n; j += 64) {
      for (uint64_t bits = nonzero_bytes64(row + j); bits != 0; bits &= bits - 1)
        list[count++] = static_cast<int32_t>(j + __builtin_ctzll(bits));
    }
    for (; j + 8 <= n; j += 8) {
      for (uint32_t bits = nonzero_bytes(row + j); bits != 0; bits &= bits - 1)
        list[count++] = static_cast<int32_t>(j + __builtin_ctz(bits));
    }
  }
  for (; j < n; ++j) {
    if (row[j * step] != 0) list[count++] = static_cast<int32_t>(j);
  }
  return count;
}

// kv lists of flat rows [begin, end): kv_index[row] = the selected key blocks, then zeros.
void kv_lists(const View4<uint8_t>& mask, int64_t begin, int64_t end, int32_t* kv_count, int32_t* kv_index) {
  const int64_t mk = mask.size[3];
  for (int64_t r = begin; r < end; ++r) {
    int32_t* list = kv_index + r * mk;
    const int32_t count = compact_row(mask.row(r), mask.stride[3], mk, list);
    std::fill(list + count, list + mk, 0);
    kv_count[r] = count;
  }
}

// q lists of key blocks [j0, j0 + width) of head bh: q_index[bh, j] = query blocks that selected j.
void q_lists(const View4<uint8_t>& mask, int64_t bh, int64_t j0, int64_t width, int32_t* q_count,
             int32_t* q_index) {
  const int64_t mq = mask.size[2], mk = mask.size[3], sq = mask.stride[2], sk = mask.stride[3];
  const uint8_t* head = mask.data + (bh / mask.size[1]) * mask.stride[0] + (bh % mask.size[1]) * mask.stride[1];
  int32_t* lists = q_index + (bh * mk + j0) * mq;  // key block j0 + w has its list at lists + w * mq
  int32_t count[kColumnsPerTask] = {0};
  const bool words = sk == 1 && width == 64;  // the row segment is one 64-byte bit mask
  for (int64_t i = 0; i < mq; ++i) {
    const uint8_t* row = head + i * sq + j0 * sk;
    if (words) {
      for (uint64_t bits = nonzero_bytes64(row); bits != 0; bits &= bits - 1) {
        const int w = __builtin_ctzll(bits);
        lists[w * mq + count[w]++] = static_cast<int32_t>(i);
      }
      continue;
    }
    for (int64_t w = 0; w < width; ++w) {
      if (row[w * sk] != 0) lists[w * mq + count[w]++] = static_cast<int32_t>(i);
    }
  }
  for (int64_t w = 0; w < width; ++w) {
    std::fill(lists + w * mq + count[w], lists + (w + 1) * mq, 0);
    q_count[bh * mk + j0 + w] = count[w];
  }
}

// ---- select_blocks -----------------------------------------------------------------------------

// A unique key that sorts ascending in rank order: higher score first, ties to the lower column,
// -0.0 tying with +0.0 (the score's bits, flipped so that larger floats give smaller keys, above
// the column). The same encoding as rank_key in cuda/block_layout_kernel.cu.
inline uint64_t rank_key(float score, int64_t col) {
  uint32_t u;
  std::memcpy(&u, &score, sizeof(u));
  if ((u & 0x7FFFFFFFu) == 0) u = 0;
  const uint32_t desc = (u & 0x80000000u) ? u : (~u & 0x7FFFFFFFu);
  return (static_cast<uint64_t>(desc) << 32) | static_cast<uint64_t>(col);
}

inline float key_score(uint64_t key) {
  const uint32_t desc = static_cast<uint32_t>(key >> 32);
  const uint32_t u = (desc & 0x80000000u) ? desc : (~desc & 0x7FFFFFFFu);
  float score;
  std::memcpy(&score, &u, sizeof(score));
  return score;
}

inline int64_t key_column(uint64_t key) { return static_cast<int64_t>(key & 0xFFFFFFFFu); }

// Mass mode: the number R of top-ranked blocks kept, i.e. rank 0 and every rank whose e-mass
// before it is < threshold (e: [n] by column, float64). keys[0, R) ends up holding them.
// Sorts a growing prefix only: nth_element brings the next `upto - done` keys forward, then they
// are sorted and walked, until the mass before a rank reaches the threshold.
int64_t mass_keep_count(uint64_t* keys, const double* e, int64_t n, double threshold) {
  double before = 0.0;
  int64_t done = 0, upto = std::min<int64_t>(n, 16);
  while (true) {
    if (upto < n) std::nth_element(keys + done, keys + upto - 1, keys + n);
    std::sort(keys + done, keys + upto);
    for (int64_t r = done; r < upto; ++r) {
      if (r > 0 && !(before < threshold)) return r;
      before += e[key_column(keys[r])];
    }
    if (upto == n) return n;
    done = upto;
    upto = std::min(n, 2 * upto);
  }
}

struct SelectArgs {
  int64_t ratio_keep;
  double keep;
  SelectMode mode;
  bool keep_diagonal;
};

// Selects flat rows [begin, end) into the contiguous bool mask `out`; returns true on a NaN score.
template <typename scalar_t>
bool select_rows(const View4<scalar_t>& scores, const SelectArgs& args, int64_t begin, int64_t end, bool* out) {
  const int64_t mk = scores.size[3], sk = scores.stride[3];
  std::vector<uint64_t> keys(mk);
  std::vector<double> e(args.mode == SelectMode::mass ? mk : 0);
  bool saw_nan = false;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = scores.row(r);
    float rowmax = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t j = 0; j < mk; ++j) {
      const float s = static_cast<float>(row[j * sk]);
      nan |= s != s;
      rowmax = std::max(rowmax, s);
      keys[j] = rank_key(s, j);
    }
    if (nan) {  // the caller reports it; the mask is dropped
      saw_nan = true;
      continue;
    }
    int64_t kept = args.ratio_keep;
    if (args.mode == SelectMode::ratio) {
      std::nth_element(keys.begin(), keys.begin() + (kept - 1), keys.end());
    } else {
      // An all -inf row: subtract the lowest double rather than -inf, so e = 0 and not NaN.
      const double shift = std::max<double>(rowmax, std::numeric_limits<double>::lowest());
      double total = 0.0;
      for (int64_t j = 0; j < mk; ++j) {
        e[j] = std::exp(static_cast<double>(key_score(keys[j])) - shift);
        total += e[j];
      }
      kept = mass_keep_count(keys.data(), e.data(), mk, args.keep * total);
    }
    bool* out_row = out + r * mk;
    std::fill(out_row, out_row + mk, false);
    for (int64_t k = 0; k < kept; ++k) out_row[key_column(keys[k])] = true;
    const int64_t i = r % scores.size[2];
    if (args.keep_diagonal && i < mk) out_row[i] = true;
  }
  return saw_nan;
}

}  // namespace

void block_layout_cpu(const at::Tensor& block_mask, const LayoutTensors& out) {
  const View4<uint8_t> mask(block_mask);  // bool is stored as one byte, 0 or 1
  const int64_t heads = mask.size[0] * mask.size[1], mq = mask.size[2], mk = mask.size[3];
  int32_t* kv_count = std::get<0>(out).data_ptr<int32_t>();
  int32_t* kv_index = std::get<1>(out).data_ptr<int32_t>();
  int32_t* q_count = std::get<2>(out).data_ptr<int32_t>();
  int32_t* q_index = std::get<3>(out).data_ptr<int32_t>();

  at::parallel_for(0, heads * mq, std::max<int64_t>(1, kGrainElems / mk), [&](int64_t begin, int64_t end) {
    kv_lists(mask, begin, end, kv_count, kv_index);
  });
  const int64_t groups = (mk + kColumnsPerTask - 1) / kColumnsPerTask;  // per head
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (kColumnsPerTask * mq));
  at::parallel_for(0, heads * groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = (task % groups) * kColumnsPerTask;
      q_lists(mask, task / groups, j0, std::min(kColumnsPerTask, mk - j0), q_count, q_index);
    }
  });
}

bool select_blocks_cpu(const at::Tensor& scores, int64_t ratio_keep, double keep, SelectMode mode,
                       bool keep_diagonal, const at::Tensor& out) {
  const SelectArgs args{ratio_keep, keep, mode, keep_diagonal};
  const int64_t rows = scores.size(0) * scores.size(1) * scores.size(2), mk = scores.size(3);
  bool* out_data = out.data_ptr<bool>();
  std::atomic<bool> saw_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "select_blocks_cpu", [&] {
    const View4<scalar_t> view(scores);
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / (4 * mk)), [&](int64_t begin, int64_t end) {
      if (select_rows(view, args, begin, end, out_data)) saw_nan = true;
    });
  });
  return saw_nan;
}

}  // namespace kdlib
