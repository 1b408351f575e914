#include "worker/engine/block_manager.h"

#include <algorithm>
#include <stdexcept>

namespace shardserve {

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching), blocks_(static_cast<size_t>(num_blocks)) {
  if (num_blocks <= 0 || block_size <= 0) throw std::invalid_argument("BlockManager: num_blocks and block_size must be positive");
  for (int32_t i = 0; i < num_blocks; ++i) list_back(i);
}

uint64_t BlockManager::chain_hash(uint64_t parent, const int32_t* tokens, int64_t n) {
  // FNV-1a over the parent hash and the token ids, then a splitmix64 finaliser.
  uint64_t h = 1469598103934665603ull ^ parent;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xFF;
      h *= 1099511628211ull;
    }
  };
  mix(parent);
  for (int64_t i = 0; i < n; ++i) mix(static_cast<uint32_t>(tokens[i]));
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

void BlockManager::unlist(int32_t id) {
  Block& b = blocks_[id];
  if (!b.listed) return;
  (b.prev >= 0 ? blocks_[b.prev].next : head_) = b.next;
  (b.next >= 0 ? blocks_[b.next].prev : tail_) = b.prev;
  b.prev = b.next = -1;
  b.listed = false;
  --num_free_;
}

void BlockManager::list_back(int32_t id) {
  Block& b = blocks_[id];
  b.prev = tail_;
  b.next = -1;
  (tail_ >= 0 ? blocks_[tail_].next : head_) = id;
  tail_ = id;
  b.listed = true;
  ++num_free_;
}

void BlockManager::uncache(int32_t id) {
  Block& b = blocks_[id];
  if (!b.hashed) return;
  const auto it = by_hash_.find(b.hash);
  if (it != by_hash_.end() && it->second == id) by_hash_.erase(it);
  b.hashed = false;
  b.token_ids.clear();
}

int32_t BlockManager::take_block() {
  if (head_ < 0) throw std::logic_error("BlockManager: no free block (callers must check first)");
  const int32_t id = head_;
  unlist(id);
  uncache(id);  // cached -> evicted
  blocks_[id].ref_count = 1;
  return id;
}

bool BlockManager::can_allocate(const Sequence& seq) const { return blocks_for(seq.size()) <= num_free_; }

void BlockManager::allocate(Sequence& seq) {
  if (!seq.block_table.empty()) throw std::logic_error("BlockManager::allocate: sequence already has blocks");
  const int64_t needed = blocks_for(seq.size());
  int64_t cached_blocks = 0;
  uint64_t parent = 0;
  seq.num_hashed_blocks = 0;
  if (prefix_caching_) {
    // Leading full blocks found in the cache are shared. When every token is cached, the last
    // one is still recomputed for its logits, rewriting the same K/V into a shared block.
    const int64_t full = seq.size() / block_size_;
    for (int64_t i = 0; i < full; ++i) {
      const int32_t* toks = seq.tokens.data() + i * block_size_;
      const uint64_t h = chain_hash(parent, toks, block_size_);
      ++queries_;
      const auto it = by_hash_.find(h);
      if (it == by_hash_.end()) break;
      Block& b = blocks_[it->second];
      if (b.parent_hash != parent || !std::equal(toks, toks + block_size_, b.token_ids.begin())) break;
      // cached -> active, or active -> shared
      if (b.ref_count == 0) unlist(it->second);
      ++b.ref_count;
      seq.block_table.push_back(it->second);
      parent = h;
      ++cached_blocks;
      ++hits_;
    }
  }
  seq.num_hashed_blocks = cached_blocks;
  seq.last_block_hash = parent;
  for (int64_t i = cached_blocks; i < needed; ++i) seq.block_table.push_back(take_block());
  seq.num_computed_tokens = std::min(cached_blocks * block_size_, seq.size() - 1);
  seq.num_cached_prompt_tokens = seq.num_computed_tokens;
}

void BlockManager::free(Sequence& seq) {
  for (auto it = seq.block_table.rbegin(); it != seq.block_table.rend(); ++it) {
    Block& b = blocks_[*it];
    if (--b.ref_count == 0) {
      // active -> cached (hashed) or free
      list_back(*it);
    }
  }
  seq.block_table.clear();
  seq.num_computed_tokens = 0;
  seq.num_hashed_blocks = 0;
  seq.last_block_hash = 0;
}

bool BlockManager::can_grow(const Sequence& seq, int64_t num_tokens) const {
  return blocks_for(num_tokens) - static_cast<int64_t>(seq.block_table.size()) <= num_free_;
}

void BlockManager::grow(Sequence& seq, int64_t num_tokens) {
  while (static_cast<int64_t>(seq.block_table.size()) < blocks_for(num_tokens)) {
    seq.block_table.push_back(take_block());
  }
}

void BlockManager::cache_computed(Sequence& seq) {
  if (!prefix_caching_) return;
  const int64_t full = seq.num_computed_tokens / block_size_;
  for (int64_t i = seq.num_hashed_blocks; i < full; ++i) {
    const int32_t* toks = seq.tokens.data() + i * block_size_;
    const uint64_t h = chain_hash(seq.last_block_hash, toks, block_size_);
    const int32_t id = seq.block_table[i];
    Block& b = blocks_[id];
    // A block another sequence already cached under this hash stays the cached copy; ours is
    // still correct for us, just not shared.
    if (!b.hashed && by_hash_.emplace(h, id).second) {
      b.hashed = true;
      b.hash = h;
      b.parent_hash = seq.last_block_hash;
      b.token_ids.assign(toks, toks + block_size_);
    }
    seq.last_block_hash = h;
    seq.num_hashed_blocks = i + 1;
  }
}

}  // namespace shardserve
