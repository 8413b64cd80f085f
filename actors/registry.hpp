// The coordinator's control-plane state, without the actor (plain C++: tested directly): who is a
// member (join, heartbeat, lease expiry, leave), which experts exist (added and removed at run time),
// where each expert lives (R replicas on live shards, chosen round-robin by fewest replicas held, kept
// where they are while alive, re-placed when a shard dies), and which expert each worker trains (its
// wish if registered, else the expert with the fewest workers). Every change bumps the epoch of the
// PlacementMap the coordinator sends to members. to_json/from_json persist it all.
//
// Leadership, as Kafka's controller keeps it: each placed expert has an in-sync set (the replicas
// holding every acknowledged update, primary first) and a term that grows whenever its primary
// changes. The primary is the first live member of the in-sync set; a replica outside it never
// becomes primary (it may miss acknowledged updates), so an expert whose in-sync replicas are all
// dead has no primary until one returns, and its last in-sync replica stays placed meanwhile. Only
// the primary changes the set, under its current term (isr_change). A new expert's first placement
// is its in-sync set (nothing is acknowledged yet).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "net/messages.hpp"

namespace fedmoe::actors {

struct Member {
  std::string node_id;
  net::Role role = net::Role::unknown;
  std::string endpoint;
  std::string device_name;
  double declared_speed = 1.0, measured_speed = 0.0;
  float load = 0;
  std::string wish;          // a worker's preferred expert
  int64_t last_seen_ms = 0;  // the coordinator's clock
  bool alive = true;
};

// An ExpertSpec as JSON (the coordinator's state file, a shard's snapshot metadata) and back.
nlohmann::json expert_spec_to_json(const net::ExpertSpec& spec);
net::ExpertSpec expert_spec_from_json(const nlohmann::json& j);  // throws nlohmann::json::exception

class Registry {
 public:
  struct Options {
    uint64_t replication = 3;  // replicas per expert (fewer while fewer shards are alive)
    uint64_t lease_ms = 5000;  // a member silent this long is dead
    uint64_t min_in_sync = 0;  // acknowledged only when this many replicas hold it (0: 2, or 1 when R = 1)
  };
  uint32_t min_in_sync() const;
  explicit Registry(Options options) : options_(options) {}

  // Each returns true when the placement map changed (epoch bumped).
  bool join(const net::Hello& hello, int64_t now_ms);
  bool heartbeat(const net::Heartbeat& hb, int64_t now_ms);  // unknown node: false, nothing recorded
  bool leave(const std::string& node_id);
  bool expire(int64_t now_ms, std::vector<std::string>* died = nullptr);
  bool add_expert(const net::ExpertSpec& spec);  // an existing id: its spec is replaced
  bool remove_expert(const std::string& expert_id);
  // The primary `from` asks to change an expert's in-sync set. Returns "" when applied (epoch bumped),
  // else why not (not the primary, an older term, a shard not placed, without the primary first).
  std::string isr_change(const std::string& from, const net::IsrChange& change);

  bool is_member(const std::string& node_id) const { return members_.count(node_id) > 0; }
  const std::map<std::string, Member>& members() const { return members_; }
  const std::map<std::string, net::ExpertSpec>& experts() const { return experts_; }
  net::PlacementMap placement() const;
  std::vector<std::string> replicas_of(const std::string& expert_id) const;
  std::optional<std::string> assignment_of(const std::string& worker_id) const;
  uint64_t term_of(const std::string& expert_id) const;
  std::vector<std::string> in_sync_of(const std::string& expert_id) const;
  std::optional<std::string> primary_of(const std::string& expert_id) const;
  uint64_t epoch() const { return epoch_; }
  void advance_epoch() { ++epoch_; }  // a restarted coordinator's first epoch is newer than any it sent
  const Options& options() const { return options_; }

  nlohmann::json to_json() const;
  // Restores what to_json saved; members come back alive as of `now_ms` and must heartbeat within a
  // lease to stay. Throws std::runtime_error naming the field on a malformed document.
  static Registry from_json(const nlohmann::json& j, Options options, int64_t now_ms);

 private:
  bool rebalance();  // recomputes placement and assignments; bumps the epoch when they change

  Options options_;
  std::map<std::string, Member> members_;
  std::map<std::string, net::ExpertSpec> experts_;
  std::map<std::string, std::vector<std::string>> placement_;  // expert -> shard ids
  std::map<std::string, std::string> assignment_;              // worker -> expert
  std::map<std::string, std::vector<std::string>> in_sync_;    // expert -> in-sync shard ids, primary first
  std::map<std::string, uint64_t> term_;                       // expert -> leadership term
  uint64_t epoch_ = 0;
};

}  // namespace fedmoe::actors
