# Source this: podman, buildah, mmdebstrap and runc installed (Debian packages, as root, when
# missing), and CONTAINERS_CONF pointing at the project's podman settings for this machine kind:
# runc (crun refuses cgroups in hybrid mode) and default ulimits the host's hard limits allow.
_missing=()
for _tool in podman buildah mmdebstrap runc; do
    command -v "$_tool" >/dev/null 2>&1 || _missing+=("$_tool")
done
if ((${#_missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "[images] missing ${_missing[*]}: install them (apt-get install podman buildah mmdebstrap runc)" >&2
        return 3 2>/dev/null || exit 3
    fi
    echo "[images] installing ${_missing[*]} from Debian's packages" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah mmdebstrap runc >/dev/null
fi
mkdir -p build/podman
cat > build/podman/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$PWD/build/podman/containers.conf"
unset _missing _tool
