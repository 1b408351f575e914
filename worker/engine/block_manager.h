// BlockManager: the paged KV cache's blocks, reference-counted, with automatic prefix caching.
//
// Block states:
//   free            ref_count 0, no hash; on the eviction list
//   cached          ref_count 0, hashed: its K/V still holds a known prefix; on the eviction list
//                   (least recently freed first), reusable by a hit until it is evicted
//   active          ref_count >= 1, owned by that many sequences (shared prefix blocks > 1)
// A block gets a hash only once every one of its tokens has been computed (cache_computed), so
// a hit never reads K/V that is still to be written. The hash of block i chains the hash of block
// i - 1 with block i's token ids; a hit also compares the stored token ids and parent hash, so a
// hash collision can never serve another prefix's cache.
// Capacity (num_blocks) comes from the memory plan.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "worker/engine/sequence.h"

namespace shardserve {

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_size() const { return block_size_; }
  // Blocks that are free or cached (both can be handed out).
  int64_t num_free_blocks() const { return num_free_; }
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  // Whether allocate(seq) will succeed, counting every block as new (hits only help).
  bool can_allocate(const Sequence& seq) const;
  // free|cached -> active for blocks covering all of seq.tokens; full blocks of the leading
  // prefix that are cached are shared instead (ref_count + 1). Sets seq.num_computed_tokens to
  // the tokens served from the cache, at most size - 1 so the last token is computed for logits.
  void allocate(Sequence& seq);
  // active -> (ref_count - 1); at 0 -> cached (if hashed) or free. Tail blocks are put up for
  // eviction before head blocks, since a later request is likelier to share the head.
  void free(Sequence& seq);
  // Whether seq can get blocks to cover `num_tokens` tokens.
  bool can_grow(const Sequence& seq, int64_t num_tokens) const;
  // free|cached -> active for new blocks until `num_tokens` tokens are covered.
  void grow(Sequence& seq, int64_t num_tokens);
  // Hashes seq's full blocks whose tokens are all computed (no-op without prefix caching).
  void cache_computed(Sequence& seq);

  int64_t prefix_cache_hits() const { return hits_; }      // blocks served from the cache
  int64_t prefix_cache_queries() const { return queries_; }  // full prompt blocks looked up

 private:
  struct Block {
    int32_t ref_count = 0;
    bool hashed = false;
    uint64_t hash = 0;
    uint64_t parent_hash = 0;
    std::vector<int32_t> token_ids;
    // Eviction list (doubly linked through block ids; -1 ends).
    int32_t prev = -1;
    int32_t next = -1;
    bool listed = false;
  };

  static uint64_t chain_hash(uint64_t parent, const int32_t* tokens, int64_t n);
  int32_t take_block();            // free|cached -> active (evicts a cached block's hash)
  void unlist(int32_t id);
  void list_back(int32_t id);
  void uncache(int32_t id);

  int64_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  int32_t head_ = -1;  // least recently freed
  int32_t tail_ = -1;
  int64_t num_free_ = 0;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  int64_t hits_ = 0;
  int64_t queries_ = 0;
};

}  // namespace shardserve
