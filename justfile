# Ferry: run unikernel network services on KVM and move them between hosts.
# `just` lists the recipes. Everything needs Linux x86_64 with /dev/kvm;
# `setup` (run by the others as needed) installs the rest.

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := false

export PATH := env_var('HOME') + "/.cargo/bin:" + env_var('PATH')

uhyve_version := "0.10.0"
# The host CPU without arch-capabilities: QEMU 7.2 aborts on AMD hosts of this KVM
# with "failed to set MSR 0x10a" otherwise (tests/src/lib.rs: QEMU_CPU).
qemu_cpu := "host,-arch-capabilities"
qemu_net := "qemu-system-x86_64 -enable-kvm -M pc -bios /usr/share/qemu/qboot.rom -cpu " + qemu_cpu + " -m 64M -nodefaults -no-user-config -nographic -serial mon:stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04 -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=02:bf:0a:4d:00:0a,disable-legacy=on"
qemu := "qemu-system-x86_64 -enable-kvm -M microvm -cpu " + qemu_cpu + " -m 64M -nodefaults -no-user-config -nographic -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04"

# List the recipes.
default:
    @just --list

# Install what Ferry needs: the guest target, Debian packages, uhyve (idempotent).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
      echo "setup: adding the x86_64-unknown-none target"
      rustup target add x86_64-unknown-none
    fi
    missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nft >/dev/null || missing+=(nftables)
    command -v curl >/dev/null || missing+=(curl)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v patch >/dev/null || missing+=(patch)
    command -v etcd >/dev/null || missing+=(etcd-server)
    # etcd-client's build compiles etcd's protocol files.
    command -v protoc >/dev/null || missing+=(protobuf-compiler)
    if [ ${#missing[@]} -gt 0 ]; then
      echo "setup: installing ${missing[*]}"
      sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # The pinned nightly with rust-src and llvm-tools builds RustyHermit images
    # (std from source, the kernel's post-processing); installed once.
    cargo build --quiet --release -p ferry-images
    target/release/ferry-images toolchain >/dev/null
    if ! uhyve --version 2>/dev/null | grep -q "{{uhyve_version}}"; then
      echo "setup: installing uhyve {{uhyve_version}} (a few minutes, once)"
      cargo install uhyve --locked --version {{uhyve_version}} --quiet
    fi

# The VMM (`ferry`) links statically (glibc's static-pie): a process that
# loads no shared library (and runs no libgcc_s constructor, whose CPUID
# instructions each trap to the host here) starts ~0.4 ms sooner, a tenth
# of a small VM's boot. `cargo rustc` gives the flag to that binary alone.
vmm_flags := "-C target-feature=+crt-static"

# Build the VMM, the `ferry` CLI and the host tools (cluster, stream client), release.
build:
    cargo build --release --quiet -p ferry-tests --bins
    cargo rustc --release --quiet -p ferry --bin ferry -- {{vmm_flags}}

# Build target/release/ferry-failpoints: `ferry` with the migration protocol's failpoints, for the fault-matrix tests.
build-failpoints:
    cargo rustc --release --quiet -p ferry --bin ferry --features failpoints -- {{vmm_flags}}
    cp target/release/ferry target/release/ferry-failpoints.new && mv -f target/release/ferry-failpoints.new target/release/ferry-failpoints
    cargo rustc --release --quiet -p ferry --bin ferry -- {{vmm_flags}}

# Make a new service apps/NAME from the template (apps/template; `just new-app NAME hermit`: std Rust on RustyHermit, from apps/hermit-echo); `just run-app NAME` runs it.
new-app NAME KIND="ferry":
    images/new-app {{NAME}} {{KIND}}

# Build an app image into images/out/APP and print its path.
build-image APP:
    images/build {{APP}}

# Run APP (+ ARGS) as the cluster's service on hostA, detached (closing the terminal does not stop it); says how to reach, move and stop it.
run-app APP *ARGS: build
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f "{{APP}}" ]; then image="{{APP}}"; else image=$(images/build {{APP}}); fi
    target/release/ferry-cluster run "$image" -- {{ARGS}}

# Where the cluster's service runs: host, app, state, generation, uptime, control socket.
status: build
    target/release/ferry-cluster status

# Stop the cluster's service, wherever it runs.
stop: build
    target/release/ferry-cluster stop

# Snapshot the cluster's service to FILE (THEN: resume, pause or stop).
snapshot FILE THEN="resume": build
    target/release/ferry-cluster snapshot "{{FILE}}" --then {{THEN}}

# Restore the snapshot FILE as the cluster's service on HOST (hostA or hostB), detached.
restore FILE HOST="hostA": build
    target/release/ferry-cluster restore "{{FILE}}" --host {{HOST}}

# Build the namespace cluster (ferry-client, ferry-router, ferry-hostA/B/C) with a receiver on hostA and hostB and a 3-member etcd on the backplane; prints the service IP.
cluster-up: build
    target/release/ferry-cluster up --fleet

# A fleet of 3 hosts (etcd, an agent each) with 3 streaming VMs and verifying clients: drain hostA, consolidate, report (target/fleet-demo/report.json).
fleet-demo SECONDS="24": setup build
    images/build stream >/dev/null
    target/release/fleet-demo --seconds {{SECONDS}}

# The fleet's records in the cluster's etcd, e.g. `just fleet ls`, `just fleet cordon hostB` (`ferry fleet --help`).
fleet *ARGS: build
    ip netns exec ferry-hostA target/release/ferry fleet --etcd 10.77.2.1:2379,10.77.2.2:2379,10.77.2.3:2379 {{ARGS}}

# End everything running in the cluster and remove its namespaces.
cluster-down: build
    target/release/ferry-cluster down

# Build APP and run it under stock uhyve (0.10).
run-app-uhyve APP *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build {{APP}})
    # uhyve's own `--` ends its options; the second separates runtime from app arguments.
    exec uhyve "$image" -- -- {{ARGS}}

# Run APP under QEMU/KVM with virtio-net-pci on hostA's tap (pc machine, qboot, PVH boot); one VM per tap.
run-app-qemu APP *ARGS: setup build
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build {{APP}})
    target/release/ferry-cluster up >/dev/null
    echo "run-app-qemu: {{APP}} under QEMU on ferry-hostA as 10.77.0.10; Ctrl-A X quits QEMU"
    set +e
    ip netns exec ferry-hostA {{qemu_net}} -kernel "$image" -append "net.ip=10.77.0.10/24 net.gw=10.77.0.1 -- {{ARGS}}"
    s=$?
    set -e
    # isa-debug-exit: QEMU exits with (status << 1) | 1.
    if [ $((s & 1)) -eq 1 ]; then exit $((s >> 1)); fi
    exit $s

# Build APP and run it under QEMU/KVM without a network (microvm, PVH direct boot).
run-app-qemu-nonet APP *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build {{APP}})
    set +e
    {{qemu}} -kernel "$image" -append "-- {{ARGS}}"
    s=$?
    set -e
    if [ $((s & 1)) -eq 1 ]; then exit $((s >> 1)); fi
    echo "run-app-qemu: QEMU exited with $s without the guest's exit device" >&2
    exit $s

# Boot time of the hello image: Ferry vs uhyve vs QEMU (median and spread of N runs).
bench-boot N="20": setup build
    images/build hello >/dev/null
    cargo run --release --quiet -p ferry-tests --bin bench-boot -- --runs {{N}}

# Streaming throughput and redis-benchmark rate: Ferry vs a native Linux process vs QEMU, on the cluster.
bench-net SECONDS="8" REQUESTS="1000": setup build
    for i in stream kv; do images/build $i >/dev/null; done
    target/release/bench-net --seconds {{SECONDS}} --requests {{REQUESTS}}

# Snapshot time, file size and restore-to-running time against guest memory size.
bench-snapshot SIZES="64,256,1024" RUNS="3": setup build
    images/build hello >/dev/null
    target/release/bench-snapshot --sizes {{SIZES}} --runs {{RUNS}}

# Migration delay and throughput vs image size, load and capture (TCPmig Fig. 5/6); JSON, table and plots.
bench-migrate SIZES="4,10,20,50,256,1024" RUNS="3": setup build
    images/build stream >/dev/null
    target/release/bench-migrate --sizes {{SIZES}} --runs {{RUNS}}
    python3 -m venv target/venv >/dev/null && target/venv/bin/pip install -q matplotlib
    target/venv/bin/python tests/plot_migrate.py target/bench/migrate.json
    python3 tests/strip_samples.py target/bench/migrate.json docs/bench-migrate.json
    python3 tests/strip_samples.py target/bench/migrate-qemu.json docs/bench-migrate-qemu.json

# What overflow checks cost: the VMM with and without them, interleaved rounds of bench-net and bench-migrate; writes docs/overflow-checks.md.
bench-overflow ROUNDS="3": setup build
    #!/usr/bin/env bash
    set -euo pipefail
    for i in stream kv; do images/build $i >/dev/null; done
    CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=false cargo rustc --release --quiet -p ferry --bin ferry --target-dir target/wrapping -- {{vmm_flags}}
    out=target/bench/overflow
    rm -rf "$out"
    for r in $(seq {{ROUNDS}}); do
      for v in checked wrapping; do
        bin=$(pwd)/target/release/ferry
        [ "$v" = wrapping ] && bin=$(pwd)/target/wrapping/release/ferry
        echo "bench-overflow: round $r, $v"
        FERRY_BIN=$bin target/release/bench-net --ferry-only --seconds 5 --requests 2000 --out "$out/$v/net-$r" >/dev/null
        FERRY_BIN=$bin target/release/bench-migrate --sizes 4,256 --loads 120M --runs 2 --qemu false --out "$out/$v/migrate-$r" >/dev/null
      done
    done
    python3 tests/compare_variants.py "$out" > docs/overflow-checks.md
    cat docs/overflow-checks.md

# Live-migrate the cluster's service to the other host, wherever it runs (authenticated, encrypted).
live-migrate DOWNTIME_MS="1": build
    target/release/ferry-cluster migrate --downtime-ms {{DOWNTIME_MS}}

# The main job: stream to a verifying client (plus an echoed upstream), live-migrate A->B->A, report.
# `just demo hermit`: the same with the stream app in std Rust on RustyHermit (apps/hermit-stream).
demo KIND="ferry": setup build
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{KIND}}" in
      ferry) app=stream ;;
      hermit) app=hermit-stream ;;
      *) echo "demo: KIND is ferry (the default) or hermit, not {{KIND}}" >&2; exit 2 ;;
    esac
    images/build $app >/dev/null
    target/release/ferry-demo --app $app

# Fuzz every target for SECONDS each (cargo-fuzz, nightly); fails when it cannot run or finds a crash.
fuzz SECONDS="20":
    #!/usr/bin/env bash
    set -euo pipefail
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
      echo "fuzz: error: cargo-fuzz needs a nightly toolchain and there is none (rustup toolchain install nightly)" >&2
      exit 1
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
      echo "fuzz: installing cargo-fuzz (once)"
      cargo install cargo-fuzz --locked --version 0.13.2 --quiet
    fi
    mkdir -p target/fuzz
    logs=$(pwd)/target/fuzz
    # Seeds: real images for the ELF loader (random bytes rarely parse).
    mkdir -p hypervisor-glue/fuzz/corpus/elf_image
    for i in images/out/hello images/out/echo; do [ -f "$i" ] && cp "$i" hypervisor-glue/fuzz/corpus/elf_image/ || true; done
    cd hypervisor-glue
    targets=$(cargo +nightly fuzz list)
    [ -n "$targets" ] || { echo "fuzz: error: no fuzz targets found" >&2; exit 1; }
    for t in $targets; do
      echo "fuzz: $t for {{SECONDS}} s"
      if ! cargo +nightly fuzz run "$t" -- -max_total_time={{SECONDS}} -rss_limit_mb=2048 >"$logs/$t.log" 2>&1; then
        echo "fuzz: error: $t failed or found a crash (whole log: target/fuzz/$t.log):" >&2
        grep -E "ERROR|panicked|SUMMARY|error(\[|:)" "$logs/$t.log" | head -20 >&2 || tail -20 "$logs/$t.log" >&2
        ls fuzz/artifacts/"$t" 2>/dev/null >&2 || true
        exit 1
      fi
      if ! grep -E "^Done [0-9]+ runs" "$logs/$t.log"; then
        echo "fuzz: error: $t did not run to its time limit (log: target/fuzz/$t.log)" >&2
        tail -20 "$logs/$t.log" >&2
        exit 1
      fi
    done

# Lints: clippy with warnings as errors on the host crates and the guest (runtime, apps), and rustfmt.
lint:
    cargo fmt --all -- --check
    cargo clippy --quiet --all-targets -- -D warnings
    cargo build --quiet --release -p ferry-images
    cargo clippy --quiet --target x86_64-unknown-none -p ferry-runtime $(target/release/ferry-images list --kind ferry --names | sed 's/^/-p /') -- -D warnings
    @# Hermit apps are std Rust: checked for the host (their kernel links only for x86_64-unknown-hermit).
    cargo clippy --quiet -p ferry-hermit $(target/release/ferry-images list --kind hermit --names | sed 's/^/-p /') -- -D warnings

# Run all tests: unit tests and the KVM integration tests on Ferry, uhyve and QEMU, then fuzzing.
# A test that cannot run here (no KVM, not root, a missing tool) fails; FERRY_ALLOW_SKIP=1 skips it instead, loudly.
test: setup build build-failpoints
    images/build hello misbehave echo kv http stream udpcount template hermit-probe hermit-echo hermit-http hermit-stream >/dev/null
    images/build --kernel stock hermit-probe >/dev/null
    rm -f target/test-skips.log
    target/release/ferry-cluster clean-tests
    cargo test -- --test-threads 2
    if [ -s target/test-skips.log ]; then echo "test: $(wc -l < target/test-skips.log) tests were SKIPPED (FERRY_ALLOW_SKIP=1):"; cat target/test-skips.log; fi
    just fuzz 12
