# The native engine: data-plane threads that drive the forwarders' batch loops without Python.
# Python side: overlayd/runtime/engine.py.
#
# 1. One C thread (pthread) per forwarder. Each forwarder is a whole, unshared data plane of
#    its own (slots, send queues, counters, capture ring, table generation), so the per-packet
#    code runs unchanged and unsynchronised: a thread owns its forwarder's packet path, its
#    device queue fd and its receive socket fd (IFF_MULTI_QUEUE + SO_REUSEPORT give every
#    thread its own; the kernel spreads flows over them by hash, one flow on one queue).
# 2. The loop: epoll_wait (level-triggered) on the device fd, the socket fd and a wake
#    eventfd; a readable fd gets one _inside_run/_outside_run (the same nogil batch functions
#    inside_batch/outside_batch call). The GIL is never taken here.
# 3. Busy-poll (busy_poll_us > 0): after a wake-up that did work, the thread keeps running
#    non-blocking batches on both fds until busy_poll_us pass without a packet, so the reply
#    of a request-response exchange is taken without a sleep and a wake-up. An empty round
#    yields the CPU (sched_yield): on a host with fewer idle cores than spinning threads, a
#    poll that does not give way holds the CPU the other hop of the same round trip needs.
# 4. Control stays with Python: everything that changes a forwarder's state outside its packet
#    path (set_tables, set_capture, drain_capture) runs while that thread is *paused*:
#    pause() asks through the wake eventfd, the thread finishes its batch, acknowledges and
#    waits on a condition variable; the caller (GIL released while it waits) then calls the
#    forwarder's ordinary methods, and resume() lets the thread go on. A table swap is thus
#    still one assignment that no batch sees halfway, and the old generation can only be freed
#    after the batch that pinned it ended. Reading counters needs no pause: each is an aligned
#    uint64 written by one thread only, so a reader sees a recent value, never a torn one.
#    Each thread counts the pauses it acknowledged (thread_stats "pauses"; overlayd status),
#    so a test or an operator sees which control calls still stop it.
# 5. A device read error (the device vanished) takes the device fd out of the thread's epoll
#    set and is reported through device_error(); after the runtime recreated the device on
#    the same fd numbers, attach_device() puts it back. The thread never closes an fd.
# 6. stop() asks every thread to end and joins it: no thread outlives the engine (nor the
#    daemon, which stops the engine before it closes the fds).
# 7. Affinity (`[dataplane] steering = "cpu"`, runtime/steering.py): pin(i, cpus) sets thread
#    i's CPU set from the control thread, while it runs (the kernel moves it at its next
#    scheduling point); affinity(i) reads the set back from the kernel for status.
# 8. Events for the control plane (the wireguard forwarder's queue: handshake messages, "needs
#    a session", roamed endpoints, confirmed sessions): after a batch that queued some, the
#    thread writes the engine's notify eventfd (notify_fd), which the runtime watches on its
#    loop; it then drains them without pausing the thread (the queue is a single-producer
#    single-consumer ring: cext/wireguard.pxi _event) and answers them, pausing only what an
#    answer changes. Only a batch that added events writes, never a packet (the engine keeps
#    the ring's tail it last signalled); a wireguard thread also reads the clock before each
#    batch.
# 9. A wireguard thread's clock step (engine_clock) zeroes the keypairs 3 x REJECT_AFTER_TIME
#    old itself, and its epoll_wait sleeps no longer than the next one is due (engine_wait_ms),
#    so the runtime's 0.1 s tick pauses no thread.
# 10. A switched thread's clock step ages its own MAC table (set_ageing(max_age, period): one
#    age() pass per period at most, and only once the oldest learned entry is older than
#    max_age), and its epoll_wait sleeps no longer than that pass is due (_age_due: the
#    learned list's head, one comparison). The daemon then runs no FDB timer: nothing pauses
#    the switched data plane for ageing, and an idle one with nothing to age never wakes.
#    An epoll_wait that returns at such a deadline counts as a deadline wake-up, and the
#    longest clock step that had work due (an ageing pass, an expiry) is kept: that is the
#    stall the step costs the data plane (thread_stats "clock_step_max_us").
# 11. Drain reports (`steering = "cpu"`, io/steering.py): report_drains(map_fd) maps the
#    steering programs' BPF array of drain times into the engine; from then on thread i stores,
#    after each batch that emptied its device queue (slot 2i) or its socket (slot 2i+1), the
#    CLOCK_MONOTONIC time (bpf_ktime_get_ns's clock) at which that batch began: every packet
#    queued before then has been read. A program moves a silent flow to another thread only
#    once its old thread has drained since the flow's last packet, so the move cannot reorder.
#    One aligned 64-bit store per draining batch; the mapping lives as long as the engine.
#    The programs also place a *new* flowlet by load (io/steering.py, "placement"), and a drain
#    time alone cannot tell an idle thread (nothing to read since, so no batch, so an old time)
#    from a backlogged one: so thread i also stores, in slot 2n + i, when it goes to sleep in
#    epoll_wait after a round whose every batch emptied its queue ("slept", engine_sleep_time).

from cpython.ref cimport PyObject
from libc.errno cimport EEXIST

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_setname_np(pthread_t thread, const char *name)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    const int EPOLLIN
    const int EPOLL_CTL_ADD
    const int EPOLL_CTL_DEL
    const int EPOLL_CTL_MOD
    const int EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    const int EFD_NONBLOCK
    const int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<sched.h>" nogil:
    int sched_yield()
    ctypedef struct cpu_set_t:
        pass
    const int CPU_SETSIZE
    void CPU_ZERO(cpu_set_t *s)
    void CPU_SET(int cpu, cpu_set_t *s)
    int CPU_ISSET(int cpu, cpu_set_t *s)

cdef extern from "<pthread.h>" nogil:
    int pthread_setaffinity_np(pthread_t thread, size_t size, const cpu_set_t *s)
    int pthread_getaffinity_np(pthread_t thread, size_t size, cpu_set_t *s)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    long sysconf(int name)
    const int _SC_NPROCESSORS_ONLN


def online_cpus() -> int:
    return max(1, <int>sysconf(_SC_NPROCESSORS_ONLN))

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec_t "timespec":
        time_t tv_sec
        long tv_nsec
    const int CLOCK_MONOTONIC
    const int CLOCK_REALTIME
    int clock_gettime(int clk, timespec_t *ts)

cdef extern from *:
    """
    #define ENGINE_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define ENGINE_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #define ENGINE_LOAD_DRAINS(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define ENGINE_STORE_DRAINS(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #define ENGINE_STORE_TIME(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
    """
    int ENGINE_LOAD(int *p) nogil
    void ENGINE_STORE(int *p, int v) nogil
    int64_t *ENGINE_LOAD_DRAINS(int64_t **p) nogil
    void ENGINE_STORE_DRAINS(int64_t **p, int64_t *v) nogil
    void ENGINE_STORE_TIME(int64_t *p, int64_t v) nogil

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    const int PROT_READ
    const int PROT_WRITE
    const int MAP_SHARED
    void *MAP_FAILED

cdef enum:
    RUN_C = 0
    PAUSE_C = 1
    STOP_C = 2
    EV_DEVICE_C = 1
    EV_SOCKET_C = 2
    EV_WAKE_C = 3
    ENGINE_EVENTS_C = 4
    ENGINE_MAX_THREADS_C = 64

ENGINE_MAX_THREADS = ENGINE_MAX_THREADS_C


ctypedef struct engine_thread_t:
    PyObject *fwd              # borrowed: the NativeEngine holds the reference
    const fwd_tables_t *tables # the forwarder's generation, re-read by resume() after a swap
    bint switched              # VxlanSwitchForwarder: set its clock before each batch
    bint wg                    # WireguardForwarder: its clock, and its events to notify_fd
    uint64_t events_seen       # the forwarder's ev_tail when notify_fd was last written
    int notify_fd              # the engine's: "some thread queued control-plane events"
    int index
    int dev_fd
    int sock_fd
    int epfd
    int wake_fd
    pthread_t tid
    bint started
    int request                # RUN_C / PAUSE_C / STOP_C (atomic)
    int paused                 # under lock
    int dev_attached           # under lock (changed only while paused, or by the thread)
    int dev_error              # errno of the read that took the device out (atomic), 0: none
    int sock_error             # errno of the last failed receive (atomic)
    int64_t busy_poll_ns
    int64_t *drains            # NULL, or this thread's two drain-time slots (item 11; atomic)
    int64_t *slept             # NULL, or this thread's sleep-time slot (item 11; atomic)
    bint undrained             # a batch of this round filled its batch: the queue may hold more
    uint64_t wakeups           # epoll_wait returns with at least one event
    uint64_t inside_batches    # batches that moved at least one packet
    uint64_t outside_batches
    uint64_t polls             # busy-poll rounds (each one read attempt per fd)
    uint64_t poll_hits         # ... that found packets
    uint64_t sock_errors
    uint64_t deadline_wakeups  # epoll_wait returns at the clock step's deadline, no event
    uint64_t pauses            # pause() requests acknowledged (a control call ran meanwhile)
    int64_t step_max_ns        # the longest clock step that had work due (ageing, expiry)
    pthread_mutex_t lock
    pthread_cond_t cond


cdef inline int64_t mono_ns() noexcept nogil:
    cdef timespec_t ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline double clock_seconds(int clk) noexcept nogil:
    cdef timespec_t ts
    clock_gettime(clk, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline void engine_clock(engine_thread_t *th) noexcept nogil:
    cdef double now
    cdef int64_t began
    if not (th.switched or th.wg):
        return
    now = clock_seconds(CLOCK_MONOTONIC)
    if now < engine_due(th):
        engine_set_clock(th, now)
        return
    # work is due (an ageing pass, keypairs to zero): the time it holds the thread is the
    # stall it costs the data plane, kept as the longest seen (two clock reads, only then)
    began = mono_ns()
    engine_set_clock(th, now)
    th.step_max_ns = max(th.step_max_ns, mono_ns() - began)


cdef inline void engine_set_clock(engine_thread_t *th, double now) noexcept nogil:
    if th.switched:
        # its clock step also ages the MAC table when a pass is due: no pause needed for it
        (<VxlanSwitchForwarder>th.fwd)._clock(now)
    else:
        # its clock step also zeroes keypairs 3 x REJECT_AFTER_TIME old: no pause needed for it
        (<WireguardForwarder>th.fwd)._clock(now)


cdef inline double engine_due(engine_thread_t *th) noexcept nogil:
    """When the forwarder's clock step next has work (>= WG_FOREVER: never)."""
    cdef double due
    if th.wg:
        return (<WireguardForwarder>th.fwd).expiry_due
    if th.switched:
        due = (<VxlanSwitchForwarder>th.fwd)._age_due()
        return WG_FOREVER if due >= AGE_NEVER else due
    return WG_FOREVER


cdef inline int engine_wait_ms(engine_thread_t *th) noexcept nogil:
    """How long epoll_wait may sleep: for ever, or until the forwarder's clock step has work
    due - the next keypair to zero (wireguard), the next ageing pass (switched) - so that an
    idle thread still does it on time."""
    cdef double due = engine_due(th), left
    if due >= WG_FOREVER:
        return -1
    left = due - clock_seconds(CLOCK_MONOTONIC)
    if left <= 0:
        return 0
    return <int>min(left * 1000.0 + 1.0, 3600e3)    # +1 ms: wake just after, never just before


cdef inline void engine_notify(engine_thread_t *th) noexcept nogil:
    """After a batch: wake the runtime if the batch queued events (once per batch at most)."""
    cdef uint64_t queued
    cdef uint64_t one = 1
    if not th.wg:
        return
    queued = (<WireguardForwarder>th.fwd).ev_tail      # the thread's own: events ever queued
    if queued > th.events_seen:
        write(th.notify_fd, &one, sizeof(one))
    th.events_seen = queued


cdef inline int64_t engine_batch_start(engine_thread_t *th) noexcept nogil:
    return mono_ns() if ENGINE_LOAD_DRAINS(&th.drains) != NULL else 0


cdef inline void engine_report_drain(engine_thread_t *th, int slot, int64_t start, int n,
                                     int err) noexcept nogil:
    """A batch that read fewer than it could emptied its queue: every packet queued before it
    began has been read (item 11)."""
    cdef int64_t *drains = ENGINE_LOAD_DRAINS(&th.drains)
    if drains == NULL:
        return
    if not err and n < (<_ForwarderBase>th.fwd).batch_size:
        ENGINE_STORE_TIME(&drains[slot], start)
    else:
        th.undrained = True


cdef inline void engine_sleep_time(engine_thread_t *th) noexcept nogil:
    """Before epoll_wait: when every batch of the round emptied its queue, the thread is about
    to sleep with nothing to read - idle, not backlogged, however old its drain times (item 11).
    A packet that came after those batches only makes epoll_wait return at once."""
    cdef int64_t *slept = ENGINE_LOAD_DRAINS(&th.slept)
    if slept != NULL and not th.undrained:
        ENGINE_STORE_TIME(slept, mono_ns())
    th.undrained = False


cdef int engine_inside(engine_thread_t *th) noexcept nogil:
    """One device batch of this thread's forwarder; the packets it read."""
    cdef int err = 0, n
    cdef epoll_event ev
    cdef int64_t start
    engine_clock(th)
    if (<_ForwarderBase>th.fwd).capture_on:
        (<_ForwarderBase>th.fwd).cap_time = clock_seconds(CLOCK_REALTIME)
    start = engine_batch_start(th)
    n = (<_ForwarderBase>th.fwd)._inside_run(th.tables, &err)
    engine_report_drain(th, 0, start, n, err)
    engine_notify(th)
    if err:
        # The device is gone or failing: stop polling it (level-triggered, it would spin) and
        # let the runtime recreate it.
        pthread_mutex_lock(&th.lock)
        if th.dev_attached:
            epoll_ctl(th.epfd, EPOLL_CTL_DEL, th.dev_fd, &ev)
            th.dev_attached = False
        pthread_mutex_unlock(&th.lock)
        ENGINE_STORE(&th.dev_error, err)
    if n:
        th.inside_batches += 1
    return n


cdef int engine_outside(engine_thread_t *th) noexcept nogil:
    cdef int err = 0, n
    cdef int64_t start
    engine_clock(th)
    if (<_ForwarderBase>th.fwd).capture_on:
        (<_ForwarderBase>th.fwd).cap_time = clock_seconds(CLOCK_REALTIME)
    start = engine_batch_start(th)
    n = (<_ForwarderBase>th.fwd)._outside_run(th.tables, &err)
    engine_report_drain(th, 1, start, n, err)
    engine_notify(th)
    if err:
        th.sock_errors += 1
        ENGINE_STORE(&th.sock_error, err)
    if n:
        th.outside_batches += 1
    return n


cdef void engine_busy_poll(engine_thread_t *th) noexcept nogil:
    """Keep taking batches until busy_poll_ns pass without a packet (or a pause/stop)."""
    cdef int64_t deadline = mono_ns() + th.busy_poll_ns
    cdef int got
    while ENGINE_LOAD(&th.request) == RUN_C:
        th.undrained = False        # (the round that ends the poll empties both queues)
        got = engine_outside(th)
        if th.dev_attached:
            got += engine_inside(th)
        th.polls += 1
        if got:
            th.poll_hits += 1
            deadline = mono_ns() + th.busy_poll_ns
        elif mono_ns() >= deadline:
            return
        else:
            sched_yield()


cdef void *engine_main(void *arg) noexcept nogil:
    cdef engine_thread_t *th = <engine_thread_t *>arg
    cdef epoll_event events[ENGINE_EVENTS_C]
    cdef int n, i, worked
    cdef uint64_t drain
    while True:
        if ENGINE_LOAD(&th.request) != RUN_C:
            pthread_mutex_lock(&th.lock)
            if th.request == STOP_C:
                pthread_mutex_unlock(&th.lock)
                break
            th.paused = True
            th.pauses += 1
            pthread_cond_broadcast(&th.cond)
            while th.request == PAUSE_C:
                pthread_cond_wait(&th.cond, &th.lock)
            th.paused = False
            pthread_mutex_unlock(&th.lock)
            continue
        engine_sleep_time(th)
        n = epoll_wait(th.epfd, events, ENGINE_EVENTS_C, engine_wait_ms(th))
        if n == 0:
            th.deadline_wakeups += 1
            engine_clock(th)    # the deadline came without a packet: the clock step alone
            continue
        if n < 0:
            continue            # EINTR
        th.wakeups += 1
        worked = 0
        for i in range(n):
            if events[i].data.u32 == EV_WAKE_C:
                read(th.wake_fd, &drain, sizeof(drain))
            elif events[i].data.u32 == EV_SOCKET_C:
                worked += engine_outside(th)
            elif th.dev_attached:
                worked += engine_inside(th)
        if worked and th.busy_poll_ns > 0:
            engine_busy_poll(th)
    return NULL


cdef class NativeEngine:
    """Data-plane threads over forwarders, one thread per (forwarder, device fd, socket fd).

    Call everything from one control thread (the event loop's). Between pause(i) and resume(i)
    thread i runs no batch, so forwarder i's own methods may be called.
    """

    cdef engine_thread_t *threads
    cdef int n
    cdef list forwarders
    cdef bint running
    cdef int notify
    cdef void *drains_map      # the mapped drain-time array (item 11), or NULL
    cdef size_t drains_len

    def __cinit__(self, forwarders, dev_fds, sock_fds, busy_poll_us=0):
        cdef int i
        cdef engine_thread_t *th
        cdef epoll_event ev
        self.threads = NULL
        self.n = 0
        self.running = False
        self.notify = -1
        self.drains_map = NULL
        self.drains_len = 0
        self.forwarders = list(forwarders)
        devs = [operator_index(fd) for fd in dev_fds]
        socks = [operator_index(fd) for fd in sock_fds]
        busy_poll_us = operator_index(busy_poll_us)
        count = len(self.forwarders)
        if not 1 <= count <= ENGINE_MAX_THREADS_C:
            raise ValueError(f"1..{ENGINE_MAX_THREADS_C} forwarders, got {count}")
        if len(devs) != count or len(socks) != count:
            raise ValueError("one device fd and one socket fd per forwarder")
        if not 0 <= busy_poll_us <= 1_000_000:
            raise ValueError(f"busy_poll_us must be 0..1000000, got {busy_poll_us}")
        for f in self.forwarders:
            if not isinstance(f, _ForwarderBase):
                raise TypeError(f"{type(f).__name__} is not a compiled forwarder")
        self.threads = <engine_thread_t *>calloc(count, sizeof(engine_thread_t))
        if self.threads == NULL:
            raise MemoryError()
        self.notify = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.notify < 0:
            raise OSError(errno, strerror(errno))
        for i in range(count):
            th = &self.threads[i]
            th.epfd = -1
            th.wake_fd = -1
        self.n = count
        for i in range(count):
            th = &self.threads[i]
            th.fwd = <PyObject *>self.forwarders[i]
            th.switched = isinstance(self.forwarders[i], VxlanSwitchForwarder)
            th.wg = isinstance(self.forwarders[i], WireguardForwarder)
            th.notify_fd = self.notify
            th.index = i
            th.dev_fd = devs[i]
            th.sock_fd = socks[i]
            th.busy_poll_ns = <int64_t>busy_poll_us * 1000
            pthread_mutex_init(&th.lock, NULL)
            pthread_cond_init(&th.cond, NULL)
            th.epfd = epoll_create1(EPOLL_CLOEXEC)
            th.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if th.epfd < 0 or th.wake_fd < 0:
                raise OSError(errno, strerror(errno))
            for fd, tag in ((th.wake_fd, EV_WAKE_C), (th.sock_fd, EV_SOCKET_C),
                            (th.dev_fd, EV_DEVICE_C)):
                ev.events = EPOLLIN
                ev.data.u64 = 0
                ev.data.u32 = tag
                if epoll_ctl(th.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                    raise OSError(errno, f"epoll_ctl fd {fd}: {strerror(errno)}")
            th.dev_attached = True

    def __dealloc__(self):
        cdef int i
        if self.threads == NULL:
            return
        self._stop_all()
        for i in range(self.n):
            if self.threads[i].epfd >= 0:
                close(self.threads[i].epfd)
            if self.threads[i].wake_fd >= 0:
                close(self.threads[i].wake_fd)
            pthread_mutex_destroy(&self.threads[i].lock)
            pthread_cond_destroy(&self.threads[i].cond)
        free(self.threads)
        if self.notify >= 0:
            close(self.notify)
        if self.drains_map != NULL:     # after _stop_all: no thread stores into it any more
            munmap(self.drains_map, self.drains_len)

    @property
    def count(self) -> int:
        return self.n

    @property
    def notify_fd(self) -> int:
        """Readable (an eventfd counter) once some thread's forwarder queued events; the
        reader reads it to re-arm, then drains each forwarder with its thread paused."""
        return self.notify

    def start(self) -> None:
        cdef int i, rc
        cdef engine_thread_t *th
        cdef bytes name
        if self.running:
            raise RuntimeError("the engine is already running")
        for i in range(self.n):
            th = &self.threads[i]
            th.request = RUN_C
            th.tables = &(<_ForwarderBase>self.forwarders[i]).gen.t
            rc = pthread_create(&th.tid, NULL, engine_main, th)
            if rc != 0:
                self._stop_all()
                raise OSError(rc, f"pthread_create: {strerror(rc)}")
            th.started = True
            # While its thread runs, the forwarder refuses every call that would run a batch
            # or touch batch state from Python (its "a batch is already running" check).
            (<_ForwarderBase>self.forwarders[i]).busy = True
            name = f"overlayd-dp{i}".encode()[:15]
            pthread_setname_np(th.tid, name)
        self.running = True

    cdef void _notify(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.notify, &one, sizeof(one))

    cdef void _wake(self, engine_thread_t *th) noexcept nogil:
        cdef uint64_t one = 1
        write(th.wake_fd, &one, sizeof(one))

    def pause(self, int i) -> None:
        """Return once thread i has finished its batch and waits (a no-op when not running)."""
        cdef engine_thread_t *th = self._thread(i)
        if not th.started:
            return
        with nogil:
            pthread_mutex_lock(&th.lock)
            ENGINE_STORE(&th.request, PAUSE_C)
            self._wake(th)
            while not th.paused:
                pthread_cond_wait(&th.cond, &th.lock)
            pthread_mutex_unlock(&th.lock)
        (<_ForwarderBase>self.forwarders[i]).busy = False

    def resume(self, int i) -> None:
        cdef engine_thread_t *th = self._thread(i)
        if not th.started:
            return
        # The only place a thread's generation changes: while it is paused, after set_tables.
        th.tables = &(<_ForwarderBase>self.forwarders[i]).gen.t
        if th.wg:
            # Events queued while paused (a control call's seal may ask for a rekey) or left
            # undrained: signal them now, as no batch might come to do it.
            th.events_seen = (<WireguardForwarder>self.forwarders[i]).ev_tail
            if (<WireguardForwarder>self.forwarders[i]).queued_events:
                self._notify()
        (<_ForwarderBase>self.forwarders[i]).busy = True
        pthread_mutex_lock(&th.lock)
        ENGINE_STORE(&th.request, RUN_C)
        pthread_cond_broadcast(&th.cond)
        pthread_mutex_unlock(&th.lock)

    def stop(self) -> None:
        """End and join every thread (idempotent)."""
        self._stop_all()

    cdef void _stop_all(self) noexcept:
        cdef int i
        cdef engine_thread_t *th
        for i in range(self.n):
            th = &self.threads[i]
            if not th.started:
                continue
            with nogil:
                pthread_mutex_lock(&th.lock)
                ENGINE_STORE(&th.request, STOP_C)
                pthread_cond_broadcast(&th.cond)
                pthread_mutex_unlock(&th.lock)
                self._wake(th)
                pthread_join(th.tid, NULL)
            th.started = False
            (<_ForwarderBase>self.forwarders[i]).busy = False
        self.running = False

    cdef engine_thread_t *_thread(self, int i) except NULL:
        if not 0 <= i < self.n:
            raise IndexError(f"thread {i} of {self.n}")
        return &self.threads[i]

    def pin(self, int i, cpus) -> None:
        """Let thread i run only on ``cpus`` (CPU numbers); OSError if the kernel refuses
        (a CPU outside the process's cpuset, offline, or out of cpu_set_t's range)."""
        cdef engine_thread_t *th = self._thread(i)
        cdef cpu_set_t mask
        cdef int rc, cpu
        if not th.started:
            raise RuntimeError(f"thread {i} is not running")
        CPU_ZERO(&mask)
        wanted = [operator_index(c) for c in cpus]
        if not wanted:
            raise ValueError("an empty CPU set")
        for cpu in wanted:
            if not 0 <= cpu < CPU_SETSIZE:
                raise OSError(EINVAL, f"CPU {cpu} is beyond cpu_set_t ({CPU_SETSIZE} CPUs)")
            CPU_SET(cpu, &mask)
        rc = pthread_setaffinity_np(th.tid, sizeof(cpu_set_t), &mask)
        if rc != 0:
            raise OSError(rc, f"pthread_setaffinity_np(thread {i}, CPUs {wanted}): "
                              f"{strerror(rc)}")

    def report_drains(self, int map_fd, size_t length) -> None:
        """Map ``length`` bytes of the BPF array ``map_fd`` (BPF_F_MMAPABLE, 3 x count int64
        slots) and have each thread store its drain and sleep times there (item 11). Once only: the
        mapping stays until the engine is freed (a thread may be storing into it)."""
        cdef void *base
        cdef int i
        if self.drains_map != NULL:
            raise RuntimeError("the engine already reports its drains")
        if length < <size_t>self.n * 3 * sizeof(int64_t):
            raise ValueError(f"{length} bytes of drain slots for {self.n} threads")
        base = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0)
        if base == MAP_FAILED:
            err = errno
            raise OSError(err, f"mmap of the steering programs' drain map: {strerror(err)}")
        self.drains_map, self.drains_len = base, length
        for i in range(self.n):
            ENGINE_STORE_DRAINS(&self.threads[i].drains, <int64_t *>base + 2 * i)
            ENGINE_STORE_DRAINS(&self.threads[i].slept, <int64_t *>base + 2 * self.n + i)

    def stop_drain_reports(self) -> None:
        """The threads store no more drain times (the mapping itself stays, see above)."""
        cdef int i
        for i in range(self.n):
            ENGINE_STORE_DRAINS(&self.threads[i].drains, NULL)
            ENGINE_STORE_DRAINS(&self.threads[i].slept, NULL)

    def affinity(self, int i) -> list:
        """The CPUs thread i may run on, as the kernel has them ([] when it is not running)."""
        cdef engine_thread_t *th = self._thread(i)
        cdef cpu_set_t mask
        cdef int cpu
        if not th.started or pthread_getaffinity_np(th.tid, sizeof(cpu_set_t), &mask) != 0:
            return []
        return [cpu for cpu in range(CPU_SETSIZE) if CPU_ISSET(cpu, &mask)]

    def device_error(self) -> int:
        """errno of a device read that took some thread's device fd out, or 0."""
        cdef int i, e
        for i in range(self.n):
            e = ENGINE_LOAD(&self.threads[i].dev_error)
            if e:
                return e
        return 0

    def detach_device(self) -> None:
        """Stop every thread polling its device fd (the device is being recreated)."""
        cdef int i
        cdef epoll_event ev
        for i in range(self.n):
            self.pause(i)
            if self.threads[i].dev_attached:
                epoll_ctl(self.threads[i].epfd, EPOLL_CTL_DEL, self.threads[i].dev_fd, &ev)
                self.threads[i].dev_attached = False
            self.resume(i)

    def attach_device(self) -> None:
        """Poll the device fds again (after the device was recreated on the same numbers)."""
        cdef int i, rc, err
        cdef epoll_event ev
        cdef engine_thread_t *th
        for i in range(self.n):
            self.pause(i)
            th = &self.threads[i]
            if th.dev_attached:
                # the old registration went with the file dup2 replaced; a stale one goes too
                epoll_ctl(th.epfd, EPOLL_CTL_DEL, th.dev_fd, &ev)
            ev.events = EPOLLIN
            ev.data.u64 = 0
            ev.data.u32 = EV_DEVICE_C
            rc = epoll_ctl(th.epfd, EPOLL_CTL_ADD, th.dev_fd, &ev)
            if rc < 0 and errno == EEXIST:
                # the same file is back on the fd (its registration outlived the other file)
                rc = epoll_ctl(th.epfd, EPOLL_CTL_MOD, th.dev_fd, &ev)
            err = errno
            th.dev_attached = rc == 0
            ENGINE_STORE(&th.dev_error, 0)
            self.resume(i)
            if rc < 0:
                raise OSError(err, f"epoll_ctl device fd {th.dev_fd}: {strerror(err)}")

    def take_socket_error(self) -> int:
        """errno of the last failed receive on any thread since the last call, or 0."""
        cdef int i, e, got = 0
        for i in range(self.n):
            e = ENGINE_LOAD(&self.threads[i].sock_error)
            if e:
                ENGINE_STORE(&self.threads[i].sock_error, 0)
                got = e
        return got

    def thread_stats(self) -> list:
        """Per thread: wakeups (epoll returns with events: packets, or a pause's wake), deadline
        wake-ups (the clock step's, no event), pauses, the longest clock step that had work
        (an ageing pass, a keypair expiry: how long it held the thread), inside/outside
        batches, busy-poll rounds and hits, receive errors (each written by its thread only:
        read without stopping it)."""
        cdef int i
        cdef engine_thread_t *th
        out = []
        for i in range(self.n):
            th = &self.threads[i]
            out.append({"wakeups": th.wakeups, "deadline_wakeups": th.deadline_wakeups,
                        "pauses": th.pauses, "clock_step_max_us": th.step_max_ns / 1000.0,
                        "inside_batches": th.inside_batches,
                        "outside_batches": th.outside_batches, "busy_polls": th.polls,
                        "busy_poll_hits": th.poll_hits, "socket_errors": th.sock_errors,
                        "device_attached": bool(th.dev_attached), "running": bool(th.started)})
        return out
