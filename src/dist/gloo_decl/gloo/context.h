// Declaration only, for c10d's ProcessGroupGloo.hpp; see README.md.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
