// One line for a failure that may come from LibTorch: c10::Error's what() carries a C++ stack dump,
// which belongs in no log line, status document or peer's error reply.
#pragma once

#include <exception>
#include <string>

#include <c10/util/Exception.h>

namespace fedmoe::model {

inline std::string describe(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

}  // namespace fedmoe::model
