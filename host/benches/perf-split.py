#!/usr/bin/env python3
"""Compares two servers of one interleaved transport-bench run, from one
`perf` recording: each sample is counted for the server that was loaded when
it was taken, so both servers are profiled under the same machine conditions.

    B=$PWD/target/release/deps/transport-…   # from `cargo bench -p cordon --bench transport --no-run`
    (cd host && perf record -k CLOCK_MONOTONIC -F 999 --call-graph dwarf,16384 -o /tmp/perf.data \\
        -- $B --bench -- throughput side=wasm-null,native-null clients=16 marks 2>/tmp/marks.txt)
    perf script --no-inline -F comm,tid,time,ip,sym,dso -i /tmp/perf.data > /tmp/samples.txt
    python3 host/benches/perf-split.py /tmp/samples.txt /tmp/marks.txt 0 1 CPU0 CPU1 [PATTERN…]

Servers are numbered in the order the run interleaves them (for `side=`, the
order given). CPU0 and CPU1 are the "server CPU µs/call" the run printed for
them: every figure is scaled to µs per call with them. Only the server side's
threads are counted (`bench-server*`, `cordon-*`). Prints the sandbox's own
share (frames of `Runtime::call`, the idle hooks, wasmtime, fibers), the
functions whose self time differs most, and for each PATTERN the time of the
samples with a frame containing it.
"""

import collections
import re
import sys

SANDBOX = ("Runtime::call", "runtime::idle", "wasmtime", "fiber")


def load_marks(path):
    marks = []
    for line in open(path):
        parts = line.split()
        if len(parts) == 4 and parts[0] == "mark":
            marks.append((float(parts[2]), float(parts[3]), int(parts[1])))
    return marks


def load_samples(path, marks, servers):
    """Stacks (leaf first, function names only) per server."""
    stacks = {s: [] for s in servers}
    comm, time, frames = None, None, None

    def flush():
        if frames and (comm.startswith("bench-server") or comm.startswith("cordon-")):
            for start, end, server in marks:
                if start <= time <= end and server in stacks:
                    stacks[server].append(frames)
                    break

    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line.strip():
            flush()
            frames = None
        elif not line[0].isspace():
            flush()
            head = line.split()
            comm, time, frames = head[0], float(head[2].rstrip(":")), []
        elif frames is not None:
            symbol = line.strip().split(" ", 1)[-1]
            symbol = re.sub(r" \([^)]*\)$", "", symbol)
            frames.append(re.sub(r"\+0x[0-9a-f]+$", "", symbol))
    flush()
    return stacks


def main():
    if len(sys.argv) < 7:
        sys.exit(__doc__)
    samples, marks_path, a, b, cpu_a, cpu_b = sys.argv[1:7]
    patterns = sys.argv[7:]
    a, b = int(a), int(b)
    cpu = {a: float(cpu_a), b: float(cpu_b)}
    stacks = load_samples(samples, load_marks(marks_path), (a, b))
    for server in (a, b):
        if not stacks[server]:
            sys.exit(f"no samples for server {server}: are the marks from this recording?")
    per_sample = {s: cpu[s] / len(stacks[s]) for s in (a, b)}

    def in_sandbox(frames):
        return any(p in f for f in frames for p in SANDBOX)

    leaf, sandbox, rest = {}, {}, {}
    print(f"µs per call        server {a:>2}   server {b:>2}   difference")
    for s in (a, b):
        leaf[s] = collections.Counter()
        sandbox[s] = 0.0
        for frames in stacks[s]:
            if in_sandbox(frames):
                sandbox[s] += per_sample[s]
            else:
                leaf[s][frames[0][:100]] += per_sample[s]
        rest[s] = sum(leaf[s].values())
    for label, values in (("total", cpu), ("sandbox", sandbox), ("rest", rest)):
        print(f"{label:<16} {values[a]:>10.2f} {values[b]:>10.2f} {values[a] - values[b]:>10.2f}")
    for pattern in patterns:
        inside = {
            s: sum(per_sample[s] for f in stacks[s] if any(pattern in x for x in f)) for s in (a, b)
        }
        print(f"{pattern[:16]:<16} {inside[a]:>10.2f} {inside[b]:>10.2f} {inside[a] - inside[b]:>10.2f}")
    print("\noutside the sandbox, self time differing most:")
    names = set(leaf[a]) | set(leaf[b])
    for name in sorted(names, key=lambda n: -abs(leaf[a][n] - leaf[b][n]))[:25]:
        print(f"{leaf[a][name]:>8.2f} {leaf[b][name]:>8.2f} {leaf[a][name] - leaf[b][name]:>8.2f}  {name}")


if __name__ == "__main__":
    main()
