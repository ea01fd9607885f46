#include "attach.h"

#include <cstdio>
#include <string>
#include <unordered_map>

#include "cloudml/internal/v1/dataplane.pb.h"
#include "protocol.h"
#include "wire.h"

namespace cloudml::dataplane {

namespace pb = cloudml::internal::v1;

void Attachment::Connect() {
  client_ = std::make_unique<grpc::ClientContext>();
  client_->AddMetadata(kSecretHeader, plane_.options.secret);
  stream_ = plane_.upstream->PrepareCall(client_.get(), kAttach, plane_.cq.get());
  live_ = true;
  writing_ = false;
  pending_++;
  stream_->StartCall(&tags_[kStart]);
}

void Attachment::Stop() {
  if (live_) Broken();
  alarm_.Cancel();
}

void Attachment::Done(int op, bool ok) {
  pending_--;
  Plane& p = plane_;
  if (!live_) {  // the old stream draining, or the wait before reconnecting
    if (pending_ == 0 && !p.stopping) {
      if (op == kTimer && reconnect_armed_) {
        reconnect_armed_ = false;
        Connect();
      } else {
        reconnect_armed_ = true;
        Arm(std::chrono::milliseconds(200));
      }
    }
    return;
  }
  switch (op) {
    case kStart:
      if (!ok) return Broken();
      pending_++;
      stream_->Read(&in_, &tags_[kRead]);
      Tick();
      return;
    case kRead: {
      if (!ok) return Broken();
      pb::DataplaneControl control;
      if (control.ParseFromString(Flatten(in_))) {
        if (control.latency_buckets_size() > 0 && p.bucket_bounds.empty())
          p.bucket_bounds.assign(control.latency_buckets().begin(), control.latency_buckets().end());
        p.SetGeneration(control.generation());
        std::unordered_map<std::string, Instances> services;
        for (const auto& s : control.services()) {
          Instances& in = services["/" + s.service() + "/"];
          in.addresses.assign(s.addresses().begin(), s.addresses().end());
          auto old = p.services.find("/" + s.service() + "/");
          if (old != p.services.end()) in.next = old->second.next;
        }
        p.services = std::move(services);
        p.public_methods = {control.public_methods().begin(), control.public_methods().end()};
      }
      pending_++;
      stream_->Read(&in_, &tags_[kRead]);
      return;
    }
    case kWrite:
      writing_ = false;
      if (!ok) return Broken();
      return;
    case kTimer:
      Tick();
      return;
    default:
      return;
  }
}

void Attachment::Tick() {
  Plane& p = plane_;
  if (!writing_ && p.stats_dirty) {
    pb::DataplaneReport report;
    std::unique_lock<std::mutex> lock(p.mu);
    report.set_fast_path_calls(p.fast_calls);
    report.set_slow_path_calls(p.slow_calls);
    report.set_coalesced_calls(p.coalesced_calls);
    report.set_rest_fast_path_calls(p.rest_calls);
    report.set_framed_calls(p.frame_calls);
    for (const auto& [key, s] : p.stats) {
      auto* stat = report.add_stats();
      stat->set_model(std::get<0>(key));
      stat->set_version(std::get<1>(key));
      stat->set_api(std::get<2>(key));
      stat->set_code(std::get<3>(key));
      stat->set_count(s.count);
      stat->set_latency_sum_seconds(s.sum);
      for (auto b : s.buckets) stat->add_latency_buckets(b);
    }
    lock.unlock();
    for (const auto& [key, count] : p.relays) {
      auto* relay = report.add_relays();
      relay->set_service(std::get<0>(key));
      relay->set_method(std::get<1>(key));
      relay->set_code(std::get<2>(key));
      relay->set_count(count);
    }
    out_ = ToBuffer(report.SerializeAsString());
    p.stats_dirty = false;
    writing_ = true;
    pending_++;
    stream_->Write(out_, &tags_[kWrite]);
  }
  Arm(std::chrono::milliseconds(1000));
}

void Attachment::Arm(std::chrono::milliseconds after) {
  pending_++;
  alarm_.Set(plane_.cq.get(), std::chrono::system_clock::now() + after, &tags_[kTimer]);
}

void Attachment::Broken() {
  Plane& p = plane_;
  live_ = false;
  p.SetGeneration(0);
  p.services.clear();
  p.stats_dirty = true;
  if (!p.stopping) fprintf(stderr, "dataplane: control stream lost; reconnecting\n");
  client_->TryCancel();
  alarm_.Cancel();
  pending_++;
  stream_->Finish(&status_, &tags_[kFinish]);
}

}  // namespace cloudml::dataplane
