// Quantized matrix-vector product for affine and compact-scale formats, plain or gathered over
// experts, in the form mx.fast.metal_kernel takes: everything above the body marker is the
// header, everything below it the body. mint_mlx/kernels/quantized.py declares four kernels from
// this file by defining MINT_COMPACT (0: affine scales, 1: compact scales) and MINT_GATHER (0: one
// matrix, 1: a stack of experts and one expert index per row of x) before this header, and
// prepends quant_utils.metal. Tested on Linux through mint_mlx/kernels/emulate.py.
//
//   y[b, o] = sum_i x[b, i] * (scale(e, o, i / G) * q[e, o, i] + bias(e, o, i / G)),
//   e = indices[b] when gathered (clamped to the stack), else the single matrix.
//
// Work layout (after MLX's qmv): a threadgroup is QMV_SIMDGROUPS simdgroups, and each simdgroup
// owns QMV_ROWS consecutive output rows of one row of x. A lane takes one pack (32 inputs) at a
// time and the simdgroup strides over the row 32 packs at a time; the inputs a lane loads are
// reused for all of its rows, and simd_sum adds up the lanes' partial dot products. Per group the
// dot product needs one multiply by the scale and one by the bias times the sum of the inputs.
//
// Inputs: x (batch, in) of type T; w (out, in * bits / 32) uint32 (with a leading expert axis
// when gathered); scales and biases (out, in / G) in a float type, or uint8 and int8 codes plus
// super_scales (out, blocks, 2) when compact; indices (batch,) uint32 when gathered.
// Output: y (batch, out) of type T. Template: T, bits in {2, 3, 4, 5, 6, 8}, group_size G in
// {16, 32, 64, 128, 256}. Needs in % G == 0 and in * bits % 32 == 0; a row may end in half a
// pack (16 inputs) when G is 16.
// Launch: threadgroup (32, QMV_SIMDGROUPS, 1), grid (32, QMV_SIMDGROUPS * ceil(out / tile), batch)
// with tile = QMV_SIMDGROUPS * QMV_ROWS output rows per threadgroup.

constant constexpr int QMV_SIMDGROUPS = 2;
constant constexpr int QMV_ROWS = 4;
constant constexpr int QMV_PACK = 32;  // inputs per lane per step

// @mint:body
  const int in_size = x_shape[1];
#if MINT_GATHER
  const int n_experts = w_shape[0];
  const int out_size = w_shape[1];
  const int w_stride = w_shape[2];       // uint32 words per row of w
  const int g_stride = scales_shape[2];  // groups per row
#else
  const int out_size = w_shape[0];
  const int w_stride = w_shape[1];
  const int g_stride = scales_shape[1];
#endif
  const uint lane = thread_index_in_simdgroup;
  const int b = threadgroup_position_in_grid.z;
  const int row0 =
      (threadgroup_position_in_grid.y * QMV_SIMDGROUPS + simdgroup_index_in_threadgroup) *
      QMV_ROWS;

  // Rows of the selected matrix start at `base` (in rows of the stack).
#if MINT_GATHER
  const int base = min(int(indices[b]), n_experts - 1) * out_size;
#else
  const int base = 0;
#endif
#if MINT_COMPACT
#if MINT_GATHER
  const int blocks = super_scales_shape[2];
#else
  const int blocks = super_scales_shape[1];
#endif
  const auto sc = compact_scales(scales, biases, super_scales, g_stride, blocks);
#else
  const auto sc = affine_scales(scales, biases, g_stride);
#endif

  // A pack spans two groups when G is 16, else it lies inside one group.
  constexpr int parts = group_size < QMV_PACK ? QMV_PACK / group_size : 1;
  constexpr int part_len = QMV_PACK / parts;

  const auto xb = x + b * in_size;
  float acc[QMV_ROWS] = {0};

  for (int k = lane * QMV_PACK; k < in_size; k += 32 * QMV_PACK) {
    // Inputs in this pack: 32, or 16 at the end of a row when G is 16.
    const int n = min(QMV_PACK, in_size - k);
    float xv[QMV_PACK];
    float xsum[parts];
    for (int p = 0; p < parts; p++) {
      xsum[p] = 0.0f;
    }
    for (int i = 0; i < QMV_PACK; i += 4) {
      // k and in_size are multiples of 16: these 4-element loads are aligned.
      const float4 v = i < n ? float4(*(const device vec<T, 4>*)(xb + k + i)) : float4(0.0f);
      xv[i] = v.x;
      xv[i + 1] = v.y;
      xv[i + 2] = v.z;
      xv[i + 3] = v.w;
      xsum[i / part_len] += (v.x + v.y) + (v.z + v.w);
    }
    const int n_words = n * bits / 32;
    for (int r = 0; r < QMV_ROWS; r++) {
      const int row = row0 + r;
      if (row >= out_size) {
        break;  // the same for every lane of the simdgroup
      }
      const auto wr = w + int64_t(base + row) * w_stride + (k / QMV_PACK) * bits;
      uint words[bits];
      for (int i = 0; i < bits; i++) {
        words[i] = i < n_words ? wr[i] : 0u;
      }
      for (int p = 0; p < parts && p * part_len < n; p++) {
        float dot = 0.0f;
        for (int j = p * part_len; j < (p + 1) * part_len; j++) {
          dot += xv[j] * float(qmv_value<bits>(words, j));
        }
        const int g = (k + p * part_len) / group_size;
        acc[r] += sc.scale(base + row, g) * dot + sc.bias(base + row, g) * xsum[p];
      }
    }
  }

  for (int r = 0; r < QMV_ROWS; r++) {
    const float total = simd_sum(acc[r]);
    const int row = row0 + r;
    if (lane == 0 && row < out_size) {
      y[b * out_size + row] = static_cast<T>(total);
    }
  }
