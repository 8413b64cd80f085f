#include "actors/router.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include <caf/actor_cast.hpp>
#include <caf/atom.hpp>
#include <caf/event_based_actor.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "actors/dispatch.hpp"
#include "actors/tensor_bridge.hpp"
#include "actors/worker.hpp"
#include "model/errors.hpp"
#include "net/text.hpp"

namespace fedmoe::actors {

namespace {

using Self = caf::stateful_actor<RouterState>;
using fetch_timeout_atom = caf::atom_constant<caf::atom("ftimeout")>;

void send_to(Self* self, const caf::actor& to, uint64_t correlation_id, net::Body body) {
  self->state.transport->send(self, to, self->state.options.node_id, correlation_id, std::move(body));
}

double replica_score(Self* self, const std::string& shard) {
  const auto& h = self->state.health[shard];
  return h.reliability() / (1.0 + h.latency_ms / self->state.options.latency_unit_ms) / (1.0 + h.in_flight);
}

// Live replicas of `expert` this router can reach, best first.
std::vector<std::string> ranked_replicas(Self* self, const std::string& expert) {
  std::vector<std::string> out;
  auto it = self->state.placement.find(expert);
  if (it == self->state.placement.end()) return out;
  for (const auto& s : it->second)
    if (self->state.shards.count(s)) out.push_back(s);
  std::stable_sort(out.begin(), out.end(),
                   [&](const std::string& a, const std::string& b) { return replica_score(self, a) > replica_score(self, b); });
  return out;
}

uint64_t newest_known(Self* self, const std::string& expert) {
  uint64_t v = 0;
  for (const auto& [shard, version] : self->state.versions[expert]) v = std::max(v, version);
  return v;
}

std::string known_experts(Self* self) {
  std::string s;
  for (const auto& [e, shards] : self->state.placement) s += (s.empty() ? "" : ", ") + e;
  return s.empty() ? "none" : s;
}

// The experts a prompt goes to, or an error.
std::vector<net::RouteChoice> route(Self* self, const std::string& prompt, uint32_t max_experts, std::string* error) {
  const auto& o = self->state.options;
  const size_t k = max_experts ? max_experts : o.max_experts;
  std::vector<model::ExpertScore> chosen;
  if (o.routing != "learned" && o.rules && !o.rules->empty()) chosen = model::choose(o.rules->route(prompt), k, o.min_share);
  if (chosen.empty() && o.routing != "rules" && o.learned && o.learned->trained())
    chosen = model::choose(o.learned->route(o.server->base(), o.server->tokenizer(), prompt), k, o.min_share);
  if (chosen.empty() && !o.default_expert.empty()) chosen.push_back({o.default_expert, 0.0, "default"});
  if (chosen.empty()) {
    *error = "no expert matches the prompt (routing '" + o.routing + "': " +
             (o.rules && !o.rules->empty() ? "no rule matched" : "no rules configured") +
             (o.learned && o.learned->trained() ? "" : ", no learned router") + "; no default expert)";
    return {};
  }
  std::vector<net::RouteChoice> out;
  for (const auto& c : chosen) {
    net::RouteChoice r;
    r.expert_id = c.expert;
    r.score = static_cast<float>(c.score);
    r.reason = c.reason;
    r.version = newest_known(self, c.expert);
    auto replicas = ranked_replicas(self, c.expert);
    if (!replicas.empty()) r.shard_id = replicas.front();
    out.push_back(std::move(r));
  }
  return out;
}

void record(Self* self, GenerationRecord rec) {
  self->state.recent.push_back(std::move(rec));
  if (self->state.recent.size() > 20) self->state.recent.pop_front();
}

void fail_generation(Self* self, uint64_t gid, const std::string& error) {
  auto it = self->state.pending.find(gid);
  if (it == self->state.pending.end()) return;
  auto& p = it->second;
  ++self->state.failed_generations;
  spdlog::warn("{}: request {} failed: {}", self->state.options.node_id, p.request.request_id, error);
  net::GenerateReply reply;
  reply.request_id = p.request.request_id;
  reply.error = error;
  reply.choices = p.choices;
  reply.combine = p.combine;
  send_to(self, p.client, p.client_correlation, reply);
  record(self, {p.request.request_id, net::utf8_head(p.request.prompt, 80), p.choices, p.combine, error, 0, 0});
  for (const auto& f : p.fetches) self->state.fetch_of.erase(f.correlation);
  self->state.pending.erase(it);
}

void send_fetch(Self* self, uint64_t gid, size_t index);

// Every chosen expert is attached: generate, combine, answer.
void run_generation(Self* self, uint64_t gid) {
  auto& st = self->state;
  auto it = st.pending.find(gid);
  if (it == st.pending.end()) return;
  auto& p = it->second;
  const double fetch_seconds = double(net::steady_ms_now() - p.started_ms) / 1000.0;
  model::GenerationOptions g;
  g.max_new_tokens = p.request.max_new_tokens ? p.request.max_new_tokens : st.options.max_new_tokens;
  g.sampling.temperature = p.request.temperature;
  g.sampling.top_k = p.request.top_k;
  g.sampling.top_p = p.request.top_p > 0 ? p.request.top_p : 1.0;
  g.sampling.seed = p.request.seed;
  net::GenerateReply reply;
  reply.request_id = p.request.request_id;
  const auto t0 = net::steady_ms_now();
  try {
    std::string text;
    for (auto& choice : p.choices) {
      std::vector<std::string> adapters;
      std::string shards;
      for (const auto& f : p.fetches) {
        if (f.expert != choice.expert_id || f.dropped) continue;
        if (std::find(adapters.begin(), adapters.end(), f.adapter) == adapters.end()) {
          adapters.push_back(f.adapter);
          reply.experts.push_back({f.expert, f.version});
        }
        shards += (shards.empty() ? "" : ",") + f.shard;
        choice.version = f.version;
      }
      choice.shard_id = shards;
      auto answer = st.options.server->generate(adapters, p.request.prompt, g);
      ++st.routed[choice.expert_id];
      if (p.choices.size() == 1) text = answer;
      else text += (text.empty() ? "" : "\n\n") + ("[" + choice.expert_id + "]\n") + answer;
    }
    reply.text = std::move(text);
  } catch (const std::exception& e) {
    return fail_generation(self, gid, "generation failed: " + model::describe(e));
  }
  const bool averaged = reply.experts.size() > p.choices.size();
  p.combine = p.choices.size() > 1 ? (averaged ? "consensus+stitch" : "stitch") : (averaged ? "consensus" : "single");
  reply.choices = p.choices;
  reply.combine = p.combine;
  ++st.generations;
  const double gen_seconds = double(net::steady_ms_now() - t0) / 1000.0;
  spdlog::info("{}: request {} answered with {} ({}), fetch {:.3f} s, generation {:.3f} s", st.options.node_id,
               p.request.request_id, reply.experts.size() == 1 ? reply.experts[0].expert_id + " v" +
                                                                     std::to_string(reply.experts[0].version)
                                                               : std::to_string(reply.experts.size()) + " expert versions",
               p.combine, fetch_seconds, gen_seconds);
  send_to(self, p.client, p.client_correlation, reply);
  record(self, {p.request.request_id, net::utf8_head(p.request.prompt, 80), p.choices, p.combine, "", fetch_seconds, gen_seconds});
  st.pending.erase(it);
}

void maybe_finish(Self* self, uint64_t gid) {
  auto it = self->state.pending.find(gid);
  if (it == self->state.pending.end()) return;
  for (const auto& f : it->second.fetches)
    if (!f.done && !f.dropped) return;
  run_generation(self, gid);
}

// A fetch's replica failed: charge it and ask the next best one, or give up on this fetch.
void fetch_failed(Self* self, uint64_t gid, size_t index, const std::string& why) {
  auto& st = self->state;
  auto it = st.pending.find(gid);
  if (it == st.pending.end()) return;
  auto& p = it->second;
  auto& f = p.fetches[index];
  st.fetch_of.erase(f.correlation);
  auto& h = st.health[f.shard];
  ++h.failures;
  if (h.in_flight) --h.in_flight;
  f.tried.push_back(f.shard + ": " + why);
  spdlog::warn("{}: replica {} of '{}' failed ({}); failing over", st.options.node_id, f.shard, f.expert, why);
  // Replicas not yet tried, and not used by another fetch of the same expert (consensus).
  for (const auto& shard : ranked_replicas(self, f.expert)) {
    bool used = false;
    for (const auto& t : f.tried) used = used || t.rfind(shard + ":", 0) == 0;
    for (const auto& g : p.fetches) used = used || (&g != &f && g.expert == f.expert && g.shard == shard && !g.dropped);
    if (used) continue;
    ++st.failovers;
    f.shard = shard;
    return send_fetch(self, gid, index);
  }
  // No replica left for this fetch. Consensus can go on with the copies it has.
  bool another = false;
  for (const auto& g : p.fetches) another = another || (&g != &f && g.expert == f.expert && !g.dropped);
  if (another) {
    f.dropped = true;
    return maybe_finish(self, gid);
  }
  std::string tried;
  for (const auto& t : f.tried) tried += (tried.empty() ? "" : "; ") + t;
  fail_generation(self, gid, "no replica of expert '" + f.expert + "' answered (" + tried + ")");
}

void send_fetch(Self* self, uint64_t gid, size_t index) {
  auto& st = self->state;
  auto& f = st.pending.at(gid).fetches[index];
  f.correlation = st.next_id++;
  f.sent_ms = net::steady_ms_now();
  st.fetch_of[f.correlation] = {gid, index};
  auto& h = st.health[f.shard];
  ++h.requests;
  ++h.in_flight;
  ++st.fetches;
  send_to(self, st.shards[f.shard], f.correlation, net::SnapshotRequest{f.expert, f.min_version, true});
  self->delayed_send(self, std::chrono::milliseconds(st.options.reply_timeout_ms), fetch_timeout_atom::value,
                     f.correlation);
}

void on_snapshot(Self* self, const net::Message& m, const net::ExpertSnapshot& snap) {
  auto& st = self->state;
  auto at = st.fetch_of.find(m.correlation_id);
  if (at == st.fetch_of.end()) return;  // late: given up already
  const auto [gid, index] = at->second;
  st.fetch_of.erase(at);
  auto& p = st.pending.at(gid);
  auto& f = p.fetches[index];
  auto& h = st.health[f.shard];
  ++h.answers;
  if (h.in_flight) --h.in_flight;
  const double ms = double(net::steady_ms_now() - f.sent_ms);
  h.latency_ms = h.answers == 1 ? ms : 0.8 * h.latency_ms + 0.2 * ms;
  if (snap.spec.expert_id != f.expert) return fetch_failed(self, gid, index, "answered with expert '" + snap.spec.expert_id + "'");
  auto& known = st.versions[f.expert][f.shard];
  known = std::max(known, snap.version);
  try {
    std::map<std::string, torch::Tensor> tensors;
    for (const auto& t : snap.tensors) tensors.emplace(t.name, from_wire(t));
    const bool consensus = p.combine == "consensus";
    f.adapter = st.options.server->attach(f.expert, snap.version, lora_spec_of(snap.spec), tensors, consensus ? f.shard : "");
  } catch (const std::exception& e) {
    // The expert does not fit this router's base: no replica will do better.
    return fail_generation(self, gid, "expert '" + f.expert + "' v" + std::to_string(snap.version) +
                                          " cannot be served on this router's base: " + model::describe(e));
  }
  f.version = snap.version;
  f.done = true;
  maybe_finish(self, gid);
}

void on_generate(Self* self, const net::Message& m, const net::GenerateRequest& req) {
  auto& st = self->state;
  const uint64_t gid = st.next_id++;
  RouterState::Pending p;
  p.client = caf::actor_cast<caf::actor>(self->current_sender());
  p.client_correlation = m.correlation_id;
  p.request = req;
  p.started_ms = net::steady_ms_now();
  p.combine = req.combine.empty() ? st.options.combine : req.combine;
  st.pending[gid] = p;
  auto& pending = st.pending[gid];
  if (p.combine != "stitch" && p.combine != "consensus")
    return fail_generation(self, gid, "combine '" + p.combine + "': expected stitch or consensus");
  if (req.prompt.empty()) return fail_generation(self, gid, "empty prompt");
  std::string error;
  if (!req.experts.empty()) {  // the client chose
    for (const auto& e : req.experts) {
      net::RouteChoice c;
      c.expert_id = e.expert_id;
      c.version = e.version;
      c.score = 1;
      c.reason = "requested";
      pending.choices.push_back(c);
    }
  } else {
    try {
      pending.choices = route(self, req.prompt, req.max_experts, &error);
    } catch (const std::exception& e) {
      error = "routing failed: " + model::describe(e);
    }
    if (pending.choices.empty()) return fail_generation(self, gid, error);
  }
  for (const auto& c : pending.choices) {
    if (!st.placement.count(c.expert_id))
      return fail_generation(self, gid, "unknown expert '" + c.expert_id + "' (known: " + known_experts(self) + ")");
    auto replicas = ranked_replicas(self, c.expert_id);
    if (replicas.empty()) return fail_generation(self, gid, "no live replica of expert '" + c.expert_id + "' is reachable");
    const size_t copies = pending.combine == "consensus"
                              ? std::min<size_t>(std::max<uint32_t>(st.options.consensus_replicas, 1), replicas.size())
                              : 1;
    const uint64_t newest = newest_known(self, c.expert_id);
    for (size_t i = 0; i < copies; ++i) {
      RouterState::Fetch f;
      f.expert = c.expert_id;
      f.shard = replicas[i];
      f.min_version = c.version;
      // The newest version this router knows of is attached already: no pull (versions never change).
      if (copies == 1 && (c.version == 0 || c.version == newest))
        if (auto held = st.options.server->reuse(c.expert_id, newest)) {
          f.version = newest;
          f.adapter = *held;
          f.done = true;
          ++st.cache_hits;
        }
      pending.fetches.push_back(std::move(f));
    }
  }
  for (size_t i = 0; i < pending.fetches.size(); ++i)
    if (!pending.fetches[i].done) send_fetch(self, gid, i);
  maybe_finish(self, gid);
}

void on_route(Self* self, const net::Message& m, const net::RouteRequest& req) {
  std::string error;
  std::vector<net::RouteChoice> choices;
  try {
    choices = route(self, req.prompt, req.max_experts, &error);
  } catch (const std::exception& e) {
    error = "routing failed: " + model::describe(e);
  }
  auto to = caf::actor_cast<caf::actor>(self->current_sender());
  if (choices.empty()) return send_to(self, to, m.correlation_id, net::ErrorReply{"no_route", error});
  send_to(self, to, m.correlation_id, net::RouteReply{req.request_id, choices});
}

std::string status_json(Self* self) {
  const auto& st = self->state;
  nlohmann::json replicas = nlohmann::json::object();
  for (const auto& [shard, h] : st.health)
    replicas[shard] = {{"requests", h.requests},   {"answers", h.answers},         {"failures", h.failures},
                       {"latency_ms", h.latency_ms}, {"in_flight", h.in_flight},   {"reliability", h.reliability()},
                       {"score", replica_score(const_cast<Self*>(self), shard)}};
  nlohmann::json versions = st.versions;
  nlohmann::json recent = nlohmann::json::array();
  for (const auto& r : st.recent)
    recent.push_back({{"request_id", r.request_id}, {"prompt", r.prompt_head}, {"choices", choices_json(r.choices)},
                      {"combine", r.combine}, {"error", r.error}, {"fetch_seconds", r.fetch_seconds},
                      {"generate_seconds", r.generate_seconds}});
  nlohmann::json rules = nlohmann::json::array();
  if (st.options.rules)
    for (const auto& r : st.options.rules->rules()) rules.push_back(r.text);
  const nlohmann::json j{{"node_id", st.options.node_id},
                         {"role", "router"},
                         {"routing", st.options.routing},
                         {"combine", st.options.combine},
                         {"rules", rules},
                         {"learned_experts", st.options.learned ? st.options.learned->experts() : std::vector<std::string>{}},
                         {"placement_epoch", st.placement_epoch},
                         {"placement", st.placement},
                         {"expert_versions", versions},
                         {"replicas", replicas},
                         {"generations", st.generations},
                         {"failed_generations", st.failed_generations},
                         {"fetches", st.fetches},
                         {"cache_hits", st.cache_hits},
                         {"failovers", st.failovers},
                         {"version_notices", st.notices},
                         {"attached_adapters", st.options.server->adapters()},
                         {"routed", st.routed},
                         {"errors", st.errors},
                         {"recent", recent}};
  return json_text(j);
}

// Every message a client, a shard or the coordinator sends to the router.
void on_message(Self* self, const net::Message& m) {
  auto& st = self->state;
  if (auto* req = std::get_if<net::GenerateRequest>(&m.body)) return on_generate(self, m, *req);
  if (auto* req = std::get_if<net::RouteRequest>(&m.body)) return on_route(self, m, *req);
  if (auto* snap = std::get_if<net::ExpertSnapshot>(&m.body)) return on_snapshot(self, m, *snap);
  if (auto* n = std::get_if<net::VersionNotice>(&m.body)) {
    ++st.notices;
    auto& v = st.versions[n->expert_id][n->shard_id.empty() ? m.sender_id : n->shard_id];
    v = std::max(v, n->version);
    return;
  }
  if (auto* map = std::get_if<net::PlacementMap>(&m.body)) {
    if (map->epoch < st.placement_epoch) return;
    st.placement_epoch = map->epoch;
    st.placement.clear();
    for (const auto& p : map->placements) {
      auto& live = st.placement[p.expert_id];
      for (const auto& r : p.replicas)
        if (r.alive) live.push_back(r.shard_id);
    }
    return;
  }
  if (auto* req = std::get_if<net::StatusRequest>(&m.body))
    return send_to(self, caf::actor_cast<caf::actor>(self->current_sender()), m.correlation_id,
                   net::StatusReply{req->request_id, st.options.node_id, net::Role::router, status_json(self)});
  if (std::holds_alternative<net::HelloAck>(m.body)) return;
  if (auto* err = std::get_if<net::ErrorReply>(&m.body)) {  // never answer an error with an error
    if (err->code == "not_a_member" && st.link) return self->send(st.link, rejoin_atom::value);
    auto at = st.fetch_of.find(m.correlation_id);
    if (at != st.fetch_of.end()) return fetch_failed(self, at->second.first, at->second.second, err->code + ": " + err->detail);
    ++st.errors["peer_error:" + err->code];
    return;
  }
  ++st.errors["unsupported"];
  send_to(self, caf::actor_cast<caf::actor>(self->current_sender()), m.correlation_id,
          net::ErrorReply{"unsupported", std::string("a router does not handle ") + net::body_name(m.body) + " messages"});
}

}  // namespace

nlohmann::json choices_json(const std::vector<net::RouteChoice>& choices) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& c : choices)
    out.push_back({{"expert", c.expert_id}, {"version", c.version}, {"score", c.score}, {"shard", c.shard_id},
                   {"reason", c.reason}});
  return out;
}

caf::behavior router(Self* self, std::shared_ptr<net::Transport> transport, RouterOptions options) {
  auto& st = self->state;
  st.transport = std::move(transport);
  st.options = std::move(options);
  if (!st.options.server) throw std::invalid_argument("router: no expert server (base model) given");
  st.shards = st.options.shards;
  st.placement = st.options.placement;
  auto& mem = st.options.membership;
  mem.hello.node_id = st.options.node_id;
  mem.hello.role = net::Role::router;
  st.link = spawn_coordinator_link(self, st.transport, mem);
  self->set_down_handler([=](const caf::down_msg& down) {
    peer_down(self, self->state.shards, self->state.peer_endpoint, down.source);  // connected again
  });
  return {
      [=](join_atom, caf::actor coordinator, std::string endpoint) {
        join_federation(self, self->state.transport, self->state.options.membership, self->state.link,
                        std::move(coordinator), std::move(endpoint), "");
      },
      [=](join_atom, caf::actor coordinator, std::string endpoint, std::string coordinator_endpoint) {
        join_federation(self, self->state.transport, self->state.options.membership, self->state.link,
                        std::move(coordinator), std::move(endpoint), std::move(coordinator_endpoint));
      },
      [=](coordinator_atom, caf::actor coordinator) {
        self->state.options.membership.coordinator = std::move(coordinator);
      },
      [=](peer_atom, const std::string& shard, caf::actor handle) { self->state.shards[shard] = std::move(handle); },
      [=](peer_atom, const std::string& shard, caf::actor handle, const std::string& endpoint) {
        // A shard published at an endpoint is reached over a connection of the router's own.
        auto& st = self->state;
        if (endpoint.empty() || !st.shards[shard]) {  // (until its own connection is up: the same actor)
          st.shards[shard] = handle;
          if (endpoint.empty()) return;
        }
        auto known = st.peer_endpoint.find(shard);
        if (known == st.peer_endpoint.end() || known->second != endpoint || !st.shards[shard])
          connect_peer(self, &st.peer_endpoint, shard, endpoint);
      },
      [=](direct_peer_atom, const std::string& shard, caf::actor handle) { self->state.shards[shard] = std::move(handle); },
      [=](reconnect_peer_atom, const std::string& shard) {
        auto it = self->state.peer_endpoint.find(shard);
        if (it != self->state.peer_endpoint.end()) connect_peer(self, &self->state.peer_endpoint, shard, it->second);
      },
      [=](fetch_timeout_atom, uint64_t correlation) {
        auto it = self->state.fetch_of.find(correlation);
        if (it == self->state.fetch_of.end()) return;
        fetch_failed(self, it->second.first, it->second.second,
                     "no answer within " + std::to_string(self->state.options.reply_timeout_ms) + " ms");
      },
      [=](net::WireFrame& frame) {
        dispatch(self, *self->state.transport, self->state.options.node_id, self->state.errors, frame,
                 [&](const net::Message& m) { on_message(self, m); });
      },
  };
}

}  // namespace fedmoe::actors
