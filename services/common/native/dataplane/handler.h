// Every asynchronous operation's tag: the object that started it and which
// of its operations it was. One thread drives one completion queue (main.cc)
// and hands each event to its tag's handler.
#pragma once

#include <chrono>

namespace cloudml::dataplane {

using Clock = std::chrono::steady_clock;

struct Handler {
  virtual void Done(int op, bool ok) = 0;
  virtual ~Handler() = default;
};

struct Tag {
  Handler* handler;
  int op;
};

}  // namespace cloudml::dataplane
