"""``python3 -m overlayd.fuzz.sanitizers``: the compiled kernels under AddressSanitizer and
UBSan, fuzzed and unit-tested.

    python3 -m overlayd.fuzz.sanitizers                     # build, fuzz 20 s per target, tests
    python3 -m overlayd.fuzz.sanitizers --fuzz-seconds 300 --keep /var/tmp/overlayd-asan

Why it is built this way:

1. The tree is copied (git's tracked and untracked-but-not-ignored files) to a directory of its
   own and the extension built there, so the sanitizer build never replaces the normal one.
2. clang-14 with ``-fsanitize=address,undefined,fuzzer-no-link``: ASan and UBSan checks, and
   libFuzzer's coverage counters in the compiled kernels. Python itself is not instrumented, so
   the runtime is preloaded (LD_PRELOAD) and ``PYTHONMALLOC=malloc`` sends every Python
   allocation through ASan's malloc, so a read past a packet buffer is caught wherever it lives.
3. The preloaded runtime is ASan and libFuzzer merged into one shared object (made here from
   clang-14's static runtimes, without ASan's preinit object, which a DSO cannot hold). Preloading
   ASan alone would answer the extension's ``__sanitizer_cov_*`` registration with its own
   no-op, and atheris would see no native coverage (the same happens with gcc's libasan). With
   libFuzzer in the preloaded object, atheris finds ``LLVMFuzzerRunDriver`` there, uses its
   core without a libFuzzer of its own, and that libFuzzer receives the extension's counters.
4. ``-fno-sanitize=pointer-overflow``: Cython's generated argument parsing computes
   ``&args[nargs]`` with args NULL and nargs 0 (in every ``__cinit__`` without arguments),
   which UBSan reports as "applying zero offset to null pointer" before any packet is seen.
   Every other UBSan check stays on, and is fatal (``-fno-sanitize-recover``).
5. ``detect_leaks=0``: CPython does not free everything at exit; ASan's leak report would
   be about the interpreter, not the kernels.

Exit status: 0 when the fuzz pass and the tests passed and no sanitizer reported anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

CLANG: Final = "clang-14"
RUNTIME_DIR: Final = Path("/usr/lib/llvm-14/lib/clang/14.0.6/lib/linux")
SANITIZE: Final = "-fsanitize=address,undefined,fuzzer-no-link"
CFLAGS: Final = (f"{SANITIZE} -fno-sanitize=pointer-overflow -fno-sanitize-recover=undefined "
                 "-fno-omit-frame-pointer -g -O1")
REPO: Final = Path(__file__).resolve().parents[2]
# The tests that drive the compiled kernels in-process (no namespaces, no daemons).
UNIT_TESTS: Final = ("tests/test_wire.py", "tests/test_route_table.py",
                     "tests/test_forwarder.py", "tests/test_offload.py",
                     "tests/test_vxlan_routed_forwarder.py", "tests/test_vxlan_switch_forwarder.py",
                     "tests/test_fuzz_regressions.py")
REPORTS: Final = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: libFuzzer")


def copy_tree(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / os.fsdecode(name)
        if source.is_file() and source.suffix != ".so":
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def merged_runtime(directory: Path) -> Path:
    """ASan (with its UBSan handlers) and libFuzzer in one shared object to preload."""
    out = directory / "asan_with_fuzzer.so"
    asan = directory / "libasan-no-preinit.a"
    shutil.copy(RUNTIME_DIR / "libclang_rt.asan-x86_64.a", asan)
    subprocess.run(["ar", "d", str(asan), "asan_preinit.cpp.o"], check=True)
    subprocess.run([CLANG, "-shared", "-o", str(out), "-Wl,--whole-archive", str(asan),
                    str(RUNTIME_DIR / "libclang_rt.asan_cxx-x86_64.a"),
                    str(RUNTIME_DIR / "libclang_rt.fuzzer_no_main-x86_64.a"),
                    "-Wl,--no-whole-archive", "-lpthread", "-ldl", "-lrt", "-lm", "-lstdc++"],
                   check=True)
    return out


def build_extension(tree: Path) -> None:
    env = dict(os.environ, CC=CLANG, LDSHARED=f"{CLANG} -shared", CFLAGS=CFLAGS,
               LDFLAGS=SANITIZE)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    built = list((tree / "overlayd").glob("_dataplane*.so"))
    symbols = subprocess.run(["nm", "-D", str(built[0])], check=True, capture_output=True,
                             text=True).stdout
    for needed in ("__asan_report_load", "__ubsan_handle", "__sanitizer_cov_8bit_counters_init"):
        if needed not in symbols:
            raise SystemExit(f"{built[0]} is not instrumented: no {needed}")


def sanitizer_env(runtime: Path) -> dict[str, str]:
    return dict(os.environ, LD_PRELOAD=str(runtime), PYTHONMALLOC="malloc",
                OVERLAYD_DATAPLANE="cython",
                ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1",
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


def run_step(title: str, cmd: list[str], tree: Path, env: dict[str, str],
             timeout: float) -> bool:
    print(f"== {title}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = str(exc.stdout or ""), -1
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    # The fuzz runner's summaries in full (without the libFuzzer logs it quotes, "  | ..."),
    # and the end of anything else.
    lines = [line for line in output.splitlines() if not line.startswith("  | ")]
    print("\n".join(lines[-120:]), flush=True)
    if reports:
        print("sanitizer reports:\n  " + "\n  ".join(reports[:20]), flush=True)
    ok = code == 0 and not reports
    print(f"== {title}: {'passed' if ok else f'FAILED (exit {code})'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.fuzz.sanitizers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-seconds", type=float, default=20.0, help="per target")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temp dir)")
    parser.add_argument("--no-fuzz", action="store_true")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("tests", nargs="*", default=list(UNIT_TESTS))
    args = parser.parse_args(argv)
    if shutil.which(CLANG) is None or not RUNTIME_DIR.is_dir():
        print(f"needs {CLANG} and libclang-rt-14-dev ({RUNTIME_DIR})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="overlayd-asan-") as tmp:
        tree = args.keep or Path(tmp)
        tree.mkdir(parents=True, exist_ok=True)
        print(f"== copying the tree to {tree} and building with {CLANG} {CFLAGS}", flush=True)
        copy_tree(tree)
        runtime = merged_runtime(tree)
        build_extension(tree)
        env = sanitizer_env(runtime)
        ok = True
        if not args.no_fuzz:
            ok &= run_step("fuzz pass under ASan+UBSan",
                           [sys.executable, "-m", "overlayd.fuzz", "--engine", args.engine,
                            "--seconds", str(args.fuzz_seconds), "--crashes",
                            str(tree / "fuzz-crashes")], tree, env,
                           timeout=args.fuzz_seconds * 8 + 600)
        if not args.no_tests:
            ok &= run_step("unit tests under ASan+UBSan",
                           [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *args.tests], tree, env, timeout=1800)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
