#include "runtime/node_system.hpp"

#include <stdexcept>

#include <caf/atom.hpp>
#include <caf/io/middleman.hpp>
#include <caf/send.hpp>

#include "net/wire_frame.hpp"

namespace fedmoe::runtime {

NodeSystem::NodeSystem(const NodeSystemOptions& options) {
  net::register_wire_types(config_);
  config_.load<caf::io::middleman>();
  // The default work-stealing scheduler polls aggressively; training nodes need their cores.
  config_.set("scheduler.policy", caf::atom("sharing"));
  config_.set("scheduler.max-threads", options.scheduler_threads);
  config_.set("logger.console", caf::atom("none"));
  system_ = std::make_unique<caf::actor_system>(config_);
  net::Transport::Options t;
  t.bulk_server.bind_host = options.bulk_bind_host;
  t.bulk_server.advertise_host = options.bulk_advertise_host;
  t.bulk_server.port = options.bulk_port;
  t.bulk_threshold = options.bulk_threshold;
  t.enable_bulk = options.enable_bulk;
  transport_ = std::make_shared<net::Transport>(*system_, t);
}

NodeSystem::~NodeSystem() {
  for (auto& a : owned_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  owned_.clear();
  // Actors hold the transport: let them finish before the bulk channel's threads go away.
  system_.reset();
  transport_.reset();
}

caf::actor NodeSystem::own(caf::actor actor) {
  owned_.push_back(actor);
  return actor;
}

uint16_t NodeSystem::publish(const caf::actor& actor, const std::string& host, uint16_t port) {
  auto res = system_->middleman().publish(actor, port, host.c_str(), true);
  if (!res)
    throw std::runtime_error("cannot publish on " + host + ":" + std::to_string(port) + ": " +
                             system_->render(res.error()));
  return *res;
}

caf::actor NodeSystem::connect(const std::string& host, uint16_t port) {
  auto res = system_->middleman().remote_actor(host, port);
  if (!res)
    throw std::runtime_error("cannot reach a fedmoe node at " + host + ":" + std::to_string(port) + ": " +
                             system_->render(res.error()));
  return *res;
}

}  // namespace fedmoe::runtime
