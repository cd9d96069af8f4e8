// The CPU allocator of graph mode's compiled steps: each TrainGraph's step keeps the buffers it freed for its
// next call (step_buffers.py says why). Built by step_buffers.py, loaded with ctypes: no Python API here.
//
// Once installed it is torch's CPU allocator for the process, and hands every request to the allocator it
// replaced except on a thread inside a pool's call (pool_enter .. pool_exit), for requests of kMinBytes or more.
// Those come from the pool's freed blocks (the smallest that fits, up to twice the request), or new ones; a
// block goes back to its pool when its tensor is freed, whenever that is. At the end of a call, the blocks the
// call found free and did not take go back to malloc: a pool holds what its last call used (a new batch size
// does not keep the old one's).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <cstdint>
#include <cstring>
#include <iterator>
#include <mutex>
#include <map>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kMinBytes = 128 * 1024;  // glibc's first mmap threshold: below it, its heap reuses memory well

struct Pool;

struct Block {
  void* data;
  size_t bytes;
  Pool* pool;
  uint64_t freed_in_call;  // the pool's call count when it was freed
};

struct Pool {
  std::map<size_t, std::vector<Block*>> free;  // by size in bytes
  uint64_t calls = 0;
  size_t held = 0;  // bytes in `free`
  bool released = false;
};

std::mutex mutex;  // guards every Pool; blocks can be freed on any thread
thread_local Pool* current = nullptr;
size_t in_use = 0;  // pool bytes in tensors, for torch.profiler's memory view

void discard(Block* block) {
  c10::free_cpu(block->data);
  delete block;
}

void report(Block* block, bool taken) {
  if (c10::memoryProfilingEnabled()) {
    auto bytes = static_cast<int64_t>(block->bytes);
    c10::reportMemoryUsageToProfiler(block->data, taken ? bytes : -bytes, in_use, 0,
                                     c10::Device(c10::DeviceType::CPU));
  }
}

// Blocks are found by their address: ideep's convolutions allocate through raw_allocate, which needs a DataPtr
// whose context is its data, and free through raw_deleter() with the address alone.
std::unordered_map<void*, Block*> live;  // blocks in tensors, by address

void put_back(Block* block) {  // the mutex held
  in_use -= block->bytes;
  report(block, false);
  Pool* pool = block->pool;
  if (pool->released) {
    discard(block);
    return;
  }
  block->freed_in_call = pool->calls;
  pool->free[block->bytes].push_back(block);
  pool->held += block->bytes;
}

c10::DeleterFnPtr base_raw_deleter = nullptr;

// The deleter of every pointer this allocator handed out, raw or not.
void give_back(void* data) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = live.find(data);
    if (found != live.end()) {
      Block* block = found->second;
      live.erase(found);
      put_back(block);
      return;
    }
  }
  base_raw_deleter(data);  // the replaced allocator's (its own DataPtrs keep their own deleter)
}

// The smallest free block of the pool that fits, at most twice the size, or null; the mutex held. With exact
// sizes only, the blocks kept for sizes used at different times of a step added up (MobileNetV2 b64: peak RSS
// growth 1151 MiB, against 737 with this and 605 to 797 from malloc; docs/bench.md, round 12). No size in
// `free` has an empty list (take and dm_pool_exit erase them), so the first size at or above `bytes` decides.
Block* take(Pool* pool, size_t bytes) {
  auto found = pool->free.lower_bound(bytes);
  if (found == pool->free.end() || found->first > 2 * bytes) {
    return nullptr;
  }
  Block* block = found->second.back();
  found->second.pop_back();
  if (found->second.empty()) {
    pool->free.erase(found);
  }
  pool->held -= block->bytes;
  return block;
}

c10::DataPtr hand_out(Block* block) {  // the mutex held
  live.emplace(block->data, block);
  in_use += block->bytes;
  report(block, true);
  return {block->data, block->data, &give_back, c10::Device(c10::DeviceType::CPU)};
}

class StepAllocator final : public c10::Allocator {
 public:
  c10::Allocator* base = nullptr;  // the allocator this one replaced

  c10::DataPtr allocate(size_t bytes) override {
    Pool* pool = current;
    if (pool == nullptr || bytes < kMinBytes) {
      return base->allocate(bytes);
    }
    {
      std::lock_guard<std::mutex> lock(mutex);  // one lock for a block found free: the common case
      if (Block* block = take(pool, bytes)) {
        return hand_out(block);
      }
    }
    auto* block = new Block{c10::alloc_cpu(bytes), bytes, pool, 0};  // outside the lock; throws when out of memory
    std::lock_guard<std::mutex> lock(mutex);
    return hand_out(block);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

StepAllocator* the_allocator() {
  static auto* allocator = new StepAllocator();  // never destroyed: tensors may be freed at exit
  return allocator;
}

}  // namespace

extern "C" {

// 1 once this is torch's CPU allocator; 0 where another one holds it (set with a higher priority), or where
// the one in place has no raw deleter.
int dm_install() {
  StepAllocator* allocator = the_allocator();
  c10::Allocator* now = c10::GetCPUAllocator();
  if (now == allocator) {
    return 1;
  }
  if (now->raw_deleter() == nullptr) {
    return 0;  // its raw allocations could not be freed through this one
  }
  allocator->base = now;
  base_raw_deleter = now->raw_deleter();
  c10::SetCPUAllocator(allocator, 0);
  if (c10::GetCPUAllocator() != allocator) {
    return 0;
  }
  static bool fork_handlers = false;
  if (!fork_handlers) {  // a fork while another thread holds the mutex must not leave it locked in the child
    pthread_atfork([] { mutex.lock(); }, [] { mutex.unlock(); }, [] { mutex.unlock(); });
    fork_handlers = true;
  }
  return 1;
}

// 1 while this is still torch's CPU allocator (something may have replaced it since dm_install).
int dm_installed() { return c10::GetCPUAllocator() == the_allocator() ? 1 : 0; }

void* dm_pool_new() { return new Pool(); }

// 1, and the pool serves this thread's requests until dm_pool_exit; 0 (and nothing done) where another
// allocator replaced this one since dm_install: its requests would never reach the pool.
int dm_pool_enter(void* handle) {
  if (c10::GetCPUAllocator() != the_allocator()) {
    return 0;
  }
  auto* pool = static_cast<Pool*>(handle);
  std::lock_guard<std::mutex> lock(mutex);
  pool->calls += 1;
  current = pool;
  return 1;
}

void dm_pool_exit(void* handle) {
  auto* pool = static_cast<Pool*>(handle);
  current = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto sized = pool->free.begin(); sized != pool->free.end();) {
    auto& blocks = sized->second;
    size_t kept = 0;
    for (Block* block : blocks) {
      if (block->freed_in_call < pool->calls) {  // free when this call began, and not taken
        pool->held -= block->bytes;
        discard(block);
      } else {
        blocks[kept++] = block;
      }
    }
    blocks.resize(kept);
    sized = kept == 0 ? pool->free.erase(sized) : std::next(sized);  // no empty size left for take() to skip
  }
}

size_t dm_pool_held(void* handle) {
  std::lock_guard<std::mutex> lock(mutex);
  return static_cast<Pool*>(handle)->held;
}

// The pool's free blocks go back to malloc, and its blocks still in tensors when those are freed. The Pool
// itself stays (a few bytes): those blocks point to it.
void dm_pool_release(void* handle) {
  auto* pool = static_cast<Pool*>(handle);
  std::lock_guard<std::mutex> lock(mutex);
  for (auto& [bytes, blocks] : pool->free) {
    for (Block* block : blocks) {
      discard(block);
    }
  }
  pool->free.clear();
  pool->held = 0;
  pool->released = true;
}

}  // extern "C"
