// When the loop polls instead of sleeping (see main.cc's Run and the top of
// main.cc for the figures behind it).
//
// Polling saves the thread a wake-up when an event comes while it polls,
// and costs a core meanwhile. It pays only when an event is about to come,
// and the one event this process can predict is a replica's reply: so it
// polls only while a model call (or PredictBatch group) is out at a replica,
// from its sending until the reply is late by this process's recent
// experience (twice the running mean of replica round trips, plus
// kSpinSlackUs), and never longer than --spin-us after the latest send.
// Nothing is polled for between calls: the next call from a caller cannot be
// predicted, and polling for it cost ~1 ms of CPU per call at any pacing with
// a pause. Not at all while more than kSpinMaxInFlight model calls are in
// flight (under load events come anyway, and the core goes to the replicas
// and callers that share the machine: half_plus_two at concurrency 32
// through the gateway fell from ~3,800 to ~2,450 rps when it polled
// regardless). Each empty poll yields the core, so the caller's and the
// replica's threads that share it run meanwhile.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "handler.h"

namespace cloudml::dataplane {

constexpr int kSpinMaxInFlight = 2;
constexpr int64_t kSpinSlackUs = 50;

class SpinPolicy {
 public:
  explicit SpinPolicy(int cap_us) : cap_us_(cap_us) {}

  // A call or group went to a replica; `Answered` with the same time when it returns.
  Clock::time_point Sent() {
    last_sent_ = Clock::now();
    out_++;
    return last_sent_;
  }
  void Answered(Clock::time_point sent) {
    out_--;
    double us = std::chrono::duration<double, std::micro>(Clock::now() - sent).count();
    mean_us_ = mean_us_ == 0 ? us : 0.875 * mean_us_ + 0.125 * us;
  }

  // Whether to poll now, with `model_calls` model calls in flight.
  bool Spin(Clock::time_point now, int model_calls) const {
    if (cap_us_ <= 0 || out_ <= 0 || model_calls > kSpinMaxInFlight) return false;
    int64_t window = cap_us_;
    if (mean_us_ > 0) window = std::min<int64_t>(window, static_cast<int64_t>(2 * mean_us_) + kSpinSlackUs);
    return now - last_sent_ < std::chrono::microseconds(window);
  }

  double mean_us() const { return mean_us_; }

 private:
  int cap_us_;
  int out_ = 0;  // calls and groups out at replicas
  Clock::time_point last_sent_;
  double mean_us_ = 0;  // running mean of replica round trips
};

}  // namespace cloudml::dataplane
