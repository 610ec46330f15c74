# Ferry: run unikernel network services on KVM and move them between hosts.
# `just` lists the recipes. Everything needs Linux x86_64 with /dev/kvm;
# `setup` (run by the others as needed) installs the rest.

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := false

export PATH := env_var('HOME') + "/.cargo/bin:" + env_var('PATH')

uhyve_version := "0.10.0"
qemu := "qemu-system-x86_64 -enable-kvm -M microvm -cpu host -m 64M -nodefaults -no-user-config -nographic -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04"

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
    if [ ${#missing[@]} -gt 0 ]; then
      echo "setup: installing ${missing[*]}"
      sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! uhyve --version 2>/dev/null | grep -q "{{uhyve_version}}"; then
      echo "setup: installing uhyve {{uhyve_version}} (a few minutes, once)"
      cargo install uhyve --locked --version {{uhyve_version}} --quiet
    fi

# Build the VMM and the `ferry` CLI (release).
build:
    cargo build --release --quiet -p ferry

# Build an app image into images/out/APP and print its path.
build-image APP:
    images/build {{APP}}

# Build APP and run it on Ferry's VMM; ARGS go to the app (e.g. `just run-app hello exit=3`).
run-app APP *ARGS: build
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build {{APP}})
    exec target/release/ferry run "$image" -- {{ARGS}}

# Build APP and run it under stock uhyve (0.10).
run-app-uhyve APP *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build {{APP}})
    # uhyve's own `--` ends its options; the second separates runtime from app arguments.
    exec uhyve "$image" -- -- {{ARGS}}

# Build APP and run it under QEMU/KVM (PVH direct boot, microvm); exits with the guest's status.
run-app-qemu APP *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build {{APP}})
    set +e
    {{qemu}} -kernel "$image" -append "-- {{ARGS}}"
    s=$?
    set -e
    # isa-debug-exit: QEMU exits with (status << 1) | 1.
    if [ $((s & 1)) -eq 1 ]; then exit $((s >> 1)); fi
    echo "run-app-qemu: QEMU exited with $s without the guest's exit device" >&2
    exit $s

# Boot time of the hello image: Ferry vs uhyve vs QEMU (median and spread of N runs).
bench-boot N="20": setup build
    images/build hello >/dev/null
    cargo run --release --quiet -p ferry-tests --bin bench-boot -- --runs {{N}}

# The main job for now: boot hello on Ferry, uhyve and QEMU, then the boot benchmark.
demo: setup build
    #!/usr/bin/env bash
    set -euo pipefail
    image=$(images/build hello)
    echo "== Ferry";  target/release/ferry run "$image" -- demo sleep-ms=20 || true
    echo "== uhyve";  uhyve "$image" -- -- demo sleep-ms=20 2>/dev/null || true
    echo "== QEMU";   {{qemu}} -kernel "$image" -append "-- demo sleep-ms=20" || true
    echo "== boot benchmark"
    cargo run --release --quiet -p ferry-tests --bin bench-boot -- --runs 10

# Run all tests: unit tests and the KVM integration tests on Ferry, uhyve and QEMU.
test: setup build
    images/build hello >/dev/null
    images/build misbehave >/dev/null
    cargo test -- --test-threads 2
