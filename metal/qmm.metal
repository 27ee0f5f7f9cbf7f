// Quantized matrix-matrix product y = x @ W.T for affine and compact-scale formats, plain or
// gathered over experts (prefill: many rows of x). Declared four times by
// mint_mlx/kernels/quantized.py through MINT_COMPACT and MINT_GATHER, as qmv.metal is, with
// quant_utils.metal prepended. Tested on Linux through mint_mlx/kernels/emulate.py.
//
// Work layout: a threadgroup of QMM_THREADS threads computes a QMM_BM x QMM_BN tile of y (rows
// of x by output features), walking the inputs QMM_BK at a time. Per step every thread loads 8
// consecutive inputs of one row of x and dequantizes 8 consecutive weights of one row of W into
// threadgroup memory (float, so the dequantized weight is exactly the reference's), then, after a
// barrier, accumulates its QMM_TM x QMM_TN block of the tile from the two shared tiles. Each
// weight is thus dequantized once per tile instead of once per row of x, which is what makes
// this faster than the qmv kernel once x has more than a few rows. (MLX's qmm uses simdgroup
// matrices on top of this; the CPU emulator has none, so they are left for later.)
//
// Gathered: each row of x has its own expert (indices). A tile is processed in segments of
// consecutive rows with the same expert: for every segment the K loop runs once with the rows
// outside it zeroed. With sorted indices (mlx-lm sorts them for many tokens) a tile has one or
// two segments; unsorted indices stay correct, only slower.
//
// Inputs: x (m, in) of type T; w (out, in * bits / 32) uint32 (with a leading expert axis when
// gathered); scales and biases (out, in / G) in a float type, or uint8 and int8 codes plus
// super_scales (out, blocks, 2) when compact; indices (m,) uint32 when gathered.
// Output: y (m, out) of type T. Template: T, bits in {2, 3, 4, 5, 6, 8}, group_size G in
// {16, 32, 64, 128, 256}. Needs in % G == 0 and in * bits % 32 == 0 (so in % 16 == 0).
// Launch: threadgroup (QMM_THREADS, 1, 1), grid (QMM_THREADS * ceil(out / QMM_BN),
// ceil(m / QMM_BM), 1).

constant constexpr int QMM_BM = 32;
constant constexpr int QMM_BN = 32;
constant constexpr int QMM_BK = 32;
constant constexpr int QMM_TM = 4;
constant constexpr int QMM_TN = 2;
constant constexpr int QMM_THREADS = (QMM_BM / QMM_TM) * (QMM_BN / QMM_TN);  // 128
constant constexpr int QMM_LOAD = 8;  // inputs (and weights) each thread loads per step
constant constexpr int QMM_WS_STRIDE = QMM_BK + 1;  // padded: column reads hit distinct banks

// @mint:body
  const int m_size = x_shape[0];
  const int in_size = x_shape[1];
#if MINT_GATHER
  const int n_experts = w_shape[0];
  const int out_size = w_shape[1];
  const int w_stride = w_shape[2];
  const int g_stride = scales_shape[2];
#else
  const int out_size = w_shape[0];
  const int w_stride = w_shape[1];
  const int g_stride = scales_shape[1];
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

  threadgroup float xs[QMM_BM * QMM_BK];
  threadgroup float ws[QMM_BN * QMM_WS_STRIDE];

  const int tid = thread_index_in_threadgroup;
  const int n0 = threadgroup_position_in_grid.x * QMM_BN;
  const int m0 = threadgroup_position_in_grid.y * QMM_BM;
  const int m_end = min(m0 + QMM_BM, m_size);

  // What this thread loads: 8 inputs of one row of the x tile and 8 weights of one row of W.
  const int ld_row = tid / (QMM_BK / QMM_LOAD);
  const int ld_col = (tid % (QMM_BK / QMM_LOAD)) * QMM_LOAD;
  // What it computes: rows tm.. of the tile, columns tn.. of the tile.
  const int tm = (tid / (QMM_BN / QMM_TN)) * QMM_TM;
  const int tn = (tid % (QMM_BN / QMM_TN)) * QMM_TN;

  float acc[QMM_TM][QMM_TN];
  for (int i = 0; i < QMM_TM; i++) {
    for (int j = 0; j < QMM_TN; j++) {
      acc[i][j] = 0.0f;
    }
  }

  // Segments of rows sharing one matrix (the whole tile when not gathered). Every thread walks
  // the same segments, so the barriers below are reached uniformly.
  for (int seg = m0; seg < m_end;) {
#if MINT_GATHER
    const uint expert = indices[seg];
    int seg_end = seg + 1;
    while (seg_end < m_end && indices[seg_end] == expert) {
      seg_end++;
    }
    const int base = min(int(expert), n_experts - 1) * out_size;
#else
    const int seg_end = m_end;
    const int base = 0;
#endif
    const int x_row = m0 + ld_row;
    const bool x_live = x_row >= seg && x_row < seg_end;
    const int w_row = n0 + ld_row;
    const bool w_live = w_row < out_size;

    for (int k0 = 0; k0 < in_size; k0 += QMM_BK) {
      // k and in_size are multiples of 8 and 16: a load is all in the row or all past its end.
      const int k = k0 + ld_col;
      float xv[QMM_LOAD];
      if (x_live && k < in_size) {
        const auto xp = x + int64_t(x_row) * in_size + k;
        const float4 a = float4(*(const device vec<T, 4>*)(xp));
        const float4 c = float4(*(const device vec<T, 4>*)(xp + 4));
        xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
        xv[4] = c.x; xv[5] = c.y; xv[6] = c.z; xv[7] = c.w;
      } else {
        for (int i = 0; i < QMM_LOAD; i++) {
          xv[i] = 0.0f;
        }
      }
      float wv[QMM_LOAD];
      if (w_live && k < in_size) {
        // The 8 values start at bit k * bits of the row and span at most 3 words.
        const int bit0 = k * bits;
        const int shift0 = bit0 & 31;
        const int n_words = (shift0 + QMM_LOAD * bits + 31) / 32;
        const auto wp = w + int64_t(base + w_row) * w_stride + (bit0 >> 5);
        uint words[3];
        for (int i = 0; i < 3; i++) {
          words[i] = i < n_words ? wp[i] : 0u;
        }
        const int g = k / group_size;  // 8 | 16 | G: the 8 weights share one group
        const float s = sc.scale(base + w_row, g);
        const float b = sc.bias(base + w_row, g);
        for (int i = 0; i < QMM_LOAD; i++) {
          wv[i] = s * float(q_value_at<bits>(words, shift0 + i * bits)) + b;
        }
      } else {
        for (int i = 0; i < QMM_LOAD; i++) {
          wv[i] = 0.0f;
        }
      }
      for (int i = 0; i < QMM_LOAD; i++) {
        xs[ld_row * QMM_BK + ld_col + i] = xv[i];
        ws[ld_row * QMM_WS_STRIDE + ld_col + i] = wv[i];
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      for (int kk = 0; kk < QMM_BK; kk++) {
        float a[QMM_TM];
        float c[QMM_TN];
        for (int i = 0; i < QMM_TM; i++) {
          a[i] = xs[(tm + i) * QMM_BK + kk];
        }
        for (int j = 0; j < QMM_TN; j++) {
          c[j] = ws[(tn + j) * QMM_WS_STRIDE + kk];
        }
        for (int i = 0; i < QMM_TM; i++) {
          for (int j = 0; j < QMM_TN; j++) {
            acc[i][j] += a[i] * c[j];
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    seg = seg_end;
  }

  for (int i = 0; i < QMM_TM; i++) {
    const int row = m0 + tm + i;
    if (row >= m_size) {
      break;
    }
    for (int j = 0; j < QMM_TN; j++) {
      const int col = n0 + tn + j;
      if (col < out_size) {
        y[int64_t(row) * out_size + col] = static_cast<T>(acc[i][j]);
      }
    }
  }
