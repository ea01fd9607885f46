// The floor of ANY relay process (bench/bench_relay_floor.py, target "bytes"):
// it copies bytes between a TCP client and the upstream Unix socket and
// understands nothing: no HTTP/2 frames, no gRPC, no routing, no limits, no
// deadlines. One thread, one epoll set, blocking-free sockets. Whatever a
// relayed call costs over a direct one here, every relay that reads a request
// and writes it on pays at least as much on this machine.
//
//     bytes --listen 127.0.0.1:0 --front-for unix:/path/to.sock
// prints the port it listens on, then serves until killed.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 4096
static int peer[MAX_FDS];

static void die(const char* what) { perror(what); exit(1); }

static int upstream(const char* path) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  // A Unix socket connects at once or fails; no EINPROGRESS to wait for.
  if (connect(fd, (struct sockaddr*)&addr, sizeof(addr)) < 0) { close(fd); return -1; }
  return fd;
}

static void drop(int epoll, int fd) {
  int other = peer[fd];
  epoll_ctl(epoll, EPOLL_CTL_DEL, fd, NULL);
  close(fd);
  if (other >= 0) { epoll_ctl(epoll, EPOLL_CTL_DEL, other, NULL); close(other); peer[other] = -1; }
  peer[fd] = -1;
}

// Copies what fd has to its peer. The peer's socket buffer takes a whole
// unary call at these sizes; a short write is treated as a dead peer (a floor,
// not a product: it never needs to buffer).
static void pump(int epoll, int fd) {
  char buf[65536];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n == 0 || (n < 0 && errno != EAGAIN)) { drop(epoll, fd); return; }
    if (n < 0) return;
    if (write(peer[fd], buf, (size_t)n) != n) { drop(epoll, fd); return; }
    if (n < (ssize_t)sizeof(buf)) return;
  }
}

int main(int argc, char** argv) {
  const char* listen_at = "127.0.0.1:0"; const char* front_for = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--listen")) listen_at = argv[i + 1];
    else if (!strcmp(argv[i], "--front-for")) front_for = argv[i + 1];
  }
  if (!front_for || strncmp(front_for, "unix:", 5)) { fprintf(stderr, "--front-for unix:PATH\n"); return 2; }
  char host[64]; int port = 0;
  if (sscanf(listen_at, "%63[^:]:%d", host, &port) != 2) { fprintf(stderr, "--listen HOST:PORT\n"); return 2; }
  for (int i = 0; i < MAX_FDS; i++) peer[i] = -1;

  int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("inet_pton");
  if (bind(listener, (struct sockaddr*)&addr, sizeof(addr)) < 0 || listen(listener, 128) < 0) die("bind");
  socklen_t len = sizeof(addr);
  getsockname(listener, (struct sockaddr*)&addr, &len);
  printf("%d\n", ntohs(addr.sin_port));
  fflush(stdout);

  int epoll = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
  epoll_ctl(epoll, EPOLL_CTL_ADD, listener, &ev);
  struct epoll_event events[64];
  for (;;) {
    int n = epoll_wait(epoll, events, 64, -1);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    for (int i = 0; i < n; i++) {
      int fd = events[i].data.fd;
      if (fd != listener) { if (peer[fd] >= 0) pump(epoll, fd); continue; }
      int client;
      while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
        int up = upstream(front_for + 5);
        if (up < 0 || client >= MAX_FDS || up >= MAX_FDS) { close(client); if (up >= 0) close(up); continue; }
        setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        peer[client] = up; peer[up] = client;
        struct epoll_event a = {.events = EPOLLIN, .data.fd = client}, b = {.events = EPOLLIN, .data.fd = up};
        epoll_ctl(epoll, EPOLL_CTL_ADD, client, &a);
        epoll_ctl(epoll, EPOLL_CTL_ADD, up, &b);
      }
    }
  }
}
