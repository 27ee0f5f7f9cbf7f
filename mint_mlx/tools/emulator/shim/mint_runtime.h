// Interface between the Metal shim (compiled into every emulated kernel) and the emulator runtime
// (mint_runtime.cpp). Plain C-compatible structs only: Python fills LaunchDesc through ctypes, and
// the struct layouts here must match mint_mlx/kernels/emulate.py.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mint_rt {

// Error kinds reported in LaunchDesc::error_kind (mirrored in emulate.py).
enum ErrorKind : int32_t {
  kOk = 0,
  kRace = 1,           // conflicting accesses not ordered by a barrier
  kOutOfBounds = 2,    // access outside a buffer or threadgroup allocation
  kDivergence = 3,     // barrier/simdgroup collective not reached uniformly, deadlock, misuse
  kFault = 4,          // signal (segfault, bus error, FPE) while running the kernel
  kUninitialized = 5,  // read of memory that nothing wrote in this dispatch/threadgroup
  kUnwritten = 6,      // output bytes the kernel never wrote
  kInvalid = 7,        // invalid launch (threadgroup too large, too much threadgroup memory)
};

// Metal's mem_flags values as used by the shim.
enum MemFlag : uint32_t {
  kMemNone = 0,
  kMemDevice = 1,
  kMemThreadgroup = 2,
  kMemTexture = 4,
};

// Values of every Metal kernel attribute for one thread (see MLX's metal_kernel attribute list).
struct ThreadInfo {
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threads_per_threadgroup[3];
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t grid_origin[3];
  uint32_t grid_size[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
  uint32_t threads_per_simdgroup;
  uint32_t thread_execution_width;
};

enum BufferRole : int32_t { kInput = 0, kOutput = 1 };

struct BufferDesc {
  void* host;          // host memory: copied in before the launch, outputs copied back after
  uint64_t nbytes;
  const char* name;    // parameter name, for messages
  int32_t role;        // BufferRole
  int32_t initialized; // outputs: 1 if host holds initial values (init_value), else poisoned
};

struct LaunchDesc {
  uint32_t grid[3];          // threads, as MTLComputeCommandEncoder::dispatchThreads takes them
  uint32_t threadgroup[3];
  int32_t nbuffers;
  int32_t check;             // 1: bounds, race and initialization checks
  int32_t check_uninitialized;
  int32_t require_full_write;
  int32_t schedule;          // 0 forward, 1 reverse, 2 seeded shuffle
  int32_t max_threadgroup_memory;
  uint64_t seed;
  BufferDesc* buffers;
  // outputs
  char* message;
  uint64_t message_cap;
  int32_t error_kind;
  int32_t n_errors;
  uint64_t pcs[8];           // code offsets (in the kernel's shared object) of reported accesses
  int32_t n_pcs;
  int32_t pad_;
  uint64_t stats[4];         // threadgroups, barriers, collectives, checked accesses
};

typedef void (*EntryFn)(void** buffers);

// One simdgroup (or quadgroup) collective call by one lane.
struct Collective;
typedef int (*CombineFn)(Collective* const* lanes, uint32_t nlanes, char* err, size_t cap);

enum CollectiveOp : uint32_t {
  // handled by the runtime (type-agnostic byte moves)
  kShuffle = 1,
  kShuffleDown,
  kShuffleUp,
  kShuffleXor,
  kRotateDown,
  kRotateUp,
  kFillDown,
  kFillUp,
  kBroadcast,
  kBroadcastFirst,
  kSimdBarrier,
  // handled by a typed CombineFn instantiated in the shim
  kReduce = 100,
};

struct Collective {
  uint32_t op;       // CollectiveOp; for kReduce, `combine` does the work
  uint32_t width;    // 32 for simd_*, 4 for quad_*
  uint32_t size;     // sizeof(value)
  uint32_t arg;      // lane / delta / mask / flags
  uint32_t arg2;     // modulo for the fill shuffles
  const char* name;  // Metal function name, for messages
  const char* file;  // call site
  uint32_t line;
  uint32_t column;
  const void* in;
  const void* fill;
  void* out;
  CombineFn combine;
};

// Called from kernel code (the shim).
const ThreadInfo* thread_info();
void barrier(uint32_t flags, const char* file, uint32_t line, uint32_t column);
void collective(Collective* c);
void* tg_alloc(uint32_t slot, uint64_t size, uint64_t align, const char* name);
void atomic_enter();
void atomic_exit();

// Called from the generated launcher.
int launch(LaunchDesc* d, EntryFn entry);

}  // namespace mint_rt
