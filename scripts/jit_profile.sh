#!/usr/bin/env bash
# Where a CPU driver's JIT-compiled kernels spend their time, per instruction.
# lavapipe/llvmpipe compile WGSL to anonymous executable memory that profilers
# cannot symbolise; this samples the running program with `perf record`
# (cpu-clock: works without hardware counters), dumps the hottest pages of that
# memory with gdb and disassembles them with objdump, each instruction annotated
# with its share of the samples. Needs linux-perf, gdb and binutils.
#
#   cargo build --release --example gemm_loop
#   scripts/jit_profile.sh ./target/release/examples/gemm_loop 300
#   sort -rn /tmp/jit_profile/annotated.txt | head    # hottest instructions
#
# PROF_WAIT (s, default 8): start-up to skip (compiling); PROF_SECS: sampling time.
set -euo pipefail
out=/tmp/jit_profile
mkdir -p $out
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
"$@" > $out/program.txt 2>&1 &
pid=$!
sleep "${PROF_WAIT:-8}"
timeout "${PROF_SECS:-10}" perf record -e cpu-clock -F 1000 -p $pid -o $out/perf.data > /dev/null 2>&1 || true
perf report -i $out/perf.data --sort sym 2> /dev/null | grep -v '^#' | grep -v '^$' > $out/symbols.txt
# The span of JIT pages holding more than 0.3% of the samples each.
read -r start end < <(python3 - "$out" <<'PY'
import re, sys, collections
pages = collections.Counter()
for line in open(sys.argv[1] + "/symbols.txt"):
    m = re.search(r"([\d.]+)%\s+\[\.\]\s+0x([0-9a-f]+)", line)
    if m:
        pages[int(m.group(2), 16) >> 12] += float(m.group(1))
hot = [p for p, v in pages.items() if v > 0.3]
print(hex(min(hot) << 12), hex((max(hot) + 1) << 12))
PY
)
gdb -p $pid -batch -ex "dump binary memory $out/jit.bin $start $end" > /dev/null 2>&1
kill $pid 2> /dev/null || true
objdump -D -b binary -m i386:x86-64 --adjust-vma="$start" $out/jit.bin > $out/jit.asm
python3 - "$out" <<'PY'
import re, sys, collections
out = sys.argv[1]
share = {}
for line in open(out + "/symbols.txt"):
    m = re.search(r"([\d.]+)%\s+\[\.\]\s+0x([0-9a-f]+)", line)
    if m:
        share[int(m.group(2), 16)] = float(m.group(1))
per_op, rows = collections.Counter(), []
for line in open(out + "/jit.asm"):
    m = re.match(r"\s*([0-9a-f]+):\t[^\t]*\t(\S+)", line)
    if m:
        s = share.get(int(m.group(1), 16), 0.0)
        per_op[m.group(2)] += s
        rows.append(f"{s:5.2f} {line.rstrip()}")
open(out + "/annotated.txt", "w").write("\n".join(rows) + "\n")
print(f"{sum(per_op.values()):.1f}% of the samples fall in the dumped span; by instruction:")
for op, s in per_op.most_common(15):
    print(f"  {op:12s} {s:5.1f}%")
PY
