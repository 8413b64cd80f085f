#include "actors/registry.hpp"

#include <algorithm>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace fedmoe::actors {

using nlohmann::json;

json expert_spec_to_json(const net::ExpertSpec& s) {
  return {{"expert_id", s.expert_id},         {"domain", s.domain},
          {"lora_rank", s.lora_rank},         {"lora_alpha", s.lora_alpha},
          {"lora_dropout", s.lora_dropout},   {"target_modules", s.target_modules},
          {"base_model_id", s.base_model_id}, {"use_rslora", s.use_rslora}};
}

net::ExpertSpec expert_spec_from_json(const json& j) {
  net::ExpertSpec s;
  s.expert_id = j.at("expert_id").get<std::string>();
  s.domain = j.value("domain", "");
  s.lora_rank = j.value("lora_rank", 16u);
  s.lora_alpha = j.value("lora_alpha", 32.0f);
  s.lora_dropout = j.value("lora_dropout", 0.0f);
  s.target_modules = j.value("target_modules", std::vector<std::string>{});
  s.base_model_id = j.value("base_model_id", "");
  s.use_rslora = j.value("use_rslora", false);
  return s;
}

bool Registry::join(const net::Hello& h, int64_t now_ms) {
  auto& m = members_[h.node_id];
  m.node_id = h.node_id;
  m.role = h.role;
  m.endpoint = h.endpoint;
  m.device_name = h.device_name;
  m.declared_speed = h.declared_speed;
  m.measured_speed = h.measured_speed;
  m.wish = h.expert;
  m.last_seen_ms = now_ms;
  m.alive = true;
  return rebalance();
}

bool Registry::heartbeat(const net::Heartbeat& hb, int64_t now_ms) {
  auto it = members_.find(hb.node_id);
  if (it == members_.end()) return false;
  auto& m = it->second;
  m.last_seen_ms = now_ms;
  m.load = hb.load;
  if (hb.measured_speed > 0) m.measured_speed = hb.measured_speed;
  if (m.alive) return false;
  m.alive = true;  // back within a grace the coordinator allowed (e.g. after its own restart)
  return rebalance();
}

bool Registry::leave(const std::string& node_id) {
  if (!members_.erase(node_id)) return false;
  assignment_.erase(node_id);
  return rebalance();
}

bool Registry::expire(int64_t now_ms, std::vector<std::string>* died) {
  bool any = false;
  for (auto& [id, m] : members_)
    if (m.alive && now_ms - m.last_seen_ms > int64_t(options_.lease_ms)) {
      m.alive = false;
      any = true;
      if (died) died->push_back(id);
    }
  return any && rebalance();
}

bool Registry::add_expert(const net::ExpertSpec& spec) {
  auto copy = spec;
  copy.removed = false;
  experts_[spec.expert_id] = copy;
  return rebalance();
}

bool Registry::remove_expert(const std::string& expert_id) {
  if (!experts_.erase(expert_id)) return false;
  placement_.erase(expert_id);
  in_sync_.erase(expert_id);
  return rebalance();
}

uint32_t Registry::min_in_sync() const {
  const uint64_t r = std::max<uint64_t>(options_.replication, 1);
  return static_cast<uint32_t>(std::min<uint64_t>(options_.min_in_sync ? options_.min_in_sync : 2, r));
}

std::string Registry::isr_change(const std::string& from, const net::IsrChange& c) {
  auto isr = in_sync_.find(c.expert_id);
  if (isr == in_sync_.end() || isr->second.empty()) return "expert '" + c.expert_id + "' has no in-sync set here";
  if (isr->second.front() != from) return from + " is not the primary of '" + c.expert_id + "' (" + isr->second.front() + " is)";
  if (c.term != term_of(c.expert_id))
    return "term " + std::to_string(c.term) + " is not the current term " + std::to_string(term_of(c.expert_id)) +
           " of '" + c.expert_id + "'";
  if (c.in_sync.empty() || c.in_sync.front() != from) return "the in-sync set must start with its primary";
  const auto& placed = placement_[c.expert_id];
  std::set<std::string> unique;
  for (const auto& s : c.in_sync) {
    if (std::find(placed.begin(), placed.end(), s) == placed.end())
      return "shard '" + s + "' does not hold a replica of '" + c.expert_id + "'";
    if (!unique.insert(s).second) return "shard '" + s + "' is named twice";
  }
  if (isr->second == c.in_sync) return "";
  isr->second = c.in_sync;
  ++epoch_;
  return "";
}

uint64_t Registry::term_of(const std::string& expert_id) const {
  auto it = term_.find(expert_id);
  return it == term_.end() ? 0 : it->second;
}

std::vector<std::string> Registry::in_sync_of(const std::string& expert_id) const {
  auto it = in_sync_.find(expert_id);
  return it == in_sync_.end() ? std::vector<std::string>{} : it->second;
}

std::optional<std::string> Registry::primary_of(const std::string& expert_id) const {
  auto it = in_sync_.find(expert_id);
  if (it == in_sync_.end() || it->second.empty()) return std::nullopt;
  auto m = members_.find(it->second.front());
  if (m == members_.end() || !m->second.alive) return std::nullopt;
  return it->second.front();
}

bool Registry::rebalance() {
  std::vector<std::string> live_shards;
  for (const auto& [id, m] : members_)
    if (m.alive && m.role == net::Role::shard) live_shards.push_back(id);
  std::map<std::string, size_t> held;  // replicas per live shard
  for (const auto& s : live_shards) held[s] = 0;

  auto next_placement = placement_;
  for (auto it = next_placement.begin(); it != next_placement.end();)
    it = experts_.count(it->first) ? std::next(it) : next_placement.erase(it);
  // Keep live replicas where they are (moving an expert costs a transfer); drop dead ones, except
  // the in-sync replicas of an expert none of whose in-sync replicas lives: they hold acknowledged
  // updates that no other replica may have, so the expert waits for one of them to return.
  auto next_in_sync = in_sync_;
  for (auto& [expert, shards] : next_placement) {
    const auto& isr = next_in_sync[expert];
    const bool any_live_in_sync = std::any_of(isr.begin(), isr.end(), [&](const std::string& s) { return held.count(s) > 0; });
    std::erase_if(shards, [&](const std::string& s) {
      return !held.count(s) && (any_live_in_sync || std::find(isr.begin(), isr.end(), s) == isr.end());
    });
    for (const auto& s : shards)
      if (held.count(s)) ++held[s];
  }
  const size_t want = std::min<size_t>(options_.replication, live_shards.size());
  for (const auto& [expert, spec] : experts_) {
    auto& shards = next_placement[expert];
    auto live_count = [&] { return size_t(std::count_if(shards.begin(), shards.end(), [&](const std::string& s) { return held.count(s) > 0; })); };
    while (live_count() < want) {
      std::string best;
      for (const auto& s : live_shards)  // fewest replicas held, then id order: round-robin in effect
        if (std::find(shards.begin(), shards.end(), s) == shards.end() && (best.empty() || held[s] < held[best]))
          best = s;
      if (best.empty()) break;
      shards.push_back(best);
      ++held[best];
    }
  }

  // Workers: keep a still-registered assignment; else the wish if registered; else the fewest-workers expert.
  std::map<std::string, std::string> next_assignment;
  std::map<std::string, size_t> workers_of;
  for (const auto& [expert, spec] : experts_) workers_of[expert] = 0;
  std::vector<std::string> unassigned;
  for (const auto& [id, m] : members_) {
    if (!m.alive || m.role != net::Role::worker) continue;
    auto old = assignment_.find(id);
    std::string choice;
    if (!m.wish.empty() && experts_.count(m.wish)) choice = m.wish;
    else if (old != assignment_.end() && experts_.count(old->second)) choice = old->second;
    if (choice.empty()) {
      unassigned.push_back(id);
      continue;
    }
    next_assignment[id] = choice;
    ++workers_of[choice];
  }
  for (const auto& id : unassigned) {
    std::string best;
    for (const auto& [expert, n] : workers_of)
      if (best.empty() || n < workers_of[best]) best = expert;
    if (best.empty()) break;  // no experts yet
    next_assignment[id] = best;
    ++workers_of[best];
  }

  // In-sync sets follow the placement; the first live member leads, under a new term when it changes.
  auto next_term = term_;
  for (auto it = next_in_sync.begin(); it != next_in_sync.end();)
    it = next_placement.count(it->first) ? std::next(it) : next_in_sync.erase(it);
  for (auto it = next_term.begin(); it != next_term.end();)
    it = experts_.count(it->first) ? std::next(it) : next_term.erase(it);
  for (const auto& [expert, shards] : next_placement) {
    auto& isr = next_in_sync[expert];
    const auto old_primary = isr.empty() ? std::string() : isr.front();
    std::erase_if(isr, [&](const std::string& s) { return std::find(shards.begin(), shards.end(), s) == shards.end(); });
    if (isr.empty()) isr = shards;  // a new expert (or one re-placed from nothing): nothing acknowledged yet
    auto leader = std::find_if(isr.begin(), isr.end(), [&](const std::string& s) { return held.count(s) > 0; });
    if (leader != isr.end()) std::rotate(isr.begin(), leader, std::next(leader));
    const bool leads = !isr.empty() && held.count(isr.front());
    if (leads && (isr.front() != old_primary || next_term[expert] == 0)) ++next_term[expert];
  }

  const bool changed = next_placement != placement_ || next_assignment != assignment_ || next_in_sync != in_sync_ ||
                       next_term != term_;
  placement_ = std::move(next_placement);
  assignment_ = std::move(next_assignment);
  in_sync_ = std::move(next_in_sync);
  term_ = std::move(next_term);
  if (changed) ++epoch_;
  return changed;
}

net::PlacementMap Registry::placement() const {
  net::PlacementMap p;
  p.epoch = epoch_;
  for (const auto& [expert, shards] : placement_) {
    net::ExpertPlacement e;
    e.expert_id = expert;
    e.term = term_of(expert);
    e.in_sync = in_sync_of(expert);
    e.min_in_sync = min_in_sync();
    // In-sync replicas first, the primary leading: members that take the first live replica as the
    // one to push to find the primary there.
    std::vector<std::string> order = e.in_sync;
    for (const auto& s : shards)
      if (std::find(order.begin(), order.end(), s) == order.end()) order.push_back(s);
    for (const auto& s : order) {
      auto m = members_.find(s);
      e.replicas.push_back({s, m != members_.end() ? m->second.endpoint : "", 0,
                            m != members_.end() && m->second.alive});
    }
    p.placements.push_back(std::move(e));
  }
  for (const auto& [worker, expert] : assignment_) p.assignments.push_back({worker, expert});
  return p;
}

std::vector<std::string> Registry::replicas_of(const std::string& expert_id) const {
  auto it = placement_.find(expert_id);
  return it == placement_.end() ? std::vector<std::string>{} : it->second;
}

std::optional<std::string> Registry::assignment_of(const std::string& worker_id) const {
  auto it = assignment_.find(worker_id);
  if (it == assignment_.end()) return std::nullopt;
  return it->second;
}

// --- persistence ------------------------------------------------------------------------------------

json Registry::to_json() const {
  json members = json::array();
  for (const auto& [id, m] : members_)
    members.push_back({{"node_id", id},
                       {"role", net::to_string(m.role)},
                       {"endpoint", m.endpoint},
                       {"device_name", m.device_name},
                       {"declared_speed", m.declared_speed},
                       {"measured_speed", m.measured_speed},
                       {"wish", m.wish},
                       {"alive", m.alive}});
  json experts = json::array();
  for (const auto& [id, s] : experts_) experts.push_back(expert_spec_to_json(s));
  return {{"epoch", epoch_},           {"members", members},     {"experts", experts}, {"placement", placement_},
          {"assignments", assignment_}, {"in_sync", in_sync_}, {"terms", term_}};
}

Registry Registry::from_json(const json& j, Options options, int64_t now_ms) {
  Registry r(options);
  try {
    r.epoch_ = j.at("epoch").get<uint64_t>();
    for (const auto& m : j.at("members")) {
      Member x;
      x.node_id = m.at("node_id").get<std::string>();
      const auto role = m.at("role").get<std::string>();
      for (auto candidate : {net::Role::coordinator, net::Role::worker, net::Role::shard, net::Role::router,
                             net::Role::sim, net::Role::client})
        if (role == net::to_string(candidate)) x.role = candidate;
      x.endpoint = m.value("endpoint", "");
      x.device_name = m.value("device_name", "");
      x.declared_speed = m.value("declared_speed", 1.0);
      x.measured_speed = m.value("measured_speed", 0.0);
      x.wish = m.value("wish", "");
      x.alive = m.value("alive", true);
      x.last_seen_ms = now_ms;
      r.members_[x.node_id] = x;
    }
    for (const auto& e : j.at("experts")) {
      auto spec = expert_spec_from_json(e);
      r.experts_[spec.expert_id] = spec;
    }
    r.placement_ = j.at("placement").get<std::map<std::string, std::vector<std::string>>>();
    r.assignment_ = j.at("assignments").get<std::map<std::string, std::string>>();
    r.in_sync_ = j.value("in_sync", std::map<std::string, std::vector<std::string>>{});
    r.term_ = j.value("terms", std::map<std::string, uint64_t>{});
  } catch (const json::exception& e) {
    throw std::runtime_error(std::string("coordinator state: ") + e.what());
  }
  return r;
}

}  // namespace fedmoe::actors
