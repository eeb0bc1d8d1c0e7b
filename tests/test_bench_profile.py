"""The profiler's bookkeeping: perf call chains to (direction, category), metrics to wake-ups."""

from overlayd.bench import profile

DP = "/w/overlayd/_dataplane.cpython-311-x86_64-linux-gnu.so"
LOOP = [("PyObject_Vectorcall", "/lib/libpython3.11.so.1.0"),
        ("uv__io_poll", "/site-packages/uvloop/loop.so")]


def chain(*frames: tuple[str, str]) -> str:
    return "\n".join(f"\t{0x1000 + i:x} {sym} ({dso})" for i, (sym, dso) in enumerate(frames))


def test_a_read_on_the_inside_path_is_that_syscall() -> None:
    text = chain(("tun_do_read", "[kernel.kallsyms]"), ("ksys_read", "[kernel.kallsyms]"),
                 ("do_syscall_64", "[kernel.kallsyms]"),
                 ("__GI___libc_read", "inlined"),
                 ("__pyx_f_8overlayd_10_dataplane_14_ForwarderBase__inside_run", DP), *LOOP)
    assert profile.parse_perf_script(text) == {("inside", "syscall read"): 1}


def test_inlined_checksum_is_told_apart_by_its_caller() -> None:
    tso = chain(("__pyx_f_8overlayd_10_dataplane_csum_partial", "inlined"),
                ("__pyx_f_8overlayd_10_dataplane_tso_write", DP),
                ("__pyx_f_8overlayd_10_dataplane_14_ForwarderBase__inside_run", DP), *LOOP)
    gro = chain(("__pyx_f_8overlayd_10_dataplane_csum_partial", "inlined"),
                ("__pyx_f_8overlayd_10_dataplane_gro_payload", "inlined"),
                ("__pyx_f_8overlayd_10_dataplane_gro_add", DP),
                ("__pyx_f_8overlayd_10_dataplane_14_ForwarderBase__outside_run", DP), *LOOP)
    copy = chain(("__memmove_avx_unaligned_erms", "/lib/libc.so.6"),
                 ("__pyx_f_8overlayd_10_dataplane_tso_write", DP),
                 ("__pyx_f_8overlayd_10_dataplane_14_ForwarderBase__inside_run", DP), *LOOP)
    samples = profile.parse_perf_script("\n\n".join([tso, gro, copy, chain(*LOOP)]))
    assert samples == {
        ("inside", "checksum: TCP/UDP/IP of each segment (tso/uso_write)"): 1,
        ("outside", "checksum: TCP/UDP check before coalescing"): 1,
        ("inside", "copy: segmentation (superpacket -> segments)"): 1,
        ("loop", "Python / uvloop"): 1,
    }


def test_wakeups_are_the_batches_counted_between_two_scrapes() -> None:
    key = 'overlayd_batch_size_packets_bucket{direction="inside",le="%s"}'
    before = {key % "1.0": 10, key % "2.0": 10, key % "+Inf": 15}
    after = {key % "1.0": 40, key % "2.0": 45, key % "+Inf": 60,
             "overlayd_forwarded_packets_total": 500}
    wakeups, hist = profile.batch_deltas(before, after)
    assert wakeups == {"inside": 45}
    assert hist == {"inside": {"1.0": 30, "2.0": 5, "+Inf": 10}}
    assert profile.counter_deltas({}, after)["forwarded_packets"] == 500


def test_syscall_counts_come_from_perf_stat_csv() -> None:
    text = ("# started\n\n1234,,syscalls:sys_enter_read,4000,100.00,,\n"
            "0,,syscalls:sys_enter_write,4000,100.00,,\n"
            "<not counted>,,syscalls:sys_enter_sendto,0,0,,\n")
    assert profile.parse_syscalls(text) == {"read": 1234}
