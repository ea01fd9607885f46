// The Attach stream to the control plane (the Python gateway): it streams
// the routing generation, the service instance table and the public
// methods; this process reports its call counts and latencies each second.
// When the stream breaks, nothing is cached (generation 0) until it is back.
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>

#include "handler.h"
#include "plane.h"

namespace cloudml::dataplane {

// Keeps one Attach call open: reads generations, writes a report each second.
class Attachment : public Handler {
 public:
  explicit Attachment(Plane& plane) : plane_(plane) {}

  void Connect();
  // Ends the stream for good (the process is stopping).
  void Stop();
  void Done(int op, bool ok) override;

 private:
  enum Op { kStart, kRead, kWrite, kTimer, kFinish };

  void Tick();
  void Arm(std::chrono::milliseconds after);
  // Stops caching, ends the old stream; Done() reconnects once it has drained.
  void Broken();

  Plane& plane_;
  Tag tags_[5] = {{this, kStart}, {this, kRead}, {this, kWrite}, {this, kTimer}, {this, kFinish}};
  std::unique_ptr<grpc::ClientContext> client_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> stream_;
  grpc::ByteBuffer in_, out_;
  grpc::Status status_;
  grpc::Alarm alarm_;
  int pending_ = 0;
  bool live_ = false, writing_ = false, reconnect_armed_ = false;
};

}  // namespace cloudml::dataplane
