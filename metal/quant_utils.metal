// Helpers shared by our quantized kernels (qmv.metal, qmm.metal). Not a kernel by itself:
// mint_mlx/kernels/spec.py prepends it to a kernel's header, so every kernel reads the packed
// values and the scales through the same code (and a test of one kernel covers that code for
// all). Written for Metal's C++14 dialect: no `if constexpr`, no class template deduction.
//
// Packing (mx.quantize's): row o of w is a little-endian, LSB-first bit stream of `bits`-bit
// values; value i occupies bits [i * bits, (i + 1) * bits) of the row. For bits 3, 5 and 6 values
// straddle uint32 boundaries; every 32 consecutive values fill exactly `bits` words ("a pack").
//
// Scales: affine formats store one scale and one bias per group in a float type; compact-scale
// formats (affine_cs) store a uint8 scale code and an int8 bias code per group and, per
// super-block of `per_block` consecutive groups of a row, one (scale step, bias step) pair, so
// that scale = code * step. Pointers are template parameters because MLX passes inputs with
// fewer than 8 elements in the `constant` address space, others in `device`.

#include <metal_stdlib>
using namespace metal;

// The value whose first bit is `bit` (0 <= bit, bit + bits <= 32 * number of words held).
template <int bits>
inline uint q_value_at(thread const uint* words, int bit) {
  const int word = bit >> 5;
  const int shift = bit & 31;
  uint v = words[word] >> shift;
  if (shift + bits > 32) {
    v |= words[word + 1] << (32 - shift);
  }
  return v & ((1u << bits) - 1u);
}

// Value j (0 <= j < 32) of a pack held in `bits` consecutive words.
template <int bits>
inline uint qmv_value(thread const uint* words, int j) {
  return q_value_at<bits>(words, j * bits);
}

// Per-group scale and bias of an affine matrix: `groups` per row, rows consecutive.
template <typename PS, typename PB>
struct AffineScales {
  PS scales;
  PB biases;
  int groups;

  float scale(int row, int g) const { return float(scales[row * groups + g]); }
  float bias(int row, int g) const { return float(biases[row * groups + g]); }
};

template <typename PS, typename PB>
inline AffineScales<PS, PB> affine_scales(PS scales, PB biases, int groups) {
  AffineScales<PS, PB> s = {scales, biases, groups};
  return s;
}

// Per-group scale and bias of a compact-scale matrix: codes (`groups` per row) times the steps
// of the group's super-block (`blocks` per row, `per_block` = groups / blocks groups each).
template <typename PS, typename PB, typename PSS>
struct CompactScales {
  PS scales;         // uint8 codes
  PB biases;         // int8 codes
  PSS super_scales;  // (rows, blocks, 2): scale step, bias step
  int groups;
  int blocks;
  int per_block;

  float scale(int row, int g) const {
    return float(scales[row * groups + g]) *
           float(super_scales[(row * blocks + g / per_block) * 2]);
  }
  float bias(int row, int g) const {
    return float(biases[row * groups + g]) *
           float(super_scales[(row * blocks + g / per_block) * 2 + 1]);
  }
};

template <typename PS, typename PB, typename PSS>
inline CompactScales<PS, PB, PSS> compact_scales(
    PS scales, PB biases, PSS super_scales, int groups, int blocks) {
  CompactScales<PS, PB, PSS> s = {scales, biases, super_scales, groups, blocks, groups / blocks};
  return s;
}
