// How fast can one thread take small packets from a tun device? A microbenchmark, not part of
// the daemon (README "Where the time goes": the io_uring measurement behind item 6 of issue 11).
//
//   apt-get install liburing-dev && gcc -O2 -o /tmp/tun_reads overlayd/bench/tun_reads.c -luring
//   for m in read uring mshot; do unshare -n /tmp/tun_reads $m 3; done      # as root
//
// In a fresh network namespace: a tun device opened as the daemon opens it (IFF_VNET_HDR, TSO
// flags), a child process flooding it with 64-byte UDP packets (sendmmsg of 64), and this
// thread taking them, in one of three ways:
//   read   epoll_wait, then read() until EAGAIN (at most 64): what the data plane does
//   uring  64 IORING_OP_READ in flight on the (blocking) fd, one io_uring_enter per batch
//   mshot  one IORING_OP_READ_MULTISHOT (6.7+) over a ring of 64 provided buffers
// It prints packets read per second and this thread's CPU time per packet (user + system,
// task work included: the io_uring reads run in this thread's context, not in io-wq).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <liburing.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define QD 64
#define BUF 2048
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static double cpu(void) { struct rusage r; getrusage(RUSAGE_THREAD, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec * 1e-6; }

// Wait (at most 100 ms) for the next completion: whether there is one.
static int wait_cqe(struct io_uring *ring, long *waits) {
  struct io_uring_cqe *cqe;
  struct __kernel_timespec ts = {0, 100000000};
  if (io_uring_wait_cqe_timeout(ring, &cqe, &ts) < 0) return 0;
  ++*waits;
  return 1;
}

static void arm_multishot(struct io_uring *ring, int fd) {
  struct io_uring_sqe *s = io_uring_get_sqe(ring);
  io_uring_prep_rw(49 /* IORING_OP_READ_MULTISHOT */, s, fd, NULL, 0, 0);
  s->flags |= IOSQE_BUFFER_SELECT; s->buf_group = 1;
  io_uring_submit(ring);
}

static void sender(double secs) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(9)};
  inet_pton(AF_INET, "10.77.0.2", &a.sin_addr);
  connect(s, (void *)&a, sizeof a);
  char payload[64] = {1};
  struct mmsghdr m[64]; struct iovec v[64];
  for (int i = 0; i < 64; i++) { v[i].iov_base = payload; v[i].iov_len = 64; memset(&m[i], 0, sizeof m[i]);
    m[i].msg_hdr.msg_iov = &v[i]; m[i].msg_hdr.msg_iovlen = 1; }
  double end = now() + secs;
  while (now() < end) sendmmsg(s, m, 64, 0);
  _exit(0);
}

int main(int argc, char **argv) {
  const char *mode = argv[1]; double secs = atof(argv[2]);
  int fd = open("/dev/net/tun", O_RDWR);
  struct ifreq ifr = {0}; strcpy(ifr.ifr_name, "tbr0");
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); return 1; }
  ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN);
  if (system("ip link set lo up; ip addr add 10.77.0.1/24 dev tbu0; ip link set tbu0 up txqueuelen 1000")) return 1;
  if (!strcmp(mode, "read")) fcntl(fd, F_SETFL, O_NONBLOCK);
  static char bufs[QD][BUF];
  pid_t child = fork();
  if (child == 0) sender(secs);
  usleep(100000);
  long pkts = 0, waits = 0; double t0 = now(), c0 = cpu(), tend = t0 + secs - 0.2;
  if (!strcmp(mode, "read")) {
    int ep = epoll_create1(0); struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    while (now() < tend) {
      if (epoll_wait(ep, &ev, 1, 100) <= 0) continue;
      waits++;
      for (int i = 0; i < QD; i++) { if (read(fd, bufs[i], BUF) < 0) break; pkts++; }
    }
  } else if (!strcmp(mode, "uring")) {
    struct io_uring ring; io_uring_queue_init(256, &ring, 0);
    for (int i = 0; i < QD; i++) { struct io_uring_sqe *s = io_uring_get_sqe(&ring);
      io_uring_prep_read(s, fd, bufs[i], BUF, 0); s->user_data = i; }
    io_uring_submit(&ring);
    while (now() < tend) {
      struct io_uring_cqe *cqe; unsigned head, n = 0;
      if (!wait_cqe(&ring, &waits)) continue;
      io_uring_for_each_cqe(&ring, head, cqe) {
        int i = cqe->user_data; if (cqe->res > 0) pkts++;
        struct io_uring_sqe *s = io_uring_get_sqe(&ring);
        io_uring_prep_read(s, fd, bufs[i], BUF, 0); s->user_data = i; n++;
      }
      io_uring_cq_advance(&ring, n);
      io_uring_submit(&ring);
    }
  } else {
    struct io_uring ring; io_uring_queue_init(256, &ring, 0);
    struct io_uring_buf_ring *br; void *mem;
    if (posix_memalign(&mem, 4096, QD * sizeof(struct io_uring_buf))) return 1;
    br = mem; io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)br, .ring_entries = QD, .bgid = 1};
    if (io_uring_register_buf_ring(&ring, &reg, 0)) { perror("buf ring"); return 1; }
    for (int i = 0; i < QD; i++) io_uring_buf_ring_add(br, bufs[i], BUF, i, QD - 1, i);
    io_uring_buf_ring_advance(br, QD);
    arm_multishot(&ring, fd);
    while (now() < tend) {
      struct io_uring_cqe *cqe; unsigned head, n = 0;
      if (!wait_cqe(&ring, &waits)) continue;
      int rearm = 0;
      io_uring_for_each_cqe(&ring, head, cqe) {
        if (cqe->res > 0) { pkts++; int b = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
          io_uring_buf_ring_add(br, bufs[b], BUF, b, QD - 1, 0); io_uring_buf_ring_advance(br, 1); }
        else if (cqe->res != -ENOBUFS) { fprintf(stderr, "mshot res %d\n", cqe->res); }
        if (!(cqe->flags & IORING_CQE_F_MORE)) rearm = 1;
        n++;
      }
      io_uring_cq_advance(&ring, n);
      if (rearm) arm_multishot(&ring, fd);   // the kernel ended it (e.g. out of buffers)
    }
  }
  double dt = now() - t0, dc = cpu() - c0;
  kill(child, SIGKILL); waitpid(child, NULL, 0);
  printf("%-6s %8.0f kpps read, reader CPU %6.0f ns/packet (%.0f%% of a core), %.1f packets/wake-up\n",
         mode, pkts / dt / 1e3, dc / pkts * 1e9, dc / dt * 100, (double)pkts / (waits ? waits : 1));
  return 0;
}
