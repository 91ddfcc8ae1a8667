#!/usr/bin/env bash
# Build infra/Dockerfile and smoke-test it on a machine that reaches package registries (Debian mirror, PyPI) but no
# container registry and has no Docker daemon: the default base (pytorch/pytorch from Docker Hub) cannot be pulled, so
#
#   1. debootstrap a minimal Debian bookworm with python3/python3-venv, import it as an image;
#   2. turn that into a stand-in for pytorch/pytorch: a venv at /opt/venv (on PATH, like /opt/conda/bin) holding the
#      same torch/torchvision the project uses (the CUDA wheels from PyPI; a CPU torch is no good since PyPI's
#      torchvision wheels need the CUDA build);
#   3. `buildah bud` infra/Dockerfile on that base (--build-arg BASE_IMAGE=...);
#   4. `podman run` the image: `skypipe --version` and `skypipe demo --where`.
#
# Run as root from anywhere (needs ~15 GB free disk: the image is ~7 GB, plus the rootfs and buildah's layers):
#   infra/build-offline.sh                # everything; steps 1-2 are skipped when the base image already exists
#   REBUILD_BASE=1 infra/build-offline.sh # redo the base too
# Logs go to outputs/image-build/ (git-ignored). Tunables below can be overridden from the environment.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/skypipe-offline}                 # debootstrap rootfs lives here (outside the build context)
LOGS=${LOGS:-$REPO/outputs/image-build}
BASE=${BASE:-localhost/debian-python:bookworm}          # the stand-in base image
IMAGE=${IMAGE:-localhost/skypipe:test}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH=${TORCH:-torch==2.14.1 torchvision==0.29.1}      # inside pyproject's torch range
# pip inside the build: the host's CA bundle (this network intercepts TLS; harmless elsewhere) and its local package
# caches as extra indexes, mounted read-only at the same paths. Set PIP_INDEXES= to use PyPI alone.
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
PIP_INDEXES=${PIP_INDEXES-/opt/pypi /opt/pypi-more}
NICE=${NICE:-nice -n 10}                               # shared, loaded machine: build at lower priority

# chroot isolation: no nested OCI runtime for RUN steps. Storage: the system default (overlay works on an ext4 root);
# STORAGE_DRIVER=vfs where overlay fails (vfs copies every layer: needs several times the disk). Set it before the
# first use of the store: podman refuses a driver other than the one its database was created with.
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
PODMAN=(podman)
if [ -n "${STORAGE_DRIVER:-}" ]; then export STORAGE_DRIVER; PODMAN+=(--storage-driver "$STORAGE_DRIVER"); fi

need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install -y buildah podman debootstrap" >&2; exit 1; }; }
need buildah; need podman; need debootstrap
mkdir -p "$WORK" "$LOGS"

# Build-time mounts and pip settings shared by the base step and the Dockerfile build.
MOUNTS=(-v "$HOST_CA:/run/host-ca.crt:ro")
EXTRA_INDEX=""
for d in $PIP_INDEXES; do
    [ -d "$d/simple" ] || continue
    MOUNTS+=(-v "$d:$d:ro")
    EXTRA_INDEX+="${EXTRA_INDEX:+ }file://$d/simple"
done

# --- 1-2. the base image ------------------------------------------------------------------------------------------
if [ -n "${REBUILD_BASE:-}" ] || ! "${PODMAN[@]}" image exists "$BASE"; then
    t0=$(date +%s)
    rm -rf "$WORK/rootfs"
    $NICE debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" > "$LOGS/debootstrap.log" 2>&1
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | $NICE "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE-min"

    ctr=$(buildah from --pull-never "$BASE-min")
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
    # shellcheck disable=SC2086  # $TORCH is a list of requirements
    $NICE buildah run "${MOUNTS[@]}" --env PIP_CERT=/run/host-ca.crt --env "PIP_EXTRA_INDEX_URL=$EXTRA_INDEX" "$ctr" -- \
        sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -q $TORCH \
               && /opt/venv/bin/python -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'" \
        > "$LOGS/base.log" 2>&1
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    $NICE buildah commit --rm "$ctr" "$BASE" >> "$LOGS/base.log" 2>&1
    trap - EXIT
    echo "base $BASE built in $(( $(date +%s) - t0 )) s"
fi

# --- 3. the skypipe image -----------------------------------------------------------------------------------------
t0=$(date +%s)
cd "$REPO"
$NICE buildah bud --pull-never --layers --ignorefile infra/Dockerfile.dockerignore -f infra/Dockerfile \
    --build-arg "BASE_IMAGE=$BASE" \
    --build-arg PIP_CERT=/run/host-ca.crt \
    ${EXTRA_INDEX:+--build-arg "PIP_EXTRA_INDEX_URL=$EXTRA_INDEX"} \
    "${MOUNTS[@]}" -t "$IMAGE" . > "$LOGS/build.log" 2>&1 \
    || { tail -30 "$LOGS/build.log" >&2; exit 1; }
echo "image $IMAGE built in $(( $(date +%s) - t0 )) s"
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"

# --- 4. smoke test ------------------------------------------------------------------------------------------------
# `podman run` first (entrypoint tini, no network). Inside a container without CAP_SYS_RESOURCE crun cannot set the
# rlimits podman asks for ("crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied", even
# with --ulimit host); then fall back to `buildah run --isolation chroot` (no OCI runtime, host network) on a working
# container of the same image, calling the entrypoint by hand.
smoke() {
    if "${PODMAN[@]}" run --rm --network none --cgroups disabled "$IMAGE" "$@" 2> "$LOGS/podman-run.err"; then
        return
    fi
    echo "(podman run failed: $(tail -1 "$LOGS/podman-run.err"); using buildah run)" >&2
    local c; c=$(buildah from --pull-never "$IMAGE")
    local rc=0
    buildah run --isolation chroot "$c" -- /usr/bin/tini -s -- "$@" || rc=$?
    buildah rm "$c" >/dev/null
    return $rc
}
smoke skypipe --version | tee "$LOGS/version.txt"
smoke skypipe demo --where | tee "$LOGS/where.txt"
