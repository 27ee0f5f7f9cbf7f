// Emulator runtime for Metal compute kernels on a CPU (see mint_mlx/kernels/emulate.py).
//
// Execution model: threadgroups run one at a time; the threads of a group are fibers (ucontext)
// scheduled deterministically on the calling OS thread. A fiber runs until it reaches a
// synchronization point (threadgroup_barrier, a simdgroup collective) or returns; when no fiber can
// run, the scheduler completes the collectives whose simdgroup has fully arrived, or the barrier
// once every thread of the group waits at it. Anything else (a barrier some threads skip, lanes of a
// simdgroup waiting at different collectives) is a deadlock or undefined behaviour on a GPU and is
// reported as an error instead of guessed at.
//
// Checking: the kernel translation unit is compiled with -fsanitize=thread, but instead of linking
// ThreadSanitizer's runtime the __tsan_* callbacks below receive every load and store. Device
// buffers live in private mappings with poisoned red zones and guard pages: an access that is not
// entirely inside its buffer is out of bounds. Threadgroup memory lives in an arena with red zones
// between allocations and a shadow record per byte (last writer, last reader, barrier epoch), so a
// read or write that conflicts with another thread's access since the last barrier is a race,
// whatever order the fibers happened to run in. This file is compiled without instrumentation.

#include "mint_runtime.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace mint_rt {
namespace {

constexpr uint32_t kSimdWidth = 32;
constexpr uint32_t kMaxThreads = 1024;
constexpr size_t kStackSize = 512 * 1024;
constexpr size_t kGuard = 64 * 1024;        // PROT_NONE around every mapping
constexpr size_t kRedZone = 64 * 1024;      // poisoned, readable, reported when touched
constexpr size_t kTgArena = 1024 * 1024;    // threadgroup arena (allocations plus red zones)
constexpr size_t kTgGap = 256;              // red zone between threadgroup allocations
constexpr uint16_t kNoThread = 0xFFFF;
constexpr uint16_t kMulti = 0xFFFE;         // several readers
constexpr uint16_t kAtomicWriter = 0xFFFE;
constexpr uint32_t kDevNone = 0, kDevHost = 1, kDevAtomic = 2, kDevThread0 = 3;

enum FiberState { kReady, kWaitBarrier, kWaitCollective, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // usable stack (guard page below)
  FiberState state = kDone;
  ThreadInfo info;
  uint32_t lid = 0;       // thread_index_in_threadgroup
  uint32_t gid = 0;       // linear index in the grid
  uint32_t bflags = 0;
  const char* bfile = nullptr;
  uint32_t bline = 0, bcol = 0;
  Collective* coll = nullptr;
};

struct DevShadow {
  uint32_t writer;  // kDev* or kDevThread0 + global thread index
  uint32_t group;
  uint32_t epoch;
  uint32_t pad;
  uint64_t pc;
};

struct TgShadow {
  uint16_t writer, reader, r_simd, pad;
  uint32_t w_epoch, w_sg, r_epoch, r_sg;
  uint64_t w_pc, r_pc;
};

struct Buf {
  char* map = nullptr;
  size_t map_len = 0;
  char* lo = nullptr;    // start of the leading red zone
  char* data = nullptr;
  char* hi = nullptr;    // end of the trailing red zone
  size_t nbytes = 0;
  const char* name = "";
  int role = kInput;
  int initialized = 0;
  std::vector<DevShadow> shadow;
};

struct TgSlot {
  bool used = false;
  uint64_t off = 0, size = 0;
  const char* name = "";
};

struct State {
  LaunchDesc* d = nullptr;
  EntryFn entry = nullptr;
  std::vector<Buf> bufs;
  std::vector<void*> bufptrs;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  Fiber* cur = nullptr;
  ucontext_t sched;
  uint32_t n = 0;                // threads in the current group
  uint32_t dims[3] = {1, 1, 1};  // dispatch threadgroup size
  uint32_t groups[3] = {1, 1, 1};
  uint32_t group[3] = {0, 0, 0};
  uint32_t group_linear = 0;
  bool checking = false;
  bool abort = false;
  int atomic_depth = 0;
  // threadgroup memory
  char* tg_map = nullptr;
  char* tg_base = nullptr;
  TgShadow* tg_shadow = nullptr;
  std::vector<TgSlot> slots;
  uint64_t tg_end = 0;     // arena bytes in use
  uint64_t tg_logical = 0; // sum of allocation sizes
  uint32_t tg_epoch = 1;
  uint32_t dev_epoch = 1;
  std::vector<uint32_t> sg_epoch;
  // faults
  sigjmp_buf jmp;
  volatile sig_atomic_t in_launch = 0;
  pthread_t launch_thread;
  int fault_sig = 0;
  void* fault_addr = nullptr;
  uint64_t fault_pc = 0;
  Fiber* fault_fiber = nullptr;
  // messages, per error kind
  std::vector<std::string> msgs[8];
  int counts[8] = {0};
  // memory the kernel may touch besides buffers and threadgroup memory: its module's segments
  std::vector<std::pair<uintptr_t, uintptr_t>> segments;
};

State g;
std::mutex g_launch_mutex;
size_t g_page = 4096;

// ---------------------------------------------------------------------------------------------
// Errors

uint64_t code_offset(const void* pc) {
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fbase) {
    return (uint64_t)((const char*)pc - (const char*)info.dli_fbase);
  }
  return 0;
}

std::string pc_token(const void* pc) {
  uint64_t off = code_offset(pc);
  if (!off) return std::string("?");
  char buf[48];
  snprintf(buf, sizeof buf, "@pc:0x%llx", (unsigned long long)(off - 1));
  return std::string(buf);
}

void add_pc(const void* pc) {
  uint64_t off = code_offset(pc);
  if (off && g.d->n_pcs < 8) g.d->pcs[g.d->n_pcs++] = off - 1;
}

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return std::string(buf);
}

std::string describe(const Fiber* f) {
  if (!f) return "the scheduler";
  const ThreadInfo& t = f->info;
  return fmt("thread %u (position (%u,%u,%u) in threadgroup (%u,%u,%u), simdgroup %u lane %u)",
             f->lid, t.thread_position_in_threadgroup[0], t.thread_position_in_threadgroup[1],
             t.thread_position_in_threadgroup[2], t.threadgroup_position_in_grid[0],
             t.threadgroup_position_in_grid[1], t.threadgroup_position_in_grid[2],
             t.simdgroup_index_in_threadgroup, t.thread_index_in_simdgroup);
}

// Records an error; the first few messages of each kind are kept, all are counted. Fatal errors
// stop the launch (the scheduler checks g.abort).
void report(int kind, const std::string& msg, bool fatal) {
  g.d->n_errors++;
  if (kind < 0 || kind > 7) kind = kInvalid;
  if (g.counts[kind]++ < 3) g.msgs[kind].push_back(msg);
  if (fatal) g.abort = true;
}

// Writes the collected messages, most fundamental kind first, and sets error_kind to that kind.
void finish_report() {
  static const int priority[] = {kInvalid, kOutOfBounds, kFault, kDivergence,
                                 kRace, kUninitialized, kUnwritten};
  LaunchDesc* d = g.d;
  std::string all;
  for (int kind : priority) {
    if (!g.counts[kind]) continue;
    if (d->error_kind == kOk) d->error_kind = kind;
    for (const std::string& m : g.msgs[kind]) all += (all.empty() ? "" : "\n") + m;
    if (g.counts[kind] > (int)g.msgs[kind].size()) {
      all += fmt("\n... and %d more like this", g.counts[kind] - (int)g.msgs[kind].size());
    }
  }
  if (d->message && d->message_cap > 0) {
    snprintf(d->message, d->message_cap, "%s", all.c_str());
  }
  for (int k = 0; k < 8; k++) {
    g.msgs[k].clear();
    g.counts[k] = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Memory

char* map_guarded(size_t len, char** usable) {
  size_t total = len + 2 * kGuard;
  char* m = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  mprotect(m, kGuard, PROT_NONE);
  mprotect(m + kGuard + len, kGuard, PROT_NONE);
  *usable = m + kGuard;
  return m;
}

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

bool ensure_stacks(uint32_t n) {
  while (g.stacks.size() < n) {
    char* usable = nullptr;
    char* m = map_guarded(kStackSize, &usable);
    if (!m) return false;
    g.stacks.push_back(usable);
  }
  return true;
}

bool ensure_tg_arena() {
  if (g.tg_map) return true;
  char* usable = nullptr;
  g.tg_map = map_guarded(kTgArena, &usable);
  if (!g.tg_map) return false;
  g.tg_base = usable;
  void* sh = mmap(nullptr, kTgArena * sizeof(TgShadow), PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (sh == MAP_FAILED) return false;
  g.tg_shadow = (TgShadow*)sh;
  return true;
}

void free_buffers() {
  for (Buf& b : g.bufs) {
    if (b.map) munmap(b.map, b.map_len);
  }
  g.bufs.clear();
  g.bufptrs.clear();
}

bool alloc_buffers(LaunchDesc* d) {
  g.bufs.resize(d->nbuffers);
  g.bufptrs.resize(d->nbuffers);
  for (int i = 0; i < d->nbuffers; i++) {
    const BufferDesc& bd = d->buffers[i];
    Buf& b = g.bufs[i];
    b.nbytes = bd.nbytes;
    b.name = bd.name ? bd.name : "?";
    b.role = bd.role;
    b.initialized = bd.initialized;
    size_t data_span = round_up(b.nbytes + kRedZone, g_page);
    b.map_len = kRedZone + data_span;
    char* usable = nullptr;
    b.map = map_guarded(b.map_len, &usable);
    if (!b.map) return false;
    b.map_len += 2 * kGuard;
    b.lo = usable;
    b.data = usable + kRedZone;
    b.hi = usable + kRedZone + data_span;
    memset(b.lo, 0xFF, kRedZone);
    memset(b.data + b.nbytes, 0xFF, data_span - b.nbytes);
    if (b.role == kInput || b.initialized) {
      if (b.nbytes) memcpy(b.data, bd.host, b.nbytes);
    } else {
      memset(b.data, 0xFF, b.nbytes);  // NaN for floats: unwritten outputs stand out
    }
    if (b.role == kOutput && g.checking) {
      DevShadow init{b.initialized ? kDevHost : kDevNone, 0, 0, 0, 0};
      b.shadow.assign(b.nbytes, init);
    }
    g.bufptrs[i] = b.data;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Access checks (called from the __tsan_* callbacks)

inline uint32_t simd_of(uint32_t lid) { return lid / kSimdWidth; }

void tg_race(const char* what, uint64_t off, const TgSlot& s, uint16_t other, uint64_t other_pc,
             const void* pc) {
  add_pc(pc);
  add_pc((const void*)(other_pc));
  report(kRace,
         fmt("threadgroup memory race: %s byte %llu of '%s' (%llu bytes) by %s at %s; thread %u "
             "accessed it at %s with no threadgroup_barrier in between",
             what, (unsigned long long)(off - s.off), s.name, (unsigned long long)s.size,
             describe(g.cur).c_str(), pc_token(pc).c_str(), (unsigned)other,
             pc_token((const void*)other_pc).c_str()),
         false);
}

void tg_access(uintptr_t a, size_t size, bool write, const void* pc) {
  uint64_t off = a - (uintptr_t)g.tg_base;
  const TgSlot* slot = nullptr;
  for (const TgSlot& s : g.slots) {
    if (s.used && off >= s.off && off + size <= s.off + s.size) {
      slot = &s;
      break;
    }
  }
  if (!slot) {
    const TgSlot* near = nullptr;
    uint64_t best = ~0ull;
    for (const TgSlot& s : g.slots) {
      if (!s.used) continue;
      uint64_t dist = off < s.off ? s.off - off : (off >= s.off + s.size ? off - (s.off + s.size) : 0);
      if (dist < best) best = dist, near = &s;
    }
    add_pc(pc);
    if (near) {
      report(kOutOfBounds,
             fmt("threadgroup memory out of bounds: %s of %zu bytes at byte offset %lld of '%s' "
                 "(%llu bytes) by %s at %s",
                 write ? "write" : "read", size, (long long)(off - near->off), near->name,
                 (unsigned long long)near->size, describe(g.cur).c_str(), pc_token(pc).c_str()),
             false);
    } else {
      report(kOutOfBounds,
             fmt("threadgroup memory access outside any threadgroup allocation by %s at %s",
                 describe(g.cur).c_str(), pc_token(pc).c_str()),
             false);
    }
    return;
  }
  const uint16_t t = (uint16_t)g.cur->lid;
  const uint32_t s = simd_of(t);
  const uint32_t sge = g.sg_epoch[s];
  const bool atomic = g.atomic_depth > 0;
  long long uninit_at = -1;
  for (size_t i = 0; i < size; i++) {
    TgShadow& sh = g.tg_shadow[off + i];
    bool w_ordered = sh.w_epoch != g.tg_epoch ||
                     (sh.writer < kAtomicWriter && simd_of(sh.writer) == s && sh.w_sg < sge);
    if (!write || atomic) {
      if (sh.writer == kNoThread) {
        // Reported after the loop; the read is still recorded, so that the write which should
        // have preceded it shows up as a race.
        if (!write && uninit_at < 0) uninit_at = (long long)(off + i - slot->off);
      } else if (sh.writer == kAtomicWriter) {
        if (!atomic && !w_ordered) {
          tg_race("non-atomic read of atomically updated", off, *slot, sh.writer, sh.w_pc, pc);
          return;
        }
      } else if (sh.writer != t && !w_ordered) {
        tg_race(write ? "atomic update of" : "read of", off, *slot, sh.writer, sh.w_pc, pc);
        return;
      }
    }
    if (write) {
      if (!atomic && sh.writer != kNoThread && sh.writer != t && !w_ordered) {
        tg_race("write of", off, *slot, sh.writer, sh.w_pc, pc);
        return;
      }
      if (!atomic && sh.reader != kNoThread && sh.reader != t && sh.r_epoch == g.tg_epoch &&
          !(sh.r_simd == s && sh.r_sg < sge)) {
        tg_race("write (after another thread's read) of", off, *slot,
                sh.reader == kMulti ? kNoThread : sh.reader, sh.r_pc, pc);
        return;
      }
      sh.writer = atomic ? kAtomicWriter : t;
      sh.w_epoch = g.tg_epoch;
      sh.w_sg = sge;
      sh.w_pc = (uint64_t)pc;
    } else {
      if (sh.reader == kNoThread || sh.r_epoch != g.tg_epoch) {
        sh.reader = t;
        sh.r_simd = (uint16_t)s;
        sh.r_epoch = g.tg_epoch;
        sh.r_sg = sge;
        sh.r_pc = (uint64_t)pc;
      } else if (sh.reader != t) {
        sh.reader = kMulti;
        if (sh.r_simd != s) sh.r_simd = kNoThread;
        sh.r_sg = std::max(sh.r_sg, sge);
      }
    }
  }
  if (uninit_at >= 0 && g.d->check_uninitialized) {
    add_pc(pc);
    report(kUninitialized,
           fmt("read of uninitialized threadgroup memory: byte %lld of '%s' by %s at %s (no "
               "thread of this threadgroup wrote it before this read)",
               uninit_at, slot->name, describe(g.cur).c_str(), pc_token(pc).c_str()),
           false);
  }
}

void dev_access(Buf& b, uintptr_t a, size_t size, bool write, const void* pc) {
  uintptr_t lo = (uintptr_t)b.data, hi = lo + b.nbytes;
  if (a < lo || a + size > hi) {
    add_pc(pc);
    long long off = (long long)(a - lo);
    report(kOutOfBounds,
           fmt("out-of-bounds %s of %zu bytes at byte offset %lld of buffer '%s' (%zu bytes) by "
               "%s at %s",
               write ? "write" : "read", size, off, b.name, b.nbytes, describe(g.cur).c_str(),
               pc_token(pc).c_str()),
           false);
    return;
  }
  if (b.role == kInput) {
    if (write) {
      add_pc(pc);
      report(kOutOfBounds,
             fmt("write to input buffer '%s' by %s at %s", b.name, describe(g.cur).c_str(),
                 pc_token(pc).c_str()),
             false);
    }
    return;
  }
  const uint32_t me = kDevThread0 + g.cur->gid;
  const bool atomic = g.atomic_depth > 0;
  for (size_t i = 0; i < size; i++) {
    DevShadow& sh = b.shadow[a - lo + i];
    bool ordered = sh.writer == me ||
                   (sh.writer >= kDevThread0 && sh.group == g.group_linear && sh.epoch < g.dev_epoch);
    const char* problem = nullptr;
    if (sh.writer == kDevNone) {
      if (!write && g.d->check_uninitialized) {
        add_pc(pc);
        report(kUninitialized,
               fmt("read of output '%s' byte %lld before any thread wrote it, by %s at %s",
                   b.name, (long long)(a - lo + i), describe(g.cur).c_str(), pc_token(pc).c_str()),
               false);
        return;
      }
    } else if (sh.writer == kDevHost) {
    } else if (sh.writer == kDevAtomic) {
      if (!atomic) problem = write ? "non-atomic write to" : "non-atomic read of";
    } else if (!ordered) {
      problem = write ? (atomic ? "atomic update of" : "write of") : "read of";
    }
    if (problem) {
      add_pc(pc);
      add_pc((const void*)sh.pc);
      report(kRace,
             fmt("device memory race: %s byte %lld of output '%s' by %s at %s; thread %u of the "
                 "grid (linear) accessed it at %s, unordered (another threadgroup, or no "
                 "threadgroup_barrier(mem_device))",
                 problem, (long long)(a - lo + i), b.name, describe(g.cur).c_str(),
                 pc_token(pc).c_str(), sh.writer >= kDevThread0 ? sh.writer - kDevThread0 : 0u,
                 pc_token((const void*)sh.pc).c_str()),
             false);
      return;
    }
    if (write) {
      sh.writer = atomic ? kDevAtomic : me;
      sh.group = g.group_linear;
      sh.epoch = g.dev_epoch;
      sh.pc = (uint64_t)pc;
    }
  }
}

inline void on_access(const void* p, size_t size, bool write, const void* pc) {
  if (!g.checking || !g.cur || size == 0) return;
  LaunchDesc* d = g.d;
  d->stats[3]++;
  uintptr_t a = (uintptr_t)p;
  if (g.tg_base && a >= (uintptr_t)g.tg_base && a < (uintptr_t)g.tg_base + kTgArena) {
    tg_access(a, size, write, pc);
    return;
  }
  for (Buf& b : g.bufs) {
    if (a >= (uintptr_t)b.lo && a < (uintptr_t)b.hi) {
      dev_access(b, a, size, write, pc);
      return;
    }
  }
  // Not a buffer, not threadgroup memory: it must be this thread's own stack or the kernel's
  // program-scope data. Anything else is a wild pointer; stop before the access happens.
  uintptr_t st = (uintptr_t)g.cur->stack;
  if (a >= st && a + size <= st + kStackSize) return;
  uintptr_t ti = (uintptr_t)&g.cur->info;  // the launcher reads the attribute values
  if (a >= ti && a + size <= ti + sizeof(ThreadInfo)) return;
  for (const auto& seg : g.segments) {
    if (a >= seg.first && a + size <= seg.second) return;
  }
  std::string what = "memory that is no buffer, no threadgroup allocation and not its own stack";
  for (const Fiber& f : g.fibers) {
    uintptr_t fs = (uintptr_t)f.stack;
    if (f.stack && a >= fs && a < fs + kStackSize) {
      what = fmt("the private (thread) memory of thread %u", f.lid);
    }
  }
  add_pc(pc);
  report(kOutOfBounds,
         fmt("wild %s of %zu bytes at address %p by %s at %s: %s (far out of bounds?)",
             write ? "write" : "read", size, p, describe(g.cur).c_str(), pc_token(pc).c_str(),
             what.c_str()),
         true);
  swapcontext(&g.cur->ctx, &g.sched);  // abandon this thread; the launch stops
}

// ---------------------------------------------------------------------------------------------
// Scheduling

void yield_to_scheduler() { swapcontext(&g.cur->ctx, &g.sched); }

void trampoline() {
  g.entry(g.bufptrs.data());
  g.cur->state = kDone;
  swapcontext(&g.cur->ctx, &g.sched);
}

bool same_site(const Collective* a, const Collective* b) {
  return a->op == b->op && a->width == b->width && a->size == b->size &&
         a->combine == b->combine && a->line == b->line && a->column == b->column &&
         strcmp(a->file, b->file) == 0 && strcmp(a->name, b->name) == 0;
}

std::string site(const char* name, const char* file, uint32_t line) {
  return fmt("%s at %s:%u", name, file, line);
}

bool resolve_runtime_collective(Collective* const* lanes, uint32_t nl, std::string* err) {
  // All lanes of one simdgroup (nl <= 32); lanes[i] null when lane i is inactive.
  const Collective* first = nullptr;
  for (uint32_t i = 0; i < nl; i++) {
    if (lanes[i]) {
      first = lanes[i];
      break;
    }
  }
  const uint32_t W = first->width;
  const uint32_t sz = first->size;
  for (uint32_t i = 0; i < nl; i++) {
    Collective* c = lanes[i];
    if (!c) continue;
    const uint32_t base = i - i % W, li = i % W;
    uint32_t src = i;
    const void* from = nullptr;
    switch (c->op) {
      case kShuffle:
      case kBroadcast:
        if (c->arg >= W) {
          *err = fmt("%s: lane index %u out of range for width %u", c->name, c->arg, W);
          return false;
        }
        src = base + c->arg;
        break;
      case kShuffleDown:
        src = li + c->arg < W ? i + c->arg : i;
        break;
      case kShuffleUp:
        src = li >= c->arg ? i - c->arg : i;
        break;
      case kShuffleXor:
        if ((li ^ c->arg) >= W) {
          *err = fmt("%s: mask %u leaves the %u-lane group", c->name, c->arg, W);
          return false;
        }
        src = base + (li ^ c->arg);
        break;
      case kRotateDown:
        src = base + (li + c->arg) % W;
        break;
      case kRotateUp:
        src = base + (li + W - c->arg % W) % W;
        break;
      case kFillDown:
      case kFillUp: {
        uint32_t m = c->arg2 ? c->arg2 : W;
        if (m > W || W % m) {
          *err = fmt("%s: modulo %u does not divide the %u-lane group", c->name, m, W);
          return false;
        }
        uint32_t b2 = base + (li / m) * m, lj = li % m, d = c->arg % m;
        if (c->op == kFillDown) {
          if (lj + d < m) {
            src = b2 + lj + d;
          } else {
            src = b2 + lj + d - m;
            if (!lanes[src]) break;
            from = lanes[src]->fill;
          }
        } else {
          if (lj >= d) {
            src = b2 + lj - d;
          } else {
            src = b2 + lj + m - d;
            if (!lanes[src]) break;
            from = lanes[src]->fill;
          }
        }
        break;
      }
      case kBroadcastFirst: {
        src = base;
        while (src < base + W && (src >= nl || !lanes[src])) src++;
        break;
      }
      default:
        *err = fmt("unknown collective op %u", c->op);
        return false;
    }
    if (src >= nl || !lanes[src]) {
      *err = fmt("%s at %s:%u: lane %u reads lane %u, which is inactive (it returned, or lies "
                 "beyond the threadgroup); the value is undefined on a GPU",
                 c->name, c->file, c->line, i, src);
      return false;
    }
    if (!from) from = lanes[src]->in;
    memcpy(c->out, from, sz);
  }
  return true;
}

// Completes the collectives of simdgroups whose active lanes have all arrived. Returns true when
// something was completed; sets g.abort on divergence.
bool resolve_collectives() {
  bool progressed = false;
  const uint32_t nsimd = (g.n + kSimdWidth - 1) / kSimdWidth;
  for (uint32_t s = 0; s < nsimd && !g.abort; s++) {
    uint32_t lo = s * kSimdWidth, hi = std::min(g.n, lo + kSimdWidth);
    bool any_alive = false, all_coll = true;
    for (uint32_t i = lo; i < hi; i++) {
      FiberState st = g.fibers[i].state;
      if (st == kDone) continue;
      any_alive = true;
      if (st != kWaitCollective) all_coll = false;
    }
    if (!any_alive || !all_coll) continue;
    Collective* lanes[kSimdWidth] = {nullptr};
    const Collective* ref = nullptr;
    uint32_t ref_lane = 0;
    for (uint32_t i = lo; i < hi; i++) {
      Fiber& f = g.fibers[i];
      if (f.state != kWaitCollective) continue;
      lanes[i - lo] = f.coll;
      if (!ref) {
        ref = f.coll;
        ref_lane = i - lo;
      } else if (!same_site(ref, f.coll)) {
        report(kDivergence,
               fmt("divergent simdgroup collectives in threadgroup (%u,%u,%u) simdgroup %u: "
                   "lane %u waits in %s, lane %u in %s; every active lane of a simdgroup must "
                   "reach the same collective",
                   g.group[0], g.group[1], g.group[2], s, ref_lane,
                   site(ref->name, ref->file, ref->line).c_str(), i - lo,
                   site(f.coll->name, f.coll->file, f.coll->line).c_str()),
               true);
        return false;
      }
    }
    g.d->stats[2]++;
    g.cur = nullptr;
    if (ref->op == kSimdBarrier) {
      g.sg_epoch[s]++;
    } else if (ref->op == kReduce) {
      char err[512] = {0};
      if (ref->combine(lanes, hi - lo, err, sizeof err) != 0) {
        report(kDivergence, fmt("%s at %s:%u: %s", ref->name, ref->file, ref->line, err), true);
        return false;
      }
    } else {
      std::string err;
      if (!resolve_runtime_collective(lanes, hi - lo, &err)) {
        report(kDivergence,
               fmt("in threadgroup (%u,%u,%u) simdgroup %u: %s", g.group[0], g.group[1],
                   g.group[2], s, err.c_str()),
               true);
        return false;
      }
    }
    for (uint32_t i = lo; i < hi; i++) {
      if (g.fibers[i].state == kWaitCollective) {
        g.fibers[i].state = kReady;
        g.fibers[i].coll = nullptr;
      }
    }
    progressed = true;
  }
  return progressed;
}

bool resolve_barrier() {
  const Fiber* ref = nullptr;
  uint32_t done = 0, waiting = 0;
  for (uint32_t i = 0; i < g.n; i++) {
    const Fiber& f = g.fibers[i];
    if (f.state == kDone) {
      done++;
    } else if (f.state == kWaitBarrier) {
      waiting++;
      if (!ref) ref = &f;
    }
  }
  if (waiting == 0 || waiting + done != g.n) return false;
  if (done) {
    report(kDivergence,
           fmt("threadgroup_barrier at %s:%u in threadgroup (%u,%u,%u) is reached by %u of %u "
               "threads; the other %u returned before it (undefined behaviour on a GPU: every "
               "thread of the threadgroup must execute each barrier)",
               ref->bfile, ref->bline, g.group[0], g.group[1], g.group[2], waiting, g.n, done),
           true);
    return false;
  }
  for (uint32_t i = 0; i < g.n; i++) {
    const Fiber& f = g.fibers[i];
    if (f.bline != ref->bline || f.bcol != ref->bcol || strcmp(f.bfile, ref->bfile) != 0) {
      report(kDivergence,
             fmt("threads of threadgroup (%u,%u,%u) wait at different barriers: thread %u at "
                 "%s:%u, thread %u at %s:%u",
                 g.group[0], g.group[1], g.group[2], ref->lid, ref->bfile, ref->bline, f.lid,
                 f.bfile, f.bline),
             true);
      return false;
    }
  }
  uint32_t flags = 0;
  for (uint32_t i = 0; i < g.n; i++) flags |= g.fibers[i].bflags;
  if (flags & kMemThreadgroup) g.tg_epoch++;
  if (flags & kMemDevice) g.dev_epoch++;
  g.d->stats[1]++;
  for (uint32_t i = 0; i < g.n; i++) g.fibers[i].state = kReady;
  return true;
}

void report_deadlock() {
  std::string msg = fmt("deadlock in threadgroup (%u,%u,%u):", g.group[0], g.group[1], g.group[2]);
  for (uint32_t i = 0; i < g.n; i++) {
    const Fiber& f = g.fibers[i];
    if (f.state == kWaitBarrier) {
      msg += fmt(" thread %u waits at threadgroup_barrier %s:%u;", f.lid, f.bfile, f.bline);
    } else if (f.state == kWaitCollective) {
      msg += fmt(" thread %u (simdgroup %u) waits in %s;", f.lid, simd_of(f.lid),
                 site(f.coll->name, f.coll->file, f.coll->line).c_str());
    }
    if (msg.size() > 600) {
      msg += " ...";
      break;
    }
  }
  msg += " (a barrier or collective that not every thread reaches)";
  report(kDivergence, msg, true);
}


int segment_cb(struct dl_phdr_info* info, size_t, void* data) {
  auto* want = (std::pair<uintptr_t, bool>*)data;
  if ((uintptr_t)info->dlpi_addr != want->first) return 0;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    g.segments.emplace_back(lo, lo + ph.p_memsz);
  }
  want->second = true;
  return 1;
}

// The loaded segments of the kernel's shared object: program-scope constants and globals.
void collect_segments(const void* code) {
  g.segments.clear();
  Dl_info info;
  if (!dladdr(code, &info) || !info.dli_fbase) return;
  std::pair<uintptr_t, bool> want((uintptr_t)info.dli_fbase, false);
  dl_iterate_phdr(segment_cb, &want);
}

void run_group(const uint32_t gp[3], std::mt19937_64& rng) {
  LaunchDesc* d = g.d;
  uint32_t a[3];
  for (int k = 0; k < 3; k++) a[k] = std::min(g.dims[k], d->grid[k] - gp[k] * g.dims[k]);
  g.n = a[0] * a[1] * a[2];
  for (int k = 0; k < 3; k++) g.group[k] = gp[k];
  g.group_linear = (gp[2] * g.groups[1] + gp[1]) * g.groups[0] + gp[0];
  const uint32_t nsimd = (g.n + kSimdWidth - 1) / kSimdWidth;
  const uint32_t dispatch_n = g.dims[0] * g.dims[1] * g.dims[2];
  g.sg_epoch.assign(nsimd, 1);
  g.tg_epoch = 1;
  for (TgSlot& s : g.slots) s.used = false;
  g.tg_end = 0;
  g.tg_logical = 0;
  d->stats[0]++;

  for (uint32_t lid = 0; lid < g.n; lid++) {
    Fiber& f = g.fibers[lid];
    uint32_t lx = lid % a[0], ly = (lid / a[0]) % a[1], lz = lid / (a[0] * a[1]);
    ThreadInfo& t = f.info;
    uint32_t l3[3] = {lx, ly, lz};
    for (int k = 0; k < 3; k++) {
      t.thread_position_in_threadgroup[k] = l3[k];
      t.threadgroup_position_in_grid[k] = gp[k];
      t.thread_position_in_grid[k] = gp[k] * g.dims[k] + l3[k];
      t.threads_per_threadgroup[k] = a[k];
      t.dispatch_threads_per_threadgroup[k] = g.dims[k];
      t.threadgroups_per_grid[k] = g.groups[k];
      t.threads_per_grid[k] = d->grid[k];
      t.grid_origin[k] = 0;
      t.grid_size[k] = d->grid[k];
    }
    t.thread_index_in_threadgroup = lid;
    t.thread_index_in_simdgroup = lid % kSimdWidth;
    t.simdgroup_index_in_threadgroup = lid / kSimdWidth;
    t.simdgroups_per_threadgroup = nsimd;
    t.dispatch_simdgroups_per_threadgroup = (dispatch_n + kSimdWidth - 1) / kSimdWidth;
    t.thread_index_in_quadgroup = lid % 4;
    t.quadgroup_index_in_threadgroup = lid / 4;
    t.quadgroups_per_threadgroup = (g.n + 3) / 4;
    t.dispatch_quadgroups_per_threadgroup = (dispatch_n + 3) / 4;
    t.threads_per_simdgroup = kSimdWidth;
    t.thread_execution_width = kSimdWidth;
    f.lid = lid;
    f.gid = (t.thread_position_in_grid[2] * d->grid[1] + t.thread_position_in_grid[1]) * d->grid[0] +
            t.thread_position_in_grid[0];
    f.state = kReady;
    f.coll = nullptr;
    f.stack = g.stacks[lid];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackSize;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }

  std::vector<uint32_t> order(g.n);
  for (uint32_t i = 0; i < g.n; i++) order[i] = d->schedule == 1 ? g.n - 1 - i : i;
  for (;;) {
    if (d->schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    for (uint32_t idx : order) {
      Fiber& f = g.fibers[idx];
      if (f.state != kReady) continue;
      g.cur = &f;
      swapcontext(&g.sched, &f.ctx);
      g.cur = nullptr;
      if (g.abort) return;
    }
    bool all_done = true;
    for (uint32_t i = 0; i < g.n; i++) all_done = all_done && g.fibers[i].state == kDone;
    if (all_done) return;
    if (resolve_collectives()) continue;
    if (g.abort) return;
    if (resolve_barrier()) continue;
    if (g.abort) return;
    report_deadlock();
    return;
  }
}

// ---------------------------------------------------------------------------------------------
// Faults

struct sigaction g_old_actions[4];
const int g_signals[4] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
char g_altstack_mem[64 * 1024];

void fault_handler(int sig, siginfo_t* si, void* uc_void) {
  if (!g.in_launch || !pthread_equal(pthread_self(), g.launch_thread)) {
    for (int i = 0; i < 4; i++) {
      if (g_signals[i] == sig) sigaction(sig, &g_old_actions[i], nullptr);
    }
    return;  // re-executes the faulting instruction under the previous handler
  }
  g.fault_sig = sig;
  g.fault_addr = si->si_addr;
#if defined(__x86_64__)
  g.fault_pc = (uint64_t)((ucontext_t*)uc_void)->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
  g.fault_pc = (uint64_t)((ucontext_t*)uc_void)->uc_mcontext.pc;
#else
  (void)uc_void;
#endif
  g.fault_fiber = g.cur;
  siglongjmp(g.jmp, 1);
}

std::string describe_fault() {
  const char* name = g.fault_sig == SIGSEGV  ? "segmentation fault"
                     : g.fault_sig == SIGBUS ? "bus error"
                     : g.fault_sig == SIGFPE ? "arithmetic exception (integer division by zero?)"
                                             : "illegal instruction";
  std::string where = "an address outside every buffer";
  uintptr_t a = (uintptr_t)g.fault_addr;
  for (const Buf& b : g.bufs) {
    if (a >= (uintptr_t)b.map && a < (uintptr_t)b.map + b.map_len) {
      where = fmt("the guard region of buffer '%s' (byte offset %lld): far out of bounds", b.name,
                  (long long)(a - (uintptr_t)b.data));
    }
  }
  for (char* s : g.stacks) {
    if (a >= (uintptr_t)s - kGuard && a < (uintptr_t)s) where = "a stack guard page: stack overflow";
  }
  if (g.tg_map && a >= (uintptr_t)g.tg_map && a < (uintptr_t)g.tg_map + kTgArena + 2 * kGuard) {
    where = "the guard region of threadgroup memory: far out of bounds";
  }
  const void* pc = (const void*)(uintptr_t)g.fault_pc;
  if (code_offset(pc)) g.d->pcs[g.d->n_pcs < 8 ? g.d->n_pcs++ : 7] = code_offset(pc);
  char pcbuf[48];
  snprintf(pcbuf, sizeof pcbuf, "@pc:0x%llx", (unsigned long long)code_offset(pc));
  if (g.fault_sig == SIGFPE || g.fault_sig == SIGILL) {
    return fmt("%s in %s at %s", name, describe(g.fault_fiber).c_str(),
               code_offset(pc) ? pcbuf : "?");
  }
  return fmt("%s accessing address %p (%s) in %s at %s", name, g.fault_addr, where.c_str(),
             describe(g.fault_fiber).c_str(), code_offset(pc) ? pcbuf : "?");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Shim API

const ThreadInfo* thread_info() { return &g.cur->info; }

void barrier(uint32_t flags, const char* file, uint32_t line, uint32_t column) {
  Fiber* f = g.cur;
  f->state = kWaitBarrier;
  f->bflags = flags;
  f->bfile = file;
  f->bline = line;
  f->bcol = column;
  yield_to_scheduler();
}

void collective(Collective* c) {
  Fiber* f = g.cur;
  f->state = kWaitCollective;
  f->coll = c;
  yield_to_scheduler();
}

void* tg_alloc(uint32_t slot, uint64_t size, uint64_t align, const char* name) {
  if (slot >= g.slots.size()) g.slots.resize(slot + 1);
  TgSlot& s = g.slots[slot];
  if (!s.used) {
    align = std::max<uint64_t>(align, 16);
    uint64_t off = round_up(g.tg_end + kTgGap, align);
    g.tg_logical += size;
    if (off + size + kTgGap > kTgArena ||
        g.tg_logical > (uint64_t)std::max(g.d->max_threadgroup_memory, 0)) {
      report(kInvalid,
             fmt("threadgroup memory exhausted: '%s' (%llu bytes) brings the total to %llu bytes; "
                 "the limit is %d bytes",
                 name, (unsigned long long)size, (unsigned long long)g.tg_logical,
                 g.d->max_threadgroup_memory),
             true);
      swapcontext(&g.cur->ctx, &g.sched);  // abandon this thread; the launch stops
    }
    s.used = true;
    s.off = off;
    s.size = size;
    s.name = name;
    g.tg_end = off + size;
    memset(g.tg_base + off, 0xFF, size);  // Metal does not initialize threadgroup memory
    TgShadow blank{kNoThread, kNoThread, kNoThread, 0, 0, 0, 0, 0, 0, 0};
    for (uint64_t i = 0; i < size; i++) g.tg_shadow[off + i] = blank;
  }
  return g.tg_base + s.off;
}

void atomic_enter() { g.atomic_depth++; }
void atomic_exit() { g.atomic_depth--; }

int launch(LaunchDesc* d, EntryFn entry) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_page = (size_t)sysconf(_SC_PAGESIZE);
  g.d = d;
  g.entry = entry;
  g.abort = false;
  g.atomic_depth = 0;
  g.cur = nullptr;
  g.checking = d->check != 0;
  g.fault_sig = 0;
  g.fault_fiber = nullptr;
  g.dev_epoch = 1;
  d->error_kind = kOk;
  d->n_errors = 0;
  for (int k = 0; k < 8; k++) {
    g.msgs[k].clear();
    g.counts[k] = 0;
  }
  d->n_pcs = 0;
  for (int i = 0; i < 4; i++) d->stats[i] = 0;
  if (d->message && d->message_cap) d->message[0] = 0;

  uint64_t total = 1;
  for (int k = 0; k < 3; k++) {
    if (d->threadgroup[k] == 0) {
      report(kInvalid, "threadgroup dimensions must be at least 1", true);
      finish_report();
      return d->error_kind;
    }
    // As MLX does: the threadgroup never exceeds the grid.
    g.dims[k] = std::max<uint32_t>(1, std::min(d->threadgroup[k], d->grid[k]));
    total *= g.dims[k];
  }
  if (total > kMaxThreads) {
    report(kInvalid,
           fmt("threadgroup of %llu threads exceeds the maximum of %u", (unsigned long long)total,
               kMaxThreads),
           true);
    finish_report();
    return d->error_kind;
  }
  if (!ensure_stacks((uint32_t)total) || !ensure_tg_arena() || !alloc_buffers(d)) {
    free_buffers();
    report(kInvalid, "out of memory setting up the emulated launch", true);
    finish_report();
    return d->error_kind;
  }
  g.fibers.resize(total);
  collect_segments((const void*)entry);
  volatile bool empty = false;
  for (int k = 0; k < 3; k++) {
    g.groups[k] = d->grid[k] == 0 ? 0 : (d->grid[k] + g.dims[k] - 1) / g.dims[k];
    empty = empty || d->grid[k] == 0;
  }
  std::mt19937_64 rng(d->seed);

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  stack_t alt, old_alt;
  alt.ss_sp = g_altstack_mem;
  alt.ss_size = sizeof g_altstack_mem;
  alt.ss_flags = 0;
  sigaltstack(&alt, &old_alt);
  for (int i = 0; i < 4; i++) sigaction(g_signals[i], &sa, &g_old_actions[i]);
  g.launch_thread = pthread_self();

  if (sigsetjmp(g.jmp, 1) == 0) {
    g.in_launch = 1;
    if (!empty) {
      uint32_t gp[3];
      for (gp[2] = 0; gp[2] < g.groups[2] && !g.abort; gp[2]++) {
        for (gp[1] = 0; gp[1] < g.groups[1] && !g.abort; gp[1]++) {
          for (gp[0] = 0; gp[0] < g.groups[0] && !g.abort; gp[0]++) run_group(gp, rng);
        }
      }
    }
    g.in_launch = 0;
  } else {
    g.in_launch = 0;
    g.cur = nullptr;
    report(kFault, describe_fault(), true);
  }
  for (int i = 0; i < 4; i++) sigaction(g_signals[i], &g_old_actions[i], nullptr);
  sigaltstack(&old_alt, nullptr);
  g.cur = nullptr;

  if (!g.abort && g.checking && d->require_full_write) {
    for (const Buf& b : g.bufs) {
      if (b.role != kOutput || b.initialized) continue;
      size_t missing = 0, first = 0;
      for (size_t i = 0; i < b.nbytes; i++) {
        if (b.shadow[i].writer == kDevNone) {
          if (!missing) first = i;
          missing++;
        }
      }
      if (missing) {
        report(kUnwritten,
               fmt("output '%s': %zu of %zu bytes were never written (first at byte %zu); MLX "
                   "leaves them uninitialized",
                   b.name, missing, b.nbytes, first),
               false);
      }
    }
  }
  for (int i = 0; i < d->nbuffers; i++) {
    const Buf& b = g.bufs[i];
    if (b.role == kOutput && b.nbytes) memcpy(d->buffers[i].host, b.data, b.nbytes);
  }
  free_buffers();
  finish_report();
  return d->error_kind;
}

}  // namespace mint_rt

// ---------------------------------------------------------------------------------------------
// ThreadSanitizer instrumentation hooks: gcc -fsanitize=thread emits calls to these for every
// memory access of the kernel translation unit. They are defined here instead of in libtsan.

#define MINT_HOOK extern "C" __attribute__((used, noinline))
#define MINT_ACCESS(name, size, write) \
  MINT_HOOK void name(void* p) { mint_rt::on_access(p, size, write, __builtin_return_address(0)); }

MINT_ACCESS(__tsan_read1, 1, false)
MINT_ACCESS(__tsan_read2, 2, false)
MINT_ACCESS(__tsan_read4, 4, false)
MINT_ACCESS(__tsan_read8, 8, false)
MINT_ACCESS(__tsan_read16, 16, false)
MINT_ACCESS(__tsan_write1, 1, true)
MINT_ACCESS(__tsan_write2, 2, true)
MINT_ACCESS(__tsan_write4, 4, true)
MINT_ACCESS(__tsan_write8, 8, true)
MINT_ACCESS(__tsan_write16, 16, true)
MINT_ACCESS(__tsan_unaligned_read2, 2, false)
MINT_ACCESS(__tsan_unaligned_read4, 4, false)
MINT_ACCESS(__tsan_unaligned_read8, 8, false)
MINT_ACCESS(__tsan_unaligned_read16, 16, false)
MINT_ACCESS(__tsan_unaligned_write2, 2, true)
MINT_ACCESS(__tsan_unaligned_write4, 4, true)
MINT_ACCESS(__tsan_unaligned_write8, 8, true)
MINT_ACCESS(__tsan_unaligned_write16, 16, true)
MINT_ACCESS(__tsan_volatile_read1, 1, false)
MINT_ACCESS(__tsan_volatile_read2, 2, false)
MINT_ACCESS(__tsan_volatile_read4, 4, false)
MINT_ACCESS(__tsan_volatile_read8, 8, false)
MINT_ACCESS(__tsan_volatile_read16, 16, false)
MINT_ACCESS(__tsan_volatile_write1, 1, true)
MINT_ACCESS(__tsan_volatile_write2, 2, true)
MINT_ACCESS(__tsan_volatile_write4, 4, true)
MINT_ACCESS(__tsan_volatile_write8, 8, true)
MINT_ACCESS(__tsan_volatile_write16, 16, true)

MINT_HOOK void __tsan_read_range(void* p, unsigned long size) {
  mint_rt::on_access(p, size, false, __builtin_return_address(0));
}
MINT_HOOK void __tsan_write_range(void* p, unsigned long size) {
  mint_rt::on_access(p, size, true, __builtin_return_address(0));
}
MINT_HOOK void __tsan_init() {}
MINT_HOOK void __tsan_func_entry(void*) {}
MINT_HOOK void __tsan_func_exit() {}
MINT_HOOK void __tsan_vptr_update(void**, void*) {}
MINT_HOOK void __tsan_vptr_read(void**) {}
